"""examples/arq_experiment.py end to end on the smallest inputs: the table, the per-layer policies, and
--table-only, which rebuilds the same file from the reports a run left in its work directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "arq_experiment.py"


def test_experiment_table_and_rebuild(search_inputs, tmp_path):
    root = search_inputs
    out, work = tmp_path / "table.md", tmp_path / "work"
    args = [sys.executable, str(SCRIPT), "--model", str(root / "m.pt"), "--train", f"npz:{root / 'train.npz'}",
            "--test", f"npz:{root / 'test.npz'}", "--out", str(out), "--workdir", str(work), "--sigma", "0.25",
            "--budgets", "5%", "--methods", "uniform,greedy", "--episodes", "2", "--warmup", "1",
            "--search-images", "6", "--cache-n", "40", "--search-n", "20", "--test-images", "4", "--n", "40",
            "--n0", "10", "--finetune-epochs", "0"]
    # the script calibrates on 256 training images by default; the fixture has 40, so this must fail cleanly
    failed = subprocess.run(args, capture_output=True, text=True)
    assert failed.returncode == 2 and not out.exists()
    assert failed.stderr.startswith("error: ") and "lower --search-images" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1

    args += ["--calib-images", "16"]
    subprocess.run(args, check=True, capture_output=True, text=True)
    table = out.read_text()
    lines = table.splitlines()
    rows = [line for line in lines if line.startswith("| 5% |")]
    assert [row.split(" | ")[1].split()[0] for row in rows] == ["uniform", "greedy"]
    assert "n = 40, n0 = 10, α = 0.001, σ = 0.25" in table and "on 4 test images" in table
    command = table.split("Command: `")[1]
    assert "--finetune-data" not in command and "None" not in command  # not given: left out, rerunnable
    for method in ("uniform", "greedy"):  # each row's numbers are its report's
        report = json.loads((work / f"{method}_5" / "report.json").read_text())
        row = next(r for r in rows if r.split(" | ")[1].startswith(method))
        assert f"| {report['acr']:.3f} |" in row and f"{100 * report['bitops_ratio_fp32']:.3f}" in row
    policy_rows = [line for line in lines[lines.index("Bits per layer (weights/activations) at 5%:"):]
                   if line.startswith("| ") and "/" in line.split(" | ")[-1]]
    assert len(policy_rows) == len(report["layers"])  # one row per layer, a w/a pair per method
    first = report["layers"][0]["name"]
    assert any(r.startswith(f"| {first} |") and r.endswith("| 8/8 | 8/8 |") for r in policy_rows)  # fixed at 8

    out.unlink()
    subprocess.run(args + ["--table-only"], check=True, capture_output=True, text=True)
    assert out.read_text() == table

    # finished rows are not run again: without their QAT checkpoints and certification states (what a copy of
    # the work directory's small files lacks), rerunning the command gives the same table from the reports
    heavy = [p for p in work.rglob("*") if p.name in ("qat.pt", "certify_quantized.jsonl", "certify_fp32.jsonl")]
    assert heavy
    for path in heavy:
        path.unlink()
    subprocess.run(args, check=True, capture_output=True, text=True)
    assert out.read_text() == table and not any(path.exists() for path in heavy)
