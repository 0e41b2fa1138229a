"""The command line (arqc/cli.py): working commands, and every bad input ending in one error line, exit
status 2 and no file written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import assert_one_error_line, run_cli

from arqc import archs
from arqc.passes.lower import read_metadata

pytestmark = pytest.mark.usefixtures("one_thread")

UNTRACEABLE = """
import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = torch.relu(x)
        return self.fc(x.mean((2, 3)))


def make():
    return Gate()
"""
IF_LINE = next(i for i, line in enumerate(UNTRACEABLE.splitlines(), 1) if "if x.sum()" in line)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Model, data and policy files of every kind the tests below feed to the CLI."""
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    resnet20 = archs.build("resnet20")
    torch.save(resnet20.state_dict(), d / "resnet20.pt")
    torch.save(archs.build("resnet32").state_dict(), d / "resnet32.pt")
    torch.save(resnet20, d / "pickled.pt")
    data = (d / "resnet20.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    rng = np.random.default_rng(1)
    np.savez(d / "calib.npz", x=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 32))
    (d / "unknown_layer.json").write_text(json.dumps({"conv1": {"w_bits": 4, "a_bits": 4},
                                                      "layer9.conv": {"w_bits": 4, "a_bits": 4}}))
    (d / "nine_bits.json").write_text(json.dumps({"conv1": {"w_bits": 9, "a_bits": 4}}))
    (d / "not_json.json").write_text("{conv1: 4")
    (d / "user_untraceable.py").write_text(textwrap.dedent(UNTRACEABLE))
    return {p.stem: p for p in d.iterdir()} | {"dir": d}


BAD = [
    ("missing file", ["{dir}/nope.pt", "--arch", "resnet20"], ["does not exist"]),
    ("random bytes", ["{random}", "--arch", "resnet20"], ["corrupt"]),
    ("truncated", ["{truncated}", "--arch", "resnet20"], ["corrupt"]),
    ("pickle untrusted", ["{pickled}", "--arch", "resnet20"], ["--trust-pickle"]),
    ("unknown arch", ["{resnet20}", "--arch", "resnet21"], ["unknown arch 'resnet21'"]),
    ("arch mismatch", ["{resnet32}", "--arch", "resnet20"], ["do not fit arch 'resnet20'"]),
    ("no arch", ["{resnet20}"], ["--arch"]),
    ("unknown layer", ["{resnet20}", "--arch", "resnet20", "--policy", "{unknown_layer}"], ["layer9.conv"]),
    ("policy bits", ["{resnet20}", "--arch", "resnet20", "--policy", "{nine_bits}"], ["conv1.w_bits = 9"]),
    ("policy json", ["{resnet20}", "--arch", "resnet20", "--policy", "{not_json}"], ["not valid JSON"]),
    ("policy missing", ["{resnet20}", "--arch", "resnet20", "--policy", "{dir}/none.json"],
     ["does not exist"]),
    ("bits 9", ["{resnet20}", "--arch", "resnet20", "--bits", "9"], ["--bits = 9"]),
    ("bits 1", ["{resnet20}", "--arch", "resnet20", "--bits", "1"], ["--bits = 1"]),
    ("w-bits 16", ["{resnet20}", "--arch", "resnet20", "--w-bits", "16"], ["--w-bits = 16"]),
    ("a-bits 0", ["{resnet20}", "--arch", "resnet20", "--w-bits", "8", "--a-bits", "0"], ["--a-bits = 0"]),
    ("bits not int", ["{resnet20}", "--arch", "resnet20", "--bits", "four"], ["four"]),
    ("policy and bits", ["{resnet20}", "--arch", "resnet20", "--bits", "4", "--policy", "{nine_bits}"],
     ["not both"]),
    ("untraceable factory", ["--arch", "user_untraceable:make", "--input-shape", "3,8,8"],
     [f"user_untraceable.py:{IF_LINE}", "if x.sum() > 0", "leaf"]),
    ("factory missing", ["--arch", "user_untraceable:nothing", "--input-shape", "3,8,8"],
     ["cannot import arch factory"]),
    ("bad input shape", ["--arch", "user_untraceable:make", "--input-shape", "3,8"], ["C,H,W"]),
    ("no input shape", ["--arch", "user_untraceable:make"], ["--input-shape"]),
]


def _argv(template: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in template]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# every case through analyze; those with a model file through compile too (compile takes no bare --arch)
COMMAND_CASES = ([("analyze", *b) for b in BAD]
                 + [("compile", *b) for b in BAD if not b[1][0].startswith("--")])


@pytest.mark.parametrize("command, case, argv, fragments", COMMAND_CASES, ids=[f"{c[0]}-{c[1]}" for c in
                                                                              COMMAND_CASES])
def test_bad_input_is_one_error_line(files, tmp_path, capsys, monkeypatch, command, case, argv, fragments):
    monkeypatch.syspath_prepend(str(files["dir"]))
    argv = _argv(argv, files)
    if command == "compile":
        argv = ["compile", *argv, "-o", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.json"),
                "--data", f"npz:{files['calib']}"]
        if not any(a in argv for a in ("--bits", "--w-bits", "--policy")):
            argv += ["--bits", "8"]
    else:
        argv = ["analyze", *argv, "--json", str(tmp_path / "p.json")]
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, *fragments)
    assert _leftovers(tmp_path) == []  # neither the output nor a temporary file


def test_compile_refuses_uncalibrated_activations(files, tmp_path, capsys):
    code, _, err = run_cli(["compile", str(files["resnet20"]), "--arch", "resnet20", "--bits", "8",
                            "-o", str(tmp_path / "m.onnx")], capsys)
    assert_one_error_line(code, err, "calibration images", "--data")
    assert _leftovers(tmp_path) == []


def test_compile_needs_a_precision(files, tmp_path, capsys):
    code, _, err = run_cli(["compile", str(files["resnet20"]), "--arch", "resnet20", "--data",
                            f"npz:{files['calib']}", "-o", str(tmp_path / "m.onnx")], capsys)
    assert_one_error_line(code, err, "--bits")
    assert _leftovers(tmp_path) == []


def test_compile_with_data_of_the_wrong_shape(files, tmp_path, capsys):
    np.savez(tmp_path / "mnist_like.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64))
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(["compile", str(files["resnet20"]), "--arch", "resnet20", "--bits", "8", "--data",
                            f"npz:{tmp_path / 'mnist_like.npz'}", "-o", str(out / "m.onnx")], capsys)
    assert_one_error_line(code, err, "1x28x28", "3x32x32")
    assert _leftovers(out) == []


def test_missing_output_option(files, capsys):
    code, _, err = run_cli(["compile", str(files["resnet20"]), "--arch", "resnet20", "--bits", "8"], capsys)
    assert_one_error_line(code, err, "-o")


def test_analyze_and_compile_work(files, tmp_path, capsys):
    code, out, err = run_cli(["analyze", str(files["resnet20"]), "--arch", "resnet20", "--bits", "4"], capsys)
    assert code == 0 and err == "" and "layer3.2.conv2" in out and "1.56% of FP32" in out
    onnx_path, report = tmp_path / "m.onnx", tmp_path / "r.json"
    code, out, err = run_cli(["compile", str(files["resnet20"]), "--arch", "resnet20", "--w-bits", "4",
                              "--a-bits", "8", "--data", f"npz:{files['calib']}", "--calib-images", "16",
                              "-o", str(onnx_path), "--report", str(report)], capsys)
    assert code == 0, err
    assert f"wrote {onnx_path}" in out
    assert _leftovers(tmp_path) == ["m.onnx", "r.json"]
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model)
    meta = read_metadata(model)
    assert meta["arqc.settings"]["calibration_images"] == 16 and meta["arqc.settings"]["arch"] == "resnet20"
    assert meta["arqc.policy"]["layer2.0.conv1"] == {"w_bits": 4, "a_bits": 8}
    data = json.loads(report.read_text())
    assert data["bitops_ratio_fp32"] == 32 / 1024 and data["policy"]["conv1"] == {"w_bits": 4, "a_bits": 8}


def test_trusted_pickle_with_input_shape(files, capsys):
    code, out, err = run_cli(["analyze", str(files["pickled"]), "--trust-pickle", "--input-shape", "3,32,32"],
                             capsys)
    assert code == 0 and "40.55M" in out, err


def _installed_arqc() -> list[str]:
    script = Path(sys.executable).parent / "arqc"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "arqc.cli"]


def test_installed_command_reports_untraceable_factory(files, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(files["dir"]), OMP_NUM_THREADS="1")
    out = tmp_path / "p.json"
    proc = subprocess.run([*_installed_arqc(), "analyze", "--arch", "user_untraceable:make", "--input-shape",
                           "3,8,8", "--json", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert_one_error_line(proc.returncode, proc.stderr, "cannot trace Gate", f"user_untraceable.py:{IF_LINE}")
    assert proc.stdout == "" and _leftovers(tmp_path) == []
