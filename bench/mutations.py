"""Mutation check: each deliberate bug below must turn at least one test red.

For every mutation, the working tree (the files git tracks or would track) is copied into a scratch folder,
laid out as it installs (passes/ → arqc/passes, runtime/ → arqc/runtime, so the copy imports as itself and not
the editable install), one bug is applied there, and the tests named for it run against the copy (all of them,
or up to the first failure with --fast). One line per mutation says which test caught it (and how many more
did), or MISSED. Before the mutations, the same tests run on the unmutated copy and must pass, so a red test
means the bug, not a broken test. The real tree is never touched. Exit status 1 when a mutation is missed (or
the baseline is red).

    python bench/mutations.py [--only NAME ...] [--fast] [--list]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_AS = {"passes": "arqc/passes", "runtime": "arqc/runtime"}  # setup.cfg package_dir


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or files expected to catch it


MUTATIONS = [
    # statistics (DESIGN §3)
    Mutation("point-estimate zeta (IRS)", "runtime/irs.py",
             "zeta = upper_confidence_bound(k, n_prime, alpha_zeta)", "zeta = k / n_prime",
             ("tests/test_irs.py",)),
    Mutation("IRS ignores zeta", "runtime/irs.py",
             "pA_lower = point.pA_lower - zeta", "pA_lower = point.pA_lower",
             ("tests/test_irs.py",)),
    Mutation("point-estimate pA_lower (CERTIFY)", "runtime/smoothing.py",
             "return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))", "return k / n",
             ("tests/test_smoothing.py",)),
    Mutation("cA from the estimation samples", "runtime/smoothing.py",
             "    cA = int(counts0.argmax())\n"
             "    predictions = sample_predictions(backend, x, sigma, n, batch_size, seed, Phase.ESTIMATION)\n",
             "    predictions = sample_predictions(backend, x, sigma, n, batch_size, seed, Phase.ESTIMATION)\n"
             "    cA = int(np.bincount(predictions).argmax())\n",
             ("tests/test_smoothing.py",)),
    Mutation("noise seeded by position, not image id", "runtime/run.py",
             "point = _certify_point(backend, images[i], labels[i], ids[i], sigma, n0, n, alpha, batch_size,\n"
             "                                   seed, irs_cache, gamma, alpha_zeta)",
             "point = {**_certify_point(backend, images[i], labels[i], i, sigma, n0, n, alpha, batch_size,\n"
             "                                   seed, irs_cache, gamma, alpha_zeta), \"index\": ids[i]}",
             ("tests/test_certify_l2.py",)),
    # interval bounds (DESIGN §4)
    Mutation("dropped IBP rounding margin", "passes/ops/rounding.py",
             "return terms * U32 / (1 - terms * U32) + (terms + 4) * u / (1 - (terms + 4) * u)", "return 0.0",
             ("tests/test_ibp.py",)),
    Mutation("IBP margins inflated 10^6 times", "passes/ops/rounding.py",
             "return terms * U32 / (1 - terms * U32) + (terms + 4) * u / (1 - (terms + 4) * u)",
             "return 1e6 * (terms * U32 / (1 - terms * U32) + (terms + 4) * u / (1 - (terms + 4) * u))",
             ("tests/test_ibp.py",)),
    # quantization semantics (DESIGN §2)
    Mutation("round half up in the simulation", "passes/quantize.py",
             "q = torch.round(x / scale) + zero_point", "q = torch.floor(x / scale + 0.5) + zero_point",
             ("tests/test_lower.py",)),
    # integer-only inference (DESIGN §2 revised)
    Mutation("adds left float (no requant after an add)", "passes/quantize.py",
             'REQUANTIZED_OPS = ("add", "cat",', 'REQUANTIZED_OPS = ("cat",', ("tests/test_lower.py",)),
    Mutation("odd zero points on requant grids", "passes/quantize.py",
             "self.act = self.calibrated(self.bits, self.signed, even_zero=True)",
             "self.act = self.calibrated(self.bits, self.signed, even_zero=False)", ("tests/test_lower.py",)),
    Mutation("requant bounds ignore the rounding", "passes/ops/quant.py",
             "return _quantizer_interval(module.act, lo[0], hi[0])", "return lo[0], hi[0]", ("tests/test_ibp.py",)),
    Mutation("sub-8-bit inputs not clamped in ONNX", "passes/lower.py",
             "        if act.bits < 8:\n            low, high", "        if act.bits < 0:\n            low, high",
             ("tests/test_lower.py",)),
    Mutation("old-semantics state files accepted", "runtime/run.py",
             'check_semantics(old.get("semantics"), f"state',
             '(lambda *a: None)(old.get("semantics"), f"state', ("tests/test_certify_l2.py",)),
    # training
    Mutation("ignored --init", "arqc/train.py",
             "    if cfg.init:\n        model = _init_model(cfg.init, cfg.arch)",
             "    if cfg.init and False:\n        model = _init_model(cfg.init, cfg.arch)",
             ("tests/test_train.py",)),
    Mutation("training takes no step", "arqc/train.py", "        optimizer.step()\n", "        pass\n",
             ("tests/test_train.py",)),
    Mutation("--seed left out of the training stream", "arqc/train.py",
             "gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)",
             "gen = torch.Generator().manual_seed(epoch)", ("tests/test_train.py",)),
    Mutation("QAT ignores sigma (same random draws)", "arqc/qat.py",
             "x = x + sigma * torch.randn(x.shape, generator=gen)", "x = x + 0 * torch.randn(x.shape, generator=gen)",
             ("tests/test_qat.py",)),
    Mutation("QA-IBP does not learn", "arqc/qaibp.py",
             "optimizer = torch.optim.Adam(params, lr=lr)", "optimizer = torch.optim.Adam(params, lr=0.0)",
             ("tests/test_certify_linf.py",)),
    Mutation("adds read their operands without the repeated Q/DQ pair", "passes/lower.py",
             "        if g is None:\n            return dq\n        q = self.op(\"QuantizeLinear\", [dq, g.scale",
             "        if True:\n            return dq\n        q = self.op(\"QuantizeLinear\", [dq, g.scale",
             ("tests/test_openvino.py",)),
    Mutation("sub-8-bit requantization of a grid keeps odd zero points", "passes/lower.py",
             "        zero -= zero % 2  # signed", "        zero -= 0  # signed", ("tests/test_lower.py",)),
    Mutation("activation bounds skip the interior minimum", "passes/ops/activations.py",
             "        low = torch.where((lo <= x_star) & (hi >= x_star), torch.full_like(low, f_star), low)",
             "        pass", ("tests/test_float_ops.py",)),
    Mutation("activation bounds without the float32 margin", "passes/ops/activations.py",
             "ULPS = 64 ", "ULPS = 0 ", ("tests/test_float_ops.py",)),
    Mutation("mean bounds without the rounding margin", "passes/ops/pooling.py",
             "lambda: _mean_error(average, terms, lo[:1], hi[:1]), sound)", "lambda: 0.0, sound)",
             ("tests/test_float_ops.py",)),
    Mutation("reshape and permute end the grid", "passes/quantize.py",
             '"flatten", "reshape", "permute", "slice"', '"flatten", "slice"', ("tests/test_float_ops.py",)),
    Mutation("every chunk piece starts at 0", "passes/capture.py",
             "    start = sum(sizes[:i])", "    start = 0", ("tests/test_float_ops.py",)),
    Mutation("standalone BatchNorm bounds ignore negative scales", "passes/ops/elementwise.py",
             "low, high = torch.minimum(a, b) + shift, torch.maximum(a, b) + shift", "low, high = a + shift, b + shift",
             ("tests/test_float_ops.py",)),
    Mutation("sub-8-bit requantization of a grid never clips", "passes/lower.py",
             "        if clip:\n", "        if False:\n", ("tests/test_lower.py",)),
    # softmax and layer norm (passes/ops/normalization.py)
    Mutation("softmax upper bound from the upper ends of the others", "passes/ops/normalization.py",
             "high = torch.sigmoid(hi_ - _exclusive_logsumexp(lo_, pad))",
             "high = torch.sigmoid(hi_ - _exclusive_logsumexp(hi_, pad))", ("tests/test_norm_ops.py",)),
    Mutation("softmax bounds without the float32 margin", "passes/ops/normalization.py",
             "    rel = (1 + forward) * (1 + own) - 1\n", "    rel = 0 * forward\n", ("tests/test_norm_ops.py",)),
    Mutation("softmax fused into onnxruntime's QLinearSoftmax", "passes/ops/normalization.py",
             "        if x in b.grids:\n", "        if False:\n", ("tests/test_norm_ops.py",)),
    Mutation("layer norm bounds without the float32 margin", "passes/ops/normalization.py",
             "        z_lo, z_hi = _layer_norm_margin(lo, hi, z_lo, z_hi, d_lo, d_hi, var_lo, var_hi, eps)\n",
             "        pass\n", ("tests/test_norm_ops.py",)),
    Mutation("layer norm variance bound ignores deviations that can be 0", "passes/ops/normalization.py",
             "square_min = torch.where(d_lo > 0, d_lo * d_lo, torch.where(d_hi < 0, d_hi * d_hi, zero))",
             "square_min = torch.minimum(d_lo * d_lo, d_hi * d_hi)", ("tests/test_norm_ops.py",)),
    Mutation("layer norm bounds ignore negative weights", "passes/ops/normalization.py",
             "low, high = torch.minimum(a, b) + shift, torch.maximum(a, b) + shift", "low, high = a + shift, b + shift",
             ("tests/test_norm_ops.py",)),
    Mutation("layer norm z without the tie of d to the variance", "passes/ops/normalization.py",
             "return d / (torch.maximum(var_lo, d * d / (n - 1)) + eps).sqrt().clamp_min(tiny)",
             "return d / (var_lo + eps).sqrt().clamp_min(tiny)", ("tests/test_norm_ops.py",)),
    Mutation("layer norm margin without its wide-box bound", "passes/ops/normalization.py",
             "torch.maximum(torch.maximum(low1, low2), -bound), torch.minimum(torch.minimum(high1, high2), bound)",
             "torch.maximum(low1, low2), torch.minimum(high1, high2)", ("tests/test_norm_ops.py",)),
    # attention and the rearrangements around it (passes/ops/layers.py, passes/capture.py, passes/rewrites.py)
    Mutation("matmul bounds without the product of the radii", "passes/ops/layers.py",
             "torch.matmul(a_r, b_c.abs() + b_r)", "torch.matmul(a_r, b_c.abs())", ("tests/test_attention.py",)),
    Mutation("matmul's second operand lowered unquantized", "passes/lower.py",
             "        if second is not None and second.bits < FP32 and not second.grid_input:\n",
             "        if False:\n", ("tests/test_attention.py",)),
    Mutation("attention without the 1/sqrt(d) scale", "passes/capture.py",
             "call(\"mul\", scores, 1.0 / math.sqrt(d))", "call(\"mul\", scores, 1.0)", ("tests/test_attention.py",)),
    Mutation("roll lowered in the wrong direction", "passes/ops/shape.py",
             "((shape[dim] - shift, shape[dim], \"tail\"), (0, shape[dim] - shift, \"head\"))",
             "((shift, shape[dim], \"tail\"), (0, shift, \"head\"))", ("tests/test_attention.py",)),
    Mutation("Swin's shifted windows without their mask", "passes/rewrites.py",
             "        attn = attn + add_constant(gm, node, \"shift_mask\", mask, tracer)\n", "        pass\n",
             ("tests/test_attention.py",)),
    Mutation("constants not folded", "passes/capture.py", "    _fold_constants(gm)\n", "",
             ("tests/test_attention.py",)),
    Mutation("greedy probes not restored", "passes/quantize.py",
             "        m.w_bits, m.a_bits, m.act = FP32, FP32, saved[0]\n", "        pass\n",
             ("tests/test_attention.py",)),
    Mutation("op plugins never loaded", "passes/capture.py", "    ops.load_plugins()\n", "",
             ("tests/test_plugins.py",)),
    Mutation("uneven adaptive pools as even ones", "passes/ops/pooling.py",
             "        if h % oh == 0 and w % ow == 0:\n", "        if True:\n", ("tests/test_float_ops.py",)),
    # scale-out on Ray (DESIGN §6)
    Mutation("Ray chunks yielded as they finish, not in order", "runtime/cluster.py",
             "                while following in done:\n                    yield done.pop(following)\n",
             "                while done:\n                    yield done.pop(next(iter(done)))\n",
             ("tests/test_ray.py",)),
    Mutation("Ray workers' comparison counts dropped", "runtime/cluster.py",
             "                        c.samples += samples\n", "                        c.samples += 0\n",
             ("tests/test_ray.py",)),
    Mutation("Ray worker keeps the first model it built", "runtime/cluster.py",
             "        backend = self.backends.get(key)\n",
             "        backend = next(iter(self.backends.values()), None)\n",
             ("tests/test_ray.py",)),
    # calibration choices, learned step sizes, bias correction (#18)
    Mutation("LSQ's scale gradient below the range as above it", "passes/quantize.py",
             "d_elem = torch.where(below, float(ctx.qmin - z)", "d_elem = torch.where(below, float(ctx.qmax - z)",
             ("tests/test_calibration.py",)),
    Mutation("mse activation calibration keeps min/max", "passes/quantize.py",
             '        if calibration == "mse" and hi > lo:\n', '        if calibration == "never" and hi > lo:\n',
             ("tests/test_calibration.py",)),
    Mutation("mse calibration skips the finer grid", "passes/quantize.py",
             "        ratios = (best[:, None] + step * torch.linspace(-1, 1, 21)).clamp(max=1.0)\n",
             "        ratios = (best[:, None] + step * torch.linspace(-1, 1, 21)).clamp(max=1.0)\n        break\n",
             ("tests/test_calibration.py",)),
    Mutation("float scales left on rounding ties", "passes/quantize.py",
             "        chosen = off_ties(inputs[0].detach(), m.act)\n", "        chosen = m.act\n",
             ("tests/test_calibration.py", "tests/test_openvino.py")),
    Mutation("float inputs quantized without rounding first", "passes/lower.py",
             "        if numpy_helper.to_array(self.initializers[zero]) != 0:\n",
             "        if False:\n",
             ("tests/test_openvino.py",)),
    Mutation("layer-by-layer check not fed the runtime's values", "runtime/layerwise.py",
             "            return ((theirs - int(zero)).to(own.dtype) * torch.tensor(scale, dtype=own.dtype))\n",
             "            return own\n",
             ("tests/test_layerwise.py",)),
    Mutation("compile --verify accepts a file whose grid is not the simulation's", "runtime/layerwise.py",
             "    if report.other_grids:\n", "    if False:\n",
             ("tests/test_certify_l2.py::test_compile_verify_refuses_a_wrong_quantizer_layer_by_layer",)),
    Mutation("learned scales not written back", "passes/quantize.py",
             '            m.act = dataclasses.replace(m.act, scale=scale, method=f"{m.act.method}, lsq")\n',
             '            m.act = dataclasses.replace(m.act, method=f"{m.act.method}, lsq")\n',
             ("tests/test_calibration.py",)),
    Mutation("bias correction from the float bias", "passes/quantize.py",
             "            layer.bias.copy_(layer.effective_bias().detach() - shift.to(layer.bias.dtype))\n",
             "            layer.bias.copy_(layer.bias.detach() - shift.to(layer.bias.dtype))\n",
             ("tests/test_calibration.py",)),
    Mutation("distillation teacher sees the clean images", "arqc/qat.py",
             "                    target = torch.log_softmax(teacher(x), dim=1)\n",
             "                    target = torch.log_softmax(teacher(images[idx].to(dev)), dim=1)\n",
             ("tests/test_qat.py",)),
    Mutation("distillation weight ignored", "arqc/qat.py",
             "                loss = (1 - distill) * loss + distill * kl\n", "                loss = loss + 0 * kl\n",
             ("tests/test_qat.py",)),
    Mutation("unfolded BatchNorm scales gradients by g, not g²", "arqc/qat.py",
             "        factor = info.bn_scale.to(weight.device).square().reshape((-1,) + (1,) * (weight.dim() - 1))\n",
             "        factor = info.bn_scale.to(weight.device).reshape((-1,) + (1,) * (weight.dim() - 1))\n",
             ("tests/test_qat.py",)),
    Mutation("fold records no BatchNorm scale", "passes/capture.py",
             "        info.bn_scale = (g if info.bn_scale is None else info.bn_scale.double() * g).float()\n",
             "        pass\n",
             ("tests/test_qat.py",)),
    # adaptive reward precision (#18)
    Mutation("refined reward forgets the search images", "arqc/arq.py",
             '            return (n * episode["reward"] + r * value) / (n + r), {"images": n + r, **info}\n',
             '            return value, {"images": n + r, **info}\n',
             ("tests/test_arq.py",)),
    Mutation("refine scores the worst candidates", "passes/search/loop.py",
             '    rank = sorted(episodes, key=lambda e: (-e["reward"], e["episode"]))\n',
             '    rank = sorted(episodes, key=lambda e: (e["reward"], e["episode"]))\n',
             ("tests/test_search.py", "tests/test_arq.py")),
    Mutation("the search returns the best coarse reward after refining", "passes/search/loop.py",
             '    return max(refined, key=lambda e: e["refined_reward"]) if refined else '
             'max(episodes, key=lambda e: e["reward"])\n',
             '    return max(episodes, key=lambda e: e["reward"])\n',
             ("tests/test_search.py",)),
]


def scratch_copy(dest: Path) -> None:
    """The tracked (and untracked, not ignored) files of the tree, laid out as installed, beside ../shared."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree
        top, _, rest = rel.partition("/")
        target = dest / (f"{INSTALLED_AS[top]}/{rest}" if top in INSTALLED_AS else rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    shared = ROOT.parent / "shared"
    if shared.exists():
        os.symlink(shared, dest.parent / "shared")  # the tests find ../shared beside the checkout


def located(copy: Path, rel: str) -> Path:
    top, _, rest = rel.partition("/")
    return copy / (f"{INSTALLED_AS[top]}/{rest}" if top in INSTALLED_AS else rel)


def run_tests(copy: Path, tests: tuple[str, ...], first_only: bool = False) -> tuple[list[str], str, float]:
    """(the tests that failed or errored, pytest's last line, seconds)."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", *(["-x"] if first_only else []), "-q", "-rfE",
                           "-p", "no:cacheprovider", *tests], cwd=copy, env=env, capture_output=True, text=True)
    red = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode != 0 and not red:
        red = [f"(pytest exit {proc.returncode}: {last})"]
    return red, last, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="Run only the mutations whose name contains one of these.")
    parser.add_argument("--list", action="store_true", help="List the mutations and exit.")
    parser.add_argument("--fast", action="store_true", help="Stop each mutation's tests at the first failure.")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or any(o in m.name for o in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path} ({', '.join(m.tests)})")
        return 0
    with tempfile.TemporaryDirectory(prefix="arqc-mutations-") as tmp:
        pristine = Path(tmp) / "pristine" / "main"
        scratch_copy(pristine)
        for m in chosen:  # every mutation must still apply to the code as it is now
            count = located(pristine, m.path).read_text().count(m.old)
            if count != 1:
                print(f"{m.name}: its code occurs {count} times in {m.path}; update bench/mutations.py")
                return 1
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        red, last, seconds = run_tests(pristine, tests)
        print(f"baseline (no mutation): {'RED: ' + ', '.join(red) if red else 'green'} ({last}; {seconds:.0f} s)")
        if red:
            return 1
        missed = 0
        for i, m in enumerate(chosen):
            copy = Path(tmp) / f"m{i}" / "main"
            shutil.copytree(pristine, copy, symlinks=True)
            if (pristine.parent / "shared").exists():
                os.symlink(os.readlink(pristine.parent / "shared"), copy.parent / "shared")
            target = located(copy, m.path)
            target.write_text(target.read_text().replace(m.old, m.new))
            red, _, seconds = run_tests(copy, m.tests, first_only=args.fast)
            missed += not red
            caught = f"caught by {red[0]}" + (f" and {len(red) - 1} more" if len(red) > 1 else "") if red else ""
            print(f"{m.name} ({m.path}): {caught if red else 'MISSED by ' + ', '.join(m.tests)} ({seconds:.0f} s)",
                  flush=True)
            shutil.rmtree(copy.parent)
        print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
        return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
