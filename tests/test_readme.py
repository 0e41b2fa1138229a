"""The README's Python example runs as written and gives the numbers the CLI gives."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme:python-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its marked Python example"
    return block.group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    code = readme_example()
    work = tmp_path / "repo"
    (work / "out").mkdir(parents=True)
    for name in ("examples",):  # the example reads the shipped model and images by relative paths
        os.symlink(ROOT / name, work / name)
    monkeypatch.chdir(work)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().split("\n")
    assert float(lines[0]) == 1 / 64  # W4A4 is 16/1024 of FP32 BitOps, whatever the weights
    accuracy, acr, compile_acr = (float(v) for v in lines[1].split())
    # n = 200 at alpha = 0.001 caps pA_lower at 0.001 ** (1 / 200), so no radius exceeds 0.25 * Phi^-1(0.966) = 0.457;
    # the shipped model certifies (nearly) all of the 10 images at that cap
    assert accuracy >= 0.8 and 0.3 < acr <= 0.4565
    assert acr == compile_acr  # certify() on the saved file = compile's certificate of the same bytes, same seed
    assert (work / "out" / "api_w8a8.onnx").stat().st_size > 0
