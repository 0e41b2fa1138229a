"""``arqc certify --method ibp``: the CLI around the interval-bound certifier (runtime/ibp.py, verify.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from arqc import archs
from arqc.cli import main
from arqc.commands.options import parse_epsilon
from arqc.data import load_images
from arqc.loading import save_checkpoint
from arqc.passes.policy import uniform
from arqc.pipeline import prepare_model, quantize, to_onnx


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A W4A4 mnist_cnn (random weights) lowered by arqc, and 8-bit grid images."""
    root = tmp_path_factory.mktemp("ibp")
    torch.manual_seed(0)
    ckpt = root / "m.pt"
    save_checkpoint(ckpt, archs.build("mnist_cnn"), "mnist_cnn", (1, 28, 28), 10)
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", x=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), y=np.arange(6) % 10)
    images = load_images(f"npz:{root / 'd.npz'}")
    prep = prepare_model(str(ckpt))
    sim = quantize(prep, uniform(prep.gm, 4, 4), images, 6)
    onnx.save(to_onnx(sim, prep.settings(source=str(ckpt))), root / "m.onnx")
    return root


def _run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr()


def test_parse_epsilon():
    assert parse_epsilon("2/255") == pytest.approx(2 / 255)
    assert parse_epsilon("0.1") == pytest.approx(0.1)


def test_ibp_json_on_an_arqc_onnx_model(compiled, capsys):
    out = compiled / "ibp.json"
    main(["certify", str(compiled / "m.onnx"), "--method", "ibp", "--epsilon", "1/255", "--data",
          f"npz:{compiled / 'd.npz'}", "--json", str(out)])
    report = json.loads(out.read_text())
    for key in ("epsilon", "clean_accuracy", "verified_accuracy", "falsified", "timeouts", "points"):
        assert key in report
    assert report["epsilon"] == pytest.approx(1 / 255) and len(report["points"]) == 6
    statuses = [p["status"] for p in report["points"]]
    assert report["verified_accuracy"] == pytest.approx(statuses.count("verified") / 6)
    for p in report["points"]:  # a verified point has a positive sound margin, and only then
        assert (p["status"] == "verified") == (p["margin_lower"] > 0)


def test_checkpoint_with_bits_gives_the_same_verdicts_as_its_onnx(compiled, capsys):
    a, b = compiled / "a.json", compiled / "b.json"
    data = f"npz:{compiled / 'd.npz'}"
    main(["certify", str(compiled / "m.onnx"), "--method", "ibp", "--epsilon", "0.5/255", "--data", data,
          "--json", str(a)])
    main(["certify", str(compiled / "m.pt"), "--method", "ibp", "--epsilon", "0.5/255", "--data", data,
          "--bits", "4", "--calib-data", data, "--json", str(b)])
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert [p["status"] for p in ra["points"]] == [p["status"] for p in rb["points"]]


@pytest.mark.parametrize("args, message", [
    (["--epsilon", "1.5"], "outside [0, 1]"),
    ([], "needs --epsilon"),
    (["--epsilon", "1/255", "--sigma", "0.25"], "belong to --method rs"),
    (["--epsilon", "1/255", "--bits", "8"], "already says how it is quantized"),
])
def test_bad_input_is_one_line_and_exit_2(compiled, capsys, args, message):
    code, captured = _run(capsys, "certify", str(compiled / "m.onnx"), "--method", "ibp", "--data",
                          f"npz:{compiled / 'd.npz'}", *args)
    assert code == 2 and message in captured.err and captured.err.count("\n") == 1


def test_complete_needs_a_quantized_model(compiled, capsys):
    code, captured = _run(capsys, "certify", str(compiled / "m.pt"), "--method", "ibp", "--epsilon", "1/255",
                          "--complete", "--data", f"npz:{compiled / 'd.npz'}")
    assert code == 2 and "quantized" in captured.err


def test_qaibp_training_writes_an_onnx_model_that_ibp_certifies(compiled, capsys):
    out, report = compiled / "qa.onnx", compiled / "qa.json"
    data = f"npz:{compiled / 'd.npz'}"
    main(["train", "--method", "qa-ibp", "--arch", "mnist_cnn", "--data", data, "--epsilon", "2/255",
          "--bits", "4", "--epochs", "1", "--batch-size", "3", "-o", str(out)])
    main(["certify", str(out), "--method", "ibp", "--epsilon", "1/255", "--data", data, "--json", str(report)])
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["arqc.policy"])["conv1"] == {"w_bits": 4, "a_bits": 4}
    assert json.loads(meta["arqc.settings"])["training"]["method"] == "qa-ibp"
    assert len(json.loads(report.read_text())["points"]) == 6


@pytest.mark.parametrize("args, message", [
    (["--epsilon", "2/255", "-o", "x.onnx"], "give --bits"),
    (["--bits", "4", "-o", "x.onnx"], "needs --epsilon"),
    (["--epsilon", "2/255", "--bits", "4", "-o", "x.pt"], "as ONNX"),
])
def test_qaibp_training_bad_input(compiled, capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, captured = _run(capsys, "train", "--method", "qa-ibp", "--arch", "mnist_cnn", "--data",
                          f"npz:{compiled / 'd.npz'}", "--epochs", "1", *args)
    assert code == 2 and message in captured.err and not list(tmp_path.iterdir())
