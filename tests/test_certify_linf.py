"""``arqc certify --method ibp``: the CLI around the interval-bound certifier (runtime/ibp.py, verify.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from arqc.cli import main
from arqc.commands.options import parse_epsilon
from arqc.data import load_images
from arqc.passes.policy import uniform
from arqc.pipeline import prepare_model, quantize, to_onnx

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TRAINED = EXAMPLES / "models" / "mnist_cnn_sigma025.pt"  # the shipped Gaussian-trained MNIST CNN
EPSILON = "0.5/255"  # where 3 of the 6 digits below verify with IBP and 3 do not


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The shipped trained mnist_cnn at W4A4, calibrated on 40 shipped calibration digits (c.npz), lowered by
    arqc (m.onnx, beside a copy of the checkpoint, m.pt), and 6 shipped test digits (d.npz) labelled with the
    quantized model's own predictions: a point is never "falsified" by a wrong clean prediction, and at
    EPSILON some points verify and some do not."""
    root = tmp_path_factory.mktemp("ibp")
    shutil.copy(TRAINED, root / "m.pt")
    calib = np.load(EXAMPLES / "data" / "mnist_sample_calib.npz")
    np.savez(root / "c.npz", x=calib["x"][:40], y=calib["y"][:40])
    test = np.load(EXAMPLES / "data" / "mnist_sample_test.npz")
    x = test["x"][2:8]
    np.savez(root / "d.npz", x=x, y=np.zeros(6, dtype=np.int64))
    prep = prepare_model(str(root / "m.pt"))
    sim = quantize(prep, uniform(prep.gm, 4, 4), load_images(f"npz:{root / 'c.npz'}"))
    with torch.no_grad():
        predicted = sim(load_images(f"npz:{root / 'd.npz'}").x).argmax(1).numpy()
    np.savez(root / "d.npz", x=x, y=predicted)
    onnx.save(to_onnx(sim, prep.settings(source=str(root / "m.pt"))), root / "m.onnx")
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
    main(["certify", str(compiled / "m.onnx"), "--method", "ibp", "--epsilon", EPSILON, "--data",
          f"npz:{compiled / 'd.npz'}", "--json", str(out)])
    report = json.loads(out.read_text())
    for key in ("epsilon", "clean_accuracy", "verified_accuracy", "falsified", "timeouts", "points"):
        assert key in report
    assert report["epsilon"] == pytest.approx(0.5 / 255) and len(report["points"]) == 6
    assert report["clean_accuracy"] == 1.0  # the labels are the model's predictions, as onnxruntime judges too
    statuses = [p["status"] for p in report["points"]]
    assert report["verified"] == statuses.count("verified") > 0
    assert report["verified_accuracy"] == pytest.approx(statuses.count("verified") / 6)
    assert statuses.count("verified") < 6  # the bounds are not vacuously positive
    for p in report["points"]:  # a verified point has a positive sound margin, and only then
        assert p["predicted"] == p["label"]
        assert (p["status"] == "verified") == (p["margin_lower"] > 0)


def test_checkpoint_with_bits_gives_the_same_verdicts_as_its_onnx(compiled, capsys):
    a, b = compiled / "a.json", compiled / "b.json"
    data = f"npz:{compiled / 'd.npz'}"
    main(["certify", str(compiled / "m.onnx"), "--method", "ibp", "--epsilon", EPSILON, "--data", data,
          "--json", str(a)])
    main(["certify", str(compiled / "m.pt"), "--method", "ibp", "--epsilon", EPSILON, "--data", data,
          "--bits", "4", "--calib-data", f"npz:{compiled / 'c.npz'}", "--json", str(b)])
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["judge"] == "onnxruntime" and rb["judge"] == "torch simulation"
    assert len(ra["points"]) == len(rb["points"]) == 6
    for pa, pb in zip(ra["points"], rb["points"], strict=True):  # point by point: same network, same verdict
        assert pa["id"] == pb["id"] and pa["predicted"] == pb["predicted"] == pa["label"]
        assert pa["status"] == pb["status"], (pa, pb)
        assert pa["margin_lower"] == pytest.approx(pb["margin_lower"], rel=1e-3, abs=1e-3), (pa, pb)
    statuses = [p["status"] for p in ra["points"]]
    assert "verified" in statuses and set(statuses) != {"verified"}  # both kinds of verdict were compared


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
    """A short QA-IBP fine-tuning (W4A4, epsilon 1/255) of the shipped trained CNN on 6 digits: the ONNX file
    it writes certifies some of them at the training radius with IBP, predicting them all right, and its sound
    margins there are better than those of the network it started from (measured: mean -26.5 before, -10.8
    after)."""
    out, report, before = compiled / "qa.onnx", compiled / "qa.json", compiled / "init.json"
    calib = np.load(EXAMPLES / "data" / "mnist_sample_calib.npz")
    np.savez(compiled / "t.npz", x=calib["x"][:6], y=calib["y"][:6])
    data = f"npz:{compiled / 't.npz'}"
    main(["train", "--method", "qa-ibp", "--arch", "mnist_cnn", "--init", str(compiled / "m.pt"), "--data", data,
          "--epsilon", "1/255", "--bits", "4", "--epochs", "2", "--batch-size", "6", "--lr", "1e-3",
          "--device", "cpu", "-o", str(out)])
    main(["certify", str(out), "--method", "ibp", "--epsilon", "1/255", "--data", data, "--json", str(report)])
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["arqc.policy"])["conv1"] == {"w_bits": 4, "a_bits": 4}
    training = json.loads(meta["arqc.settings"])["training"]
    assert training["method"] == "qa-ibp" and training["epsilon"] == pytest.approx(1 / 255)
    assert len(training["history"]) == 2
    result = json.loads(report.read_text())
    assert len(result["points"]) == 6 and result["clean_accuracy"] == 1.0
    assert result["verified"] >= 1, [p["margin_lower"] for p in result["points"]]
    main(["certify", str(compiled / "m.pt"), "--method", "ibp", "--epsilon", "1/255", "--data", data, "--bits", "4",
          "--calib-data", data, "--json", str(before)])
    assert _mean_margin(result) > _mean_margin(json.loads(before.read_text())) + 5


def _mean_margin(report: dict) -> float:
    return float(np.mean([p["margin_lower"] for p in report["points"]]))


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
