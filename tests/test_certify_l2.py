"""`arqc certify` and `arqc compile --sigma --verify` end to end: a random mnist_cnn, a tiny npz data set."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from arqc import archs
from arqc.cli import main
from arqc.loading import save_checkpoint
from arqc.passes.lower import read_metadata
from arqc.runtime import run as certify_run

SMALL = ["--sigma", "0.25", "--n", "200", "--n0", "20", "--alpha", "0.01"]
NUM_IMAGES = 4
JSON_KEYS = {"sigma", "n0", "n", "alpha", "seed", "num_images", "backend", "certified_accuracy", "acr",
             "abstain_rate", "clean_accuracy", "time_per_point_s", "samples_per_point", "points"}
POINT_KEYS = {"index", "label", "prediction", "radius", "pA_lower", "samples", "path"}


def arqc(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def without_timing(result: dict) -> dict:
    result = json.loads(json.dumps(result))
    result.pop("time_per_point_s")
    for p in result["points"]:
        p.pop("seconds")
    return result


def checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, archs.build("mnist_cnn"), "mnist_cnn", (1, 28, 28), 10)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A random mnist_cnn checkpoint, another one, and 4 images labelled with the first one's clean class."""
    d = tmp_path_factory.mktemp("certify")
    model = checkpoint(d / "m.pt", 0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (NUM_IMAGES, 28, 28), dtype=np.uint8)
    with torch.no_grad():
        net = archs.build("mnist_cnn")
        net.load_state_dict(torch.load(model, weights_only=True)["state_dict"])
        y = net(torch.from_numpy(x[:, None] / 255).float()).argmax(1).numpy()
    y[-1] = (y[-1] + 1) % 10  # one wrong label
    np.savez(d / "d.npz", x=x, y=y)
    return {"dir": d, "model": model, "other": checkpoint(d / "other.pt", 1), "data": f"npz:{d / 'd.npz'}",
            "x": x, "y": y}


@pytest.fixture(scope="module")
def torch_run(files, tmp_path_factory) -> tuple[dict, str, Path]:
    """The uninterrupted torch run: its JSON, stdout and output folder."""
    out = tmp_path_factory.mktemp("torch_run")
    capsys = _ModuleCapture()
    code, stdout, _ = capsys.run(files["model"], "--data", files["data"], *SMALL, "--json", out / "a.json")
    assert code == 0
    return json.loads((out / "a.json").read_text()), stdout, out


class _ModuleCapture:
    """capsys for module-scoped fixtures (pytest's capsys is function-scoped)."""

    def run(self, *args) -> tuple[int, str, str]:
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(["certify", *map(str, args)])
            except SystemExit as e:
                code = e.code
        return code, out.getvalue(), err.getvalue()


# --- certify: backends, JSON, table -------------------------------------------------------------------------


def test_json_keys_table_and_no_leftovers(torch_run):
    result, stdout, out = torch_run
    assert JSON_KEYS <= set(result)
    settings = (result["sigma"], result["n"], result["n0"], result["alpha"], result["seed"])
    assert settings == (0.25, 200, 20, 0.01, 0)
    assert result["num_images"] == NUM_IMAGES and result["backend"] == "torch"
    assert set(result["certified_accuracy"]) >= {"0.00", "0.25", "0.50"}
    assert all(POINT_KEYS <= set(p) for p in result["points"])
    assert [p["index"] for p in result["points"]] == list(range(NUM_IMAGES))
    assert [p["samples"] for p in result["points"]] == [220] * NUM_IMAGES
    assert result["points"][-1]["prediction"] != result["points"][-1]["label"]  # the wrong label: not correct
    assert result["certified_accuracy"]["0.00"] == result["clean_accuracy"] <= 0.75
    assert 0 < result["acr"] and any(p["radius"] > 0 for p in result["points"])
    for text in ("sigma=0.25", "n=200", "n0=20", "alpha=0.01", f"images={NUM_IMAGES}", "ACR", "accuracy"):
        assert text in stdout
    assert [p.name for p in out.iterdir()] == ["a.json"]  # no temp file of the atomic write, no state file


def test_torch_and_ort_backends_give_identical_certificates(torch_run, files, tmp_path, capsys):
    points = without_timing(torch_run[0])["points"]
    code, _, _ = arqc(capsys, "certify", files["model"], "--data", files["data"], *SMALL, "--backend", "ort",
                      "--json", tmp_path / "ort.json")
    assert code == 0
    ort = json.loads((tmp_path / "ort.json").read_text())
    assert ort["backend"] == "onnxruntime" and without_timing(ort)["points"] == points
    # the same model compiled to an .onnx file, run at another optimization level, certifies the same way
    assert arqc(capsys, "compile", files["model"], "--bits", "32", "-o", tmp_path / "m.onnx")[0] == 0
    code, _, _ = arqc(capsys, "certify", tmp_path / "m.onnx", "--data", files["data"], *SMALL, "--ort-opt",
                      "disable", "--threads", "1", "--json", tmp_path / "onnx.json")
    assert code == 0
    assert without_timing(json.loads((tmp_path / "onnx.json").read_text()))["points"] == points


def test_skip_and_num_images_select_points_with_their_own_noise(files, tmp_path, capsys):
    # one image repeated under ids 0..6: points differ only by their noise, which must follow the image id
    # (not the position in the chosen subset), so every chosen point equals the full run's point of its id
    x = np.repeat(files["x"][:1], 7, axis=0)
    data = _npz(tmp_path / "same.npz", x, np.repeat(files["y"][:1], 7))
    code, _, _ = arqc(capsys, "certify", files["model"], "--data", data, *SMALL, "--json", tmp_path / "all.json")
    assert code == 0
    full = without_timing(json.loads((tmp_path / "all.json").read_text()))["points"]
    assert [p["index"] for p in full] == list(range(7))

    def noise_part(point: dict) -> tuple:
        return point["prediction"], point["radius"], point["pA_lower"]

    for skip, num, ids in (("3", "7", [0, 3, 6]), ("2", "3", [0, 2, 4])):
        code, _, _ = arqc(capsys, "certify", files["model"], "--data", data, *SMALL, "--skip", skip,
                          "--num-images", num, "--json", tmp_path / f"s{skip}.json")
        assert code == 0
        result = without_timing(json.loads((tmp_path / f"s{skip}.json").read_text()))
        assert result["num_images"] == len(ids) and [p["index"] for p in result["points"]] == ids
        assert result["points"] == [full[i] for i in ids]
        # the test can tell: a point keyed by its position would carry another id's noise, with other numbers
        assert all(noise_part(full[i]) != noise_part(full[position]) for position, i in enumerate(ids) if i)


# --- resume -------------------------------------------------------------------------------------------------


def test_interrupted_run_resumes_to_the_uninterrupted_result(torch_run, files, tmp_path, capsys, monkeypatch):
    real = certify_run._certify_point
    calls = []

    def dies_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[3])
        return real(*args, **kwargs)

    out = tmp_path / "r.json"
    state = Path(str(out) + ".state")
    args = ["certify", files["model"], "--data", files["data"], *SMALL, "--json", out]
    monkeypatch.setattr(certify_run, "_certify_point", dies_after_two)
    code, _, err = arqc(capsys, *args)
    assert code == 130 and "2 of 4 points are saved" in err
    assert not out.exists() and len(state.read_text().splitlines()) == 1 + 2  # header + 2 finished points

    code, _, err = arqc(capsys, *args, "--sigma", "0.5")  # other arguments: refused
    assert code == 2 and err.startswith("arqc: error: state file") and len(err.splitlines()) == 1
    assert len(state.read_text().splitlines()) == 3

    def counts(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(certify_run, "_certify_point", counts)
    code, stdout, _ = arqc(capsys, *args)
    assert code == 0 and "2 of 4 points were done" in stdout
    assert calls == [0, 1, 2, 3]  # the rerun certified only the two points left
    assert without_timing(json.loads(out.read_text())) == without_timing(torch_run[0]) | {"model": str(
        files["model"]), "data": files["data"], "skip": 1}
    assert not state.exists()  # removed once the JSON is written


# --- IRS ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def irs_files(files, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("irs")
    run = _ModuleCapture().run
    code, _, _ = run(files["model"], "--data", files["data"], *SMALL, "--save-irs-cache", d / "c.npz",
                     "--json", d / "fp.json")
    assert code == 0
    for name, model in (("q.onnx", files["model"]), ("other.onnx", files["other"])):
        main(["compile", str(model), "--bits", "8", "--data", files["data"], "-o", str(d / name)])
    return {"cache": d / "c.npz", "fp": json.loads((d / "fp.json").read_text()), "q": d / "q.onnx",
            "other": d / "other.onnx"}


def test_saving_an_irs_cache_gives_the_plain_result(irs_files, torch_run):
    assert without_timing(irs_files["fp"]) == without_timing(torch_run[0])


def test_irs_certifies_a_quantized_model_against_the_cache(irs_files, files, tmp_path, capsys):
    code, out, _ = arqc(capsys, "certify", irs_files["q"], "--data", files["data"], "--sigma", "0.25",
                        "--irs-cache", irs_files["cache"], "--json", tmp_path / "q.json")
    assert code == 0
    result = json.loads((tmp_path / "q.json").read_text())
    assert (result["n"], result["n0"], result["alpha"]) == (200, 20, 0.01)  # the cache's
    assert result["irs"]["paths"]["irs"] + result["irs"]["paths"]["full"] == NUM_IMAGES
    assert f"path irs ({result['irs']['paths']['irs']} points)" in out
    for p, fp in zip(result["points"], irs_files["fp"]["points"], strict=True):
        if fp["pA_lower"] <= 0.5:  # f abstains there, so f' does too: no sample is spent
            assert (p["prediction"], p["samples"], p["path"]) == (-1, 0, "irs")
            continue
        assert p["samples"] == 200 and p["path"] in ("irs", "full")
        if p["path"] == "irs":  # pA_lower(f') = pA_lower(f) - ζ: never more radius than f had
            assert p["prediction"] in (fp["prediction"], -1) and p["radius"] <= fp["radius"] and p["zeta"] > 0


# --- compile --sigma --verify -------------------------------------------------------------------------------

VERIFY = ["--sigma", "0.25", "--verify", "--num-images", "2", "--n", "100", "--n0", "10", "--alpha", "0.01"]


def test_compile_verify_reports_the_onnx_certificate_and_the_disagreement(files, tmp_path, capsys):
    code, out, _ = arqc(capsys, "compile", files["model"], "--bits", "8", "--data", files["data"], "-o",
                        tmp_path / "q.onnx", "--report", tmp_path / "r.json", "--test-data", files["data"],
                        *VERIFY)
    assert code == 0 and (tmp_path / "q.onnx").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    certificate, disagreement = report["certificate"], report["disagreement"]
    assert certificate["backend"] == "onnxruntime" and certificate["num_images"] == 2
    size = report["file_size"]  # the real file next to Σ params × 8 bits, in int8 containers
    assert size["bytes"] == (tmp_path / "q.onnx").stat().st_size and size["weight_containers"] == "int8"
    assert size["theoretical_bytes"] == report["profile"]["total_params"] < size["bytes"]
    assert disagreement["samples"] == 2 * 110 and disagreement["disagreements"] <= 2
    assert disagreement["rate"] == disagreement["disagreements"] / 220 < disagreement["upper_bound"] < 0.05
    assert disagreement["passed"] and "noisy samples disagree" in out
    layerwise = report["layerwise"]  # every rounding compared with onnxruntime's (runtime/layerwise.py)
    assert layerwise["images"] == 2 and layerwise["codes"] > 0 and layerwise["max_steps"] <= 1
    assert layerwise["differing"] <= 1e-3 * layerwise["codes"] and "layer by layer in onnxruntime" in out
    # the reported certificate is the ONNX file's own: `arqc certify` of the written file gives it again
    code, _, _ = arqc(capsys, "certify", tmp_path / "q.onnx", "--data", files["data"], "--num-images", "2",
                      "--sigma", "0.25", "--n", "100", "--n0", "10", "--alpha", "0.01",
                      "--json", tmp_path / "c.json")
    assert code == 0
    assert without_timing(json.loads((tmp_path / "c.json").read_text()))["points"] == without_timing(
        certificate)["points"]


def test_the_certificates_travel_with_the_model(files, tmp_path, capsys):
    """compile --sigma --epsilon puts both certificates into the ONNX metadata; `arqc report` shows them and
    says they were computed on the file's bytes; `arqc certify` of the file gives the same L2 numbers; a file
    changed after compiling is flagged."""
    out_model, html = tmp_path / "q.onnx", tmp_path / "h.html"
    code, _, err = arqc(capsys, "compile", files["model"], "--bits", "8", "--data", files["data"], "-o", out_model,
                        "--test-data", files["data"], "--num-images", "4", "--sigma", "0.25", "--n", "100", "--n0",
                        "10", "--alpha", "0.01", "--epsilon", "1/255")
    assert code == 0, err
    meta = read_metadata(onnx.load(out_model))
    l2, linf = meta["arqc.certificate_l2"], meta["arqc.certificate_linf"]
    assert (l2["sigma"], l2["n"], l2["n0"], l2["alpha"], l2["num_images"]) == (0.25, 100, 10, 0.01, 4)
    assert l2["data"] == files["data"] and "points" not in l2
    assert linf["epsilon"] == pytest.approx(1 / 255) and linf["num_images"] == len(files["y"])
    assert linf["judge"] == "onnxruntime" and linf["data"] == files["data"]
    assert 0 <= linf["verified_accuracy"] <= linf["clean_accuracy"] <= 1
    code, _, _ = arqc(capsys, "certify", out_model, "--data", files["data"], "--num-images", "4", "--sigma", "0.25",
                      "--n", "100", "--n0", "10", "--alpha", "0.01", "--json", tmp_path / "c.json")
    again = json.loads((tmp_path / "c.json").read_text())
    assert code == 0 and again["certified_accuracy"] == l2["certified_accuracy"] and again["acr"] == l2["acr"]
    code, out, err = arqc(capsys, "report", out_model, "--html", html)
    assert code == 0, err
    assert "L2 certificate" in out and "L-inf certificate" in out and "computed on this file's bytes" in out
    assert "L-inf certificate: verified accuracy" in html.read_text()
    model = onnx.load(out_model)  # change one weight after compiling
    weight = next(t for t in model.graph.initializer if t.name.endswith("weight_int8"))
    weight.raw_data = bytes([weight.raw_data[0] ^ 1]) + weight.raw_data[1:]
    onnx.save(model, tmp_path / "changed.onnx")
    code, out, _ = arqc(capsys, "report", tmp_path / "changed.onnx")
    assert code == 0 and "do NOT match" in out


def test_compile_verify_refuses_a_model_that_disagrees(files, tmp_path, capsys, monkeypatch):
    from arqc import compiler

    real = compiler.to_onnx

    def skewed(sim, settings, int4_weights=False):  # lower a model that differs from the simulation
        sim = copy.deepcopy(sim)
        with torch.no_grad():
            [m for m in sim.modules() if isinstance(m, torch.nn.Linear)][-1].bias[1] += 50.0
        return real(sim, settings, int4_weights)

    monkeypatch.setattr(compiler, "to_onnx", skewed)
    code, _, err = arqc(capsys, "compile", files["model"], "--bits", "8", "--data", files["data"], "-o",
                        tmp_path / "q.onnx", "--report", tmp_path / "r.json", "--test-data", files["data"],
                        *VERIFY)
    assert code == 2 and err.splitlines()[-1].startswith(
        "arqc: error: the ONNX model in onnxruntime disagrees with the torch simulation")
    assert list(tmp_path.iterdir()) == []


def test_compile_verify_refuses_a_wrong_quantizer_layer_by_layer(files, tmp_path, capsys, monkeypatch):
    from arqc import compiler

    real = compiler.to_onnx

    def wrong_grid(sim, settings, int4_weights=False):  # one requant grid written 3 % coarser than simulated
        model = real(sim, settings, int4_weights)
        codes = read_metadata(model)["arqc.codes"]
        wrong.append(sorted(k for k in codes if k.startswith("arqc_requant"))[0])
        reader = next(n for n in model.graph.node
                      if n.op_type == "DequantizeLinear" and n.input[0] == codes[wrong[0]])
        scale = next(t for t in model.graph.initializer if t.name == reader.input[1])
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.03), scale.name))
        return model

    wrong = []
    monkeypatch.setattr(compiler, "to_onnx", wrong_grid)
    code, _, err = arqc(capsys, "compile", files["model"], "--bits", "8", "--data", files["data"], "-o",
                        tmp_path / "q.onnx", "--report", tmp_path / "r.json", "--test-data", files["data"],
                        *VERIFY)
    assert code == 2 and err.splitlines()[-1].startswith(f"arqc: error: the ONNX model's quantizer {wrong[0]} "
                                                          "has step ")
    assert list(tmp_path.iterdir()) == []


# --- bad input: one line, exit 2, nothing written -----------------------------------------------------------


def _npz(path: Path, x: np.ndarray, y: np.ndarray, **extra) -> str:
    np.savez(path, x=x, y=y, **extra)
    return f"npz:{path}"


BAD_CERTIFY = ["missing data", "data of another shape", "labels beyond the model's classes",
               "negative labels", "sigma 0", "sigma < 0", "sigma nan", "sigma not a number", "n0 0", "n 0",
               "alpha 0", "alpha 1", "num-images 0", "skip 0", "batch 0", "missing model",
               "torch backend for onnx", "missing cache", "cache of another model", "cache of another sigma",
               "cache with fewer samples", "cache of other images", "cache and save-cache",
               "bad data while saving a cache"]


def bad_certify_args(case: str, files: dict, irs: dict, d: Path) -> tuple[Path, dict, list]:
    """(model, options replacing the defaults, extra arguments) of a bad certify command."""
    x28, x32 = np.zeros((2, 28, 28), np.uint8), np.zeros((2, 32, 32, 3), np.uint8)
    cache = ["--irs-cache", irs["cache"]]
    return {
        "missing data": (files["model"], {"--data": f"npz:{d / 'nope.npz'}"}, []),
        "data of another shape": (files["model"], {"--data": _npz(d / "rgb.npz", x32, np.zeros(2, int))}, []),
        "labels beyond the model's classes": (files["model"],
                                              {"--data": _npz(d / "l.npz", x28, np.array([0, 12]))}, []),
        "negative labels": (files["model"], {"--data": _npz(d / "n.npz", x28, np.array([0, -1]))}, []),
        "sigma 0": (files["model"], {"--sigma": "0"}, []),
        "sigma < 0": (files["model"], {"--sigma": "-0.5"}, []),
        "sigma nan": (files["model"], {"--sigma": "nan"}, []),
        "sigma not a number": (files["model"], {"--sigma": "big"}, []),
        "n0 0": (files["model"], {"--n0": "0"}, []),
        "n 0": (files["model"], {"--n": "0"}, []),
        "alpha 0": (files["model"], {"--alpha": "0"}, []),
        "alpha 1": (files["model"], {"--alpha": "1"}, []),
        "num-images 0": (files["model"], {}, ["--num-images", "0"]),
        "skip 0": (files["model"], {}, ["--skip", "0"]),
        "batch 0": (files["model"], {}, ["--batch", "0"]),
        "missing model": (d / "nope.pt", {}, []),
        "torch backend for onnx": (irs["q"], {}, ["--backend", "torch"]),
        "missing cache": (irs["q"], {}, ["--irs-cache", d / "nope.npz"]),
        "cache of another model": (irs["other"], {}, cache),
        "cache of another sigma": (irs["q"], {"--sigma": "0.5"}, cache),
        "cache with fewer samples": (irs["q"], {"--n": "201"}, cache),
        "cache of other images": (irs["q"], {"--data": _npz(d / "o.npz", files["x"] // 2, files["y"])},
                                  cache),
        "cache and save-cache": (files["model"], {}, [*cache, "--save-irs-cache", d / "out" / "c.npz"]),
        "bad data while saving a cache": (files["model"], {"--data": f"npz:{d / 'nope.npz'}"},
                                          ["--save-irs-cache", d / "out" / "c.npz"]),
    }[case]


@pytest.mark.parametrize("case", BAD_CERTIFY)
def test_bad_certify_input_is_one_line_and_writes_nothing(case, files, irs_files, tmp_path, capsys):
    work = tmp_path / "out"
    work.mkdir()
    model, change, extra = bad_certify_args(case, files, irs_files, tmp_path)
    options = {"--data": files["data"], **dict(zip(SMALL[::2], SMALL[1::2], strict=True)), **change}
    code, out, err = arqc(capsys, "certify", model, *[v for kv in options.items() for v in kv], *extra,
                          "--json", work / "o.json")
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("arqc: error: "), err
    assert list(work.iterdir()) == []  # no JSON, no state file, no cache


BAD_COMPILE = {
    "verify without sigma": ["--verify", "--test-data", "{data}"],
    "sigma without test data": ["--sigma", "0.25"],
    "test data of another shape": ["--sigma", "0.25", "--test-data", "{rgb}"],
    "sigma 0": ["--sigma", "0", "--test-data", "{data}"],
    "max-disagreement > 1": ["--sigma", "0.25", "--verify", "--test-data", "{data}",
                             "--max-disagreement", "2"],
    "alpha 1": ["--sigma", "0.25", "--test-data", "{data}", "--alpha", "1"],
}


@pytest.mark.parametrize("case", list(BAD_COMPILE))
def test_bad_compile_verify_input_is_one_line_and_writes_nothing(case, files, tmp_path, capsys):
    work = tmp_path / "out"
    work.mkdir()
    rgb = _npz(tmp_path / "rgb.npz", np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int64))
    extra = [a.format(data=files["data"], rgb=rgb) for a in BAD_COMPILE[case]]
    code, out, err = arqc(capsys, "compile", files["model"], "--bits", "8", "--data", files["data"], "-o",
                          work / "q.onnx", "--report", work / "r.json", *extra)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("arqc: error: "), err
    assert list(work.iterdir()) == []


def test_a_named_state_file_is_kept_and_a_larger_run_extends_it(torch_run, files, tmp_path, capsys, monkeypatch):
    real, calls = certify_run._certify_point, []

    def counts(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(certify_run, "_certify_point", counts)
    state = tmp_path / "keep.state"
    base = ["certify", files["model"], "--data", files["data"], *SMALL, "--state", state]
    code, _, err = arqc(capsys, *base, "--num-images", "2", "--json", tmp_path / "two.json")
    assert code == 0, err
    assert state.exists() and calls == [0, 1]
    code, stdout, err = arqc(capsys, *base, "--json", tmp_path / "all.json")
    assert code == 0, err
    assert calls == [0, 1, 2, 3] and "2 of 4 points were done" in stdout  # only the two new images
    assert without_timing(json.loads((tmp_path / "all.json").read_text())) == without_timing(torch_run[0]) | {
        "model": str(files["model"]), "data": files["data"], "skip": 1}


# --- files written under the old quantization semantics ----------------------------------------------------


def _old_semantics(header: dict) -> dict:
    """A header as arqc wrote it before integer-only inference: no "semantics" key."""
    assert header.pop("semantics") == 2
    return header


def test_state_files_caches_and_policies_of_the_old_semantics_are_refused(files, irs_files, tmp_path, capsys,
                                                                          monkeypatch):
    """Each in one line naming the file and both semantics versions, exit 2, nothing written."""
    def refused(*args):
        code, _, err = arqc(capsys, *args)
        assert code == 2 and len(err.splitlines()) == 1 and "semantics 1" in err and "semantics 2" in err, err
        return err

    # a certification state file: interrupt a run after its first point, then age its header
    out = tmp_path / "r.json"
    state = Path(str(out) + ".state")
    args = ["certify", files["model"], "--data", files["data"], *SMALL, "--json", out]
    real = certify_run._certify_point
    calls = []

    def dies_after_one(*a, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(certify_run, "_certify_point", dies_after_one)
    assert arqc(capsys, *args)[0] == 130
    monkeypatch.setattr(certify_run, "_certify_point", real)
    lines = [json.loads(line) for line in state.read_text().splitlines()]
    state.write_text("".join(json.dumps(line) + "\n" for line in [_old_semantics(lines[0]), *lines[1:]]))
    assert str(state) in refused(*args)
    assert not out.exists() and len(state.read_text().splitlines()) == 2

    # an IRS cache
    with np.load(irs_files["cache"], allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["header"] = np.array(json.dumps(_old_semantics(json.loads(str(arrays["header"])))))
    np.savez(tmp_path / "old.npz", **arrays)
    refused("certify", irs_files["q"], "--data", files["data"], "--sigma", "0.25", "--n", "100", "--n0", "10",
            "--alpha", "0.01", "--irs-cache", tmp_path / "old.npz", "--json", out)
    assert not out.exists()

    # a policy from a compile report of the old semantics
    report = {"method": "fixed", "policy": {"conv1": {"w_bits": 4, "a_bits": 4}}}
    (tmp_path / "old_report.json").write_text(json.dumps(report))
    refused("compile", files["model"], "--policy", tmp_path / "old_report.json", "--data", files["data"], "-o",
            tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()
