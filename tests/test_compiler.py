"""`arqc compile --budget` (the ARQ search) on the command line: a tiny run end to end, its resume, and every
bad input of the search ending in one error line, exit status 2 and no output file."""

from __future__ import annotations

import json
from dataclasses import replace

import onnx
import pytest
from cli_helpers import assert_one_error_line, run_cli

from arqc.arq import Run
from arqc.base import ArqcError
from arqc.data import load_images
from arqc.pipeline import prepare_model
from arqc.reports import format_compile_report
from arqc.settings import SearchSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def _argv(root, out, *extra: str) -> list[str]:
    return ["compile", str(root / "m.pt"), "-o", str(out / "q.onnx"), "--report", str(out / "r.json"),
            "--data", f"npz:{root / 'train.npz'}", "--test-data", f"npz:{root / 'test.npz'}", "--sigma", "0.25",
            "--calib-images", "16", "--episodes", "3", "--warmup", "1", "--search-images", "6", "--cache-n", "40",
            "--search-n", "20", "--n0", "10", "--n", "40", "--num-images", "4", "--finetune-epochs", "0",
            "--workdir", str(out / "work"), *extra]


BAD = [
    ("below all 2-bit", ["--budget", "0.01%"], ["below what 2-bit"]),
    ("above FP32", ["--budget", "150%"], ["below 100%"]),
    ("not a number", ["--budget", "cheap"], ["--budget 'cheap'"]),
    ("unknown baseline", ["--budget", "5%", "--method", "hawq"], ["hawq"]),
    ("no sigma", ["--budget", "5%", "--sigma", "0"], ["sigma"]),
    ("search-n above cache-n", ["--budget", "5%", "--search-n", "80"], ["--search-n <= --cache-n"]),
    ("too few images", ["--budget", "5%", "--search-images", "30"], ["lower --search-images"]),
    ("lsq with po2", ["--budget", "5%", "--qat-scales", "lsq", "--scales", "po2"], ["--qat-scales lsq"]),
    ("distillation weight above 1", ["--budget", "5%", "--qat-distill", "1.5"], ["--qat-distill", "between 0 and 1"]),
    ("scale learning rate not positive", ["--budget", "5%", "--qat-scale-lr", "0"], ["--qat-scale-lr", "positive"]),
]


@pytest.mark.parametrize("case, extra, fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_search_input_is_one_error_line(search_inputs, tmp_path, capsys, case, extra, fragments):
    code, _, err = run_cli(_argv(search_inputs, tmp_path, *extra), capsys)
    assert_one_error_line(code, err, *fragments)
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "r.json").exists()


SMALL = ["--calib-images", "16", "--episodes", "3", "--warmup", "1", "--search-images", "6", "--cache-n", "40",
         "--search-n", "20", "--n0", "10", "--n", "40", "--num-images", "4", "--finetune-epochs", "0"]


def test_the_headline_command_searches_on_the_data_the_checkpoint_names(search_inputs, tmp_path, capsys):
    """`arqc compile MODEL -o OUT --sigma S`: the ARQ search at the default budget, on the training and test
    images the checkpoint records (paths relative to its folder), the same as naming them all."""
    import shutil

    from arqc.loading import record_data_specs

    model = tmp_path / "models" / "m.pt"
    (tmp_path / "data").mkdir()
    model.parent.mkdir()
    shutil.copy(search_inputs / "m.pt", model)
    for name in ("train", "test"):
        shutil.copy(search_inputs / f"{name}.npz", tmp_path / "data" / f"{name}.npz")
    record_data_specs(model, {"train": "npz:../data/train.npz", "test": "npz:../data/test.npz"})
    code, out, err = run_cli(["compile", str(model), "-o", str(tmp_path / "a.onnx"), "--sigma", "0.25",
                              "--report", str(tmp_path / "a.json"), *SMALL], capsys)
    assert code == 0, err
    assert "no precision given: searching (ARQ)" in out and "within 1.5625% of FP32 BitOps" in out
    for name in ("train", "test"):
        assert f"npz:{tmp_path / 'data' / name}.npz (recorded in {model})" in out
    headline = json.loads((tmp_path / "a.json").read_text())
    assert headline["method"] == "arq" and headline["budget"] == 0.015625 and len(headline["episodes"]) == 3

    code, _, err = run_cli(["compile", str(search_inputs / "m.pt"), "-o", str(tmp_path / "b.onnx"), "--sigma",
                            "0.25", "--budget", "1.5625%", "--data", f"npz:{search_inputs / 'train.npz'}",
                            "--test-data", f"npz:{search_inputs / 'test.npz'}", "--report",
                            str(tmp_path / "b.json"), *SMALL], capsys)
    assert code == 0, err
    named = json.loads((tmp_path / "b.json").read_text())
    for key in ("policy", "certified_accuracy", "acr", "episodes", "bitops_ratio_fp32"):
        assert headline[key] == named[key], key


def test_a_model_that_names_no_data_gets_one_line_naming_the_options(search_inputs, tmp_path, capsys):
    code, _, err = run_cli(["compile", str(search_inputs / "m.pt"), "-o", str(tmp_path / "q.onnx"), "--sigma",
                            "0.25"], capsys)
    assert_one_error_line(code, err, "records no train or test images", "--data TRAIN_SPEC", "--test-data TEST_SPEC")
    code, _, err = run_cli(["compile", str(search_inputs / "m.pt"), "-o", str(tmp_path / "q.onnx"), "--sigma",
                            "0.25", "--data", f"npz:{search_inputs / 'train.npz'}"], capsys)
    assert_one_error_line(code, err, "records no test images", "--test-data TEST_SPEC")
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "q.onnx.arqc").exists()


def test_finetune_on_the_test_images_is_refused(search_inputs, tmp_path, capsys):
    test_spec = f"npz:{search_inputs / 'test.npz'}"
    code, _, err = run_cli(_argv(search_inputs, tmp_path, "--budget", "5%", "--finetune-data", test_spec), capsys)
    assert_one_error_line(code, err, "--finetune-data is the --test-data")
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "work").exists()


def test_search_runs_resumes_and_refuses_other_arguments(search_inputs, tmp_path, capsys):
    argv = _argv(search_inputs, tmp_path, "--budget", "5%")
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "arq" and len(report["episodes"]) == 3 and report["bitops_ratio_fp32"] <= 0.05
    first = onnx.load(tmp_path / "q.onnx")

    code, _, err = run_cli(argv, capsys)  # the work directory holds a run: --resume is needed
    assert_one_error_line(code, err, "--resume")
    code, _, err = run_cli(argv + ["--resume", "--episodes", "4"], capsys)
    assert_one_error_line(code, err, "other arguments")
    (tmp_path / "q.onnx").unlink()
    code, _, err = run_cli(argv + ["--resume"], capsys)  # every stage is done: the same model again
    assert code == 0, err
    again = onnx.load(tmp_path / "q.onnx")
    assert again.graph.SerializeToString() == first.graph.SerializeToString()
    assert _props(again) == _props(first)

    # `arqc report` rebuilds the same report from the file alone, and plots it next to a baseline's JSON
    model, html = str(tmp_path / "q.onnx"), tmp_path / "h.html"
    code, out, err = run_cli(["report", model, "--html", str(html), "--compare", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    assert format_compile_report(report) in out and html.read_text().startswith("<!doctype html>")
    (tmp_path / "bad.json").write_text("{")
    code, _, err = run_cli(["report", model, "--html", str(tmp_path / "h2.html"), "--compare",
                            str(tmp_path / "bad.json")], capsys)
    assert_one_error_line(code, err, "cannot read report")
    assert not (tmp_path / "h2.html").exists()


def _props(model) -> dict:
    """metadata_props, with the report's stage timings (which differ between runs) left out."""
    props = {p.key: p.value for p in model.metadata_props}
    report = json.loads(props.pop("arqc.report"))
    report.pop("timings_s")
    return props | {"arqc.report": report}


def test_fp32_cache_of_another_sigma_is_refused(search_inputs, tmp_path):
    train, test = load_images(f"npz:{search_inputs / 'train.npz'}"), load_images(f"npz:{search_inputs / 'test.npz'}")
    prep = prepare_model(str(search_inputs / "m.pt"), images=train)
    s = SearchSettings(method="arq", budget=0.05, sigma=0.25, episodes=2, warmup=1, search_images=6, cache_n=40,
                       search_n=20, n0=10, n=40, test_images=4, finetune_epochs=0, calib_images=16, batch_size=64)
    Run(prep, train, test, s, tmp_path / "a", resume=False, progress=False, fp32_dir=tmp_path / "fp32").fp32_cache()
    other = Run(prep, train, test, replace(s, sigma=0.5), tmp_path / "b", resume=False, progress=False,
                fp32_dir=tmp_path / "fp32")
    with pytest.raises(ArqcError, match="sigma=0.25, not 0.5"):
        other.fp32_cache()


def test_search_records_its_calibration_and_learned_scales(search_inputs, tmp_path, capsys):
    from arqc.passes.lower import read_metadata

    argv = _argv(search_inputs, tmp_path, "--budget", "5%", "--method", "greedy", "--calibration", "percentile",
                 "--qat-scales", "lsq", "--qat-distill", "0.5", "--qat-bn", "unfolded", "--qat-scale-lr", "2e-4",
                 "--finetune-epochs", "1")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    meta = read_metadata(onnx.load(tmp_path / "q.onnx"))
    assert meta["arqc.settings"]["calibration"] == "percentile"
    assert meta["arqc.settings"]["search"]["qat_scales"] == "lsq"
    assert meta["arqc.settings"]["search"]["qat_distill"] == 0.5
    assert meta["arqc.settings"]["search"]["qat_bn"] == "unfolded"
    assert meta["arqc.settings"]["search"]["qat_scale_lr"] == 2e-4
    methods = [q["method"] for q in [*meta["arqc.calibration"].values(), *meta["arqc.requant"].values()]]
    assert methods and all(m.startswith("percentile, noise sigma=0.25") for m in methods)
    assert all(m.endswith((", lsq", ", lsq, off ties")) for m in methods)
