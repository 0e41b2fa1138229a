"""L∞ certification of a data set with IBP, optionally completed by the verifier (DESIGN §4).

``certify_ibp`` returns the JSON report of ``arqc certify --method ibp``; ``format_linf_report`` is its table;
``quantized_model`` loads the network it bounds.
Point statuses: "verified" (certified for every input in the box), "falsified" (an input in the box that the
quantized network misclassifies: the clean image itself, or a grid point found by the attack or the
verifier, confirmed by the ONNX model when one is given), "timeout" (the complete verifier ran out of time),
"unknown" (IBP alone could not certify and no counterexample was found).
"""

from __future__ import annotations

import time

import torch
import torch.fx

from arqc.base import ArqcError
from arqc.data import ImageSet
from arqc.onnx_import import simulation_from_onnx
from arqc.passes.quantize import QuantLayer
from arqc.pipeline import load_data, prepare_model, quantize, resolve_policy
from arqc.runtime.devices import resolve_device
from arqc.runtime.ibp import check_epsilon, check_supported, input_box, margin_bounds, worst_margin
from arqc.runtime.verify import (
    LEVELS,
    grid_attack,
    grid_box,
    on_grid,
    onnx_oracle,
    torch_oracle,
    verify_complete,
)
from arqc.settings import CompileSettings

STATUSES = ("verified", "falsified", "timeout", "unknown")


def quantized_model(model: str, *, arch: str | None = None, trust_pickle: bool = False,
                    input_shape: tuple[int, ...] | None = None, bits: int | None = None, w_bits: int | None = None,
                    a_bits: int | None = None, policy: str | None = None, calib_data: str | None = None
                    ) -> tuple[torch.fx.GraphModule, tuple, int | None, str | None]:
    """The simulated network that ``arqc certify --method ibp`` bounds: (graph, input shape, classes, the ONNX
    file when MODEL is one). An ONNX model arqc emitted says how it is quantized (its metadata); a checkpoint
    is quantized at the bit options, its activation ranges calibrated on ``calib_data``."""
    if model.endswith(".onnx"):
        if bits or w_bits or a_bits or policy or calib_data:
            raise ArqcError(f"{model} already says how it is quantized; drop --bits/--policy/--calib-data")
        sim, meta = simulation_from_onnx(model, trust_pickle=trust_pickle)
        settings = CompileSettings.from_json(meta["arqc.settings"])
        return sim, tuple(settings.input_shape), settings.num_classes, model
    calib = load_data(calib_data)
    prep = prepare_model(model, arch, trust_pickle, input_shape, calib)
    sim = quantize(prep, resolve_policy(prep.gm, bits, w_bits, a_bits, policy, default=32), calib)
    return sim, prep.input_shape, prep.loaded.num_classes, None


def is_quantized(gm: torch.fx.GraphModule) -> bool:
    return any(isinstance(m, QuantLayer) and min(m.w_bits, m.a_bits) < 32 for m in gm.modules())


def certify_ibp(sim_gm: torch.fx.GraphModule, images: ImageSet | tuple[torch.Tensor, torch.Tensor],
                epsilon: float, complete: bool = False, timeout: float = 10.0, onnx_model=None,
                batch_size: int = 128, device: str | None = None, attack_steps: int = 10) -> dict:
    """Certify every image of ``images`` (an ImageSet, or (x, y) tensors) at L∞ radius ``epsilon`` with sound
    IBP on the simulated graph ``sim_gm``; with ``complete``, points IBP cannot certify go to the complete
    verifier (``timeout`` seconds each). ``onnx_model`` (path, bytes or ModelProto of the same network)
    judges clean accuracy and confirms counterexamples. ``sim_gm`` is moved to ``device`` (default: cuda
    when available)."""
    epsilon = check_epsilon(epsilon)
    if not timeout > 0:
        raise ArqcError(f"--timeout must be positive, got {timeout}")
    check_supported(sim_gm)
    x, y = (images.x, images.y) if isinstance(images, ImageSet) else images
    ids = images.ids.tolist() if isinstance(images, ImageSet) else list(range(len(y)))
    if len(y) == 0:
        raise ArqcError("no images to certify; give at least one")
    grid = on_grid(x)
    if complete and not is_quantized(sim_gm):
        raise ArqcError("--complete needs a quantized model (a simulated graph with a layer below 32 bits); "
                        "compile it with --bits, or run IBP without --complete")
    if complete and not grid:
        grid_box(x, epsilon)  # raises the one-line error about 8-bit inputs
    device = resolve_device(device)
    gm = sim_gm.to(device).eval()
    oracle = onnx_oracle(onnx_model) if onnx_model is not None else None
    judge = oracle or torch_oracle(gm)

    start = time.monotonic()
    predicted = torch.cat([judge(x[i : i + batch_size]) for i in range(0, len(y), batch_size)])
    margins = []
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        with torch.no_grad():
            margins.append(worst_margin(margin_bounds(gm, *input_box(xb, epsilon), yb, sound=True), yb).cpu())
    margins = torch.cat(margins)
    ibp_seconds = (time.monotonic() - start) / len(y)

    points = []
    for i in range(len(y)):
        label, margin = int(y[i]), float(margins[i])
        point = {"index": i, "id": int(ids[i]), "label": label, "predicted": int(predicted[i]),
                 "margin_lower": margin, "seconds": ibp_seconds}
        if point["predicted"] != label:
            point["status"] = "falsified"
        elif margin > 0:
            point["status"] = "verified"
        elif complete:
            v = verify_complete(gm, x[i], label, epsilon, timeout, oracle, batch_size=256,
                                attack_steps=attack_steps)
            point.update(status=v.status, seconds=ibp_seconds + v.seconds, subboxes=v.subboxes)
        else:
            point["status"] = "falsified" if grid and _attack(gm, x[i], label, epsilon, judge, attack_steps) \
                else "unknown"
        points.append(point)
    seconds = time.monotonic() - start
    count = {s: sum(p["status"] == s for p in points) for s in STATUSES}
    n = len(points)
    ibp_verified = sum(p["margin_lower"] > 0 and p["predicted"] == p["label"] for p in points)
    return {
        "method": "ibp+complete" if complete else "ibp",
        "epsilon": epsilon,
        "epsilon_levels": epsilon * LEVELS,
        "data": images.spec if isinstance(images, ImageSet) else None,
        "num_images": n,
        "clean_accuracy": sum(p["predicted"] == p["label"] for p in points) / n,
        "ibp_verified_accuracy": ibp_verified / n,
        "verified_accuracy": count["verified"] / n,
        "verified": count["verified"],
        "falsified": count["falsified"],
        "timeouts": count["timeout"],
        "unknown": count["unknown"],
        "timeout_s": timeout if complete else None,
        "seconds": seconds,
        "time_per_input_s": seconds / n,
        "judge": "onnxruntime" if oracle is not None else "torch simulation",
        "device": str(device),
        "bounds": "float64, widened by float32 rounding margins (sound for the float32 simulation)",
        "points": points,
    }


def _attack(gm, x, label, epsilon, judge, steps) -> bool:
    """Whether a short grid attack finds an input within ε that the judge misclassifies."""
    if steps <= 0:
        return False
    k_lo, k_hi = grid_box(x, epsilon)
    k0 = torch.round(x.detach().cpu().float().flatten() * LEVELS).long()
    iterates = grid_attack(gm, k_lo, k_hi, k0, label, tuple(x.shape), steps)
    images = (iterates.float() / LEVELS).reshape(len(iterates), *x.shape)
    return bool((judge(images) != label).any())


def format_linf_report(report: dict) -> str:
    """The summary table of a :func:`certify_ibp` report."""
    n = report["num_images"]
    eps = report["epsilon"]
    how = f"IBP + complete verifier (timeout {report['timeout_s']:g} s per input)" \
        if report["method"] == "ibp+complete" else "IBP"
    lines = [f"L-inf certification at epsilon = {eps:.5g} ({eps * LEVELS:.3g}/255) of {n} images"
             + (f" from {report['data']}" if report["data"] else ""),
             f"method: {how}; counterexamples judged by the {report['judge']}; device {report['device']}",
             f"  clean accuracy (quantized)  {100 * report['clean_accuracy']:6.2f}%",
             f"  verified robust accuracy    {100 * report['verified_accuracy']:6.2f}%"
             f"  ({report['verified']}/{n}; IBP alone {100 * report['ibp_verified_accuracy']:.2f}%)",
             f"  falsified                   {report['falsified']:6d}",
             f"  timeouts                    {report['timeouts']:6d}",
             f"  unknown                     {report['unknown']:6d}",
             f"  time per input              {report['time_per_input_s']:9.4f} s"]
    return "\n".join(lines)
