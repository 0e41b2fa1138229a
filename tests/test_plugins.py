"""Ops arqc does not know: the one-line error that names the op, the node, the model's source line and the extension
point; and the extension point itself, with the worked example of the README (examples/ops_plugin: nn.ELU),
loaded both ways (``$ARQC_OPS`` and an installed package's entry point of group ``arqc.ops``).

Plugins register into the process-wide registry, so everything that loads one runs in a subprocess: the other
tests keep a registry without ELU. Oracles: onnxruntime for the lowering, the simulation's own forward on points
of the box for the bounds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from arqc.base import ArqcError
from arqc.passes.capture import capture

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "ops_plugin"


class EluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ELU(alpha=0.5)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = self.act(self.conv(x))  # the line the error names
        return self.fc(torch.flatten(y, 1))


def test_an_unknown_op_is_one_line_naming_op_node_source_line_and_extension_point():
    with pytest.raises(ArqcError) as caught:
        capture(EluNet().eval(), torch.zeros(1, 3, 8, 8))
    message = str(caught.value)
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1) if "the line the error" in text)
    assert "\n" not in message
    assert "unsupported op ELU in node 'act'" in message
    assert f"at test_plugins.py:{line} (y = self.act(self.conv(x))" in message
    assert "'arqc.ops'" in message and "ARQC_OPS" in message


SCRIPT = textwrap.dedent("""
    import numpy as np, onnxruntime as ort, torch
    from arqc.passes.analysis import analyze
    from arqc.passes.capture import capture
    from arqc.passes.lower import lower
    from arqc.passes.policy import apply_policy, uniform
    from arqc.passes.quantize import simulate
    from arqc.runtime.ibp import input_box, interval_bounds
    from test_plugins import EluNet
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    gm = analyze(capture(EluNet().eval(), x[:1]))
    kinds = [n.meta["arqc"].kind for n in gm.graph.nodes]
    apply_policy(gm, uniform(gm, 8, 8))
    sim = simulate(gm, [torch.rand(8, 3, 8, 8)])
    with torch.no_grad():
        ref = sim(x).numpy()
    out = ort.InferenceSession(lower(sim, {}).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    lo, hi = input_box(x[:4], 4 / 255)
    b_lo, b_hi = interval_bounds(sim, lo, hi)
    inside = True
    for _ in range(20):
        with torch.no_grad():
            y = sim(lo + (hi - lo) * torch.rand_like(lo))
        inside &= bool(((y >= b_lo) & (y <= b_hi)).all())
    print("elu" in kinds, float(np.abs(out - ref).max() / np.abs(ref).max()), inside)
""")


def _run(env: dict, extra_path: list[Path]) -> str:
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(map(str, [*extra_path, ROOT / "tests"]))}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _check(words: list[str]) -> None:
    has_elu, error, inside = words
    assert has_elu == "True"
    assert float(error) < 1e-5  # float ELU between Q/DQ: ulps apart
    assert inside == "True"


def test_the_worked_example_loads_from_the_environment_variable():
    _check(_run({"ARQC_OPS": "arqc_elu"}, [PLUGIN]))


def test_the_worked_example_loads_as_an_installed_entry_point(tmp_path):
    """What ``pip install examples/ops_plugin`` leaves for importlib.metadata: a dist-info folder whose
    entry_points.txt declares the module (written here by hand; the module itself comes from the example)."""
    info = tmp_path / "arqc_elu-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: arqc-elu\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[arqc.ops]\nelu = arqc_elu\n")
    _check(_run({"ARQC_OPS": ""}, [tmp_path, PLUGIN]))


def test_a_plugin_that_fails_to_import_is_one_line(tmp_path):
    (tmp_path / "broken_ops.py").write_text("raise ImportError('needs a library that is not installed')\n")
    env = {**os.environ, "ARQC_OPS": "broken_ops", "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "arqc.cli", "analyze", "--arch", "resnet20"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "arqc: error: cannot load the op plugin 'broken_ops' (ImportError: needs a library that is not installed); "
        "fix it, or remove it from ARQC_OPS / uninstall the package that declares it"]
