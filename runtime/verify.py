"""Complete L∞ verification of a quantized network on 8-bit inputs (QA-IBP, Lechner et al. 2023, §5).

Pixels are on the grid k/255, so the ε-box around an image holds finitely many inputs. The verifier bounds
sub-boxes with sound IBP (runtime/ibp.py) and splits the ones it cannot certify, batched, along the pixel
whose width costs the bound most; a box of one grid point is decided by running the network on it.
It ends with "verified" (every sub-box certified or checked), "falsified" (a grid input in the box that the
network misclassifies, confirmed by the oracle: the ONNX model when there is one) or "timeout".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx

from arqc.base import ArqcError
from arqc.runtime.backends import OrtBackend
from arqc.runtime.ibp import check_epsilon, ieee_float32, margin_bounds, worst_margin

LEVELS = 255  # 8-bit pixels: k / 255, k in 0..255
# The pixel values as data loaders compute them (float32 k / 255, computed on the CPU).
PIXELS = torch.arange(LEVELS + 1, dtype=torch.float32) / LEVELS

Oracle = Callable[[torch.Tensor], torch.Tensor]  # float32 images [N, C, H, W] -> predicted labels [N]


@dataclass
class Verdict:
    status: str  # "verified" | "falsified" | "timeout"
    margin_lower: float  # IBP lower bound of min_j logit[y] - logit[j] over the whole box
    subboxes: int  # boxes bounded with IBP
    seconds: float
    counterexample: torch.Tensor | None = None  # [C, H, W] grid image that the oracle misclassifies


def torch_oracle(gm: torch.fx.GraphModule) -> Oracle:
    """The simulation itself as the judge of concrete inputs."""
    device = next(gm.parameters()).device

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), ieee_float32():
            return gm(x.to(device)).argmax(1).cpu()
    return predict


def onnx_oracle(model) -> Oracle:
    """An ONNX model (path, bytes or ModelProto) run by onnxruntime as the judge of concrete inputs."""
    backend = OrtBackend(model)
    return lambda x: torch.from_numpy(backend.predict(x.detach().cpu().numpy()))


def on_grid(x: torch.Tensor) -> bool:
    """Whether every pixel is exactly float32(k / 255) for an integer k."""
    k = torch.round(x.detach().cpu().float() * LEVELS).clamp(0, LEVELS).long()
    return bool((PIXELS[k] == x.detach().cpu().float()).all())


def grid_box(x: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer pixel ranges [k_lo, k_hi] (flattened, int64) of the grid points within ε of ``x``."""
    if not on_grid(x):
        raise ArqcError("the complete verifier needs images on the 8-bit grid (every pixel k/255, as "
                        "8-bit image files give them); run IBP without --complete for other inputs")
    k = torch.round(x.detach().cpu().float() * LEVELS).long().flatten()
    radius = math.floor(check_epsilon(epsilon) * LEVELS + 1e-6)
    return (k - radius).clamp(0, LEVELS), (k + radius).clamp(0, LEVELS)


def _pixels(k: torch.Tensor, shape: tuple[int, ...], device) -> torch.Tensor:
    return PIXELS[k.cpu()].reshape(len(k), *shape).to(device)


def grid_attack(gm: torch.fx.GraphModule, k_lo: torch.Tensor, k_hi: torch.Tensor, start: torch.Tensor,
                label: int, shape: tuple[int, ...], steps: int = 10) -> torch.Tensor:
    """Signed-gradient descent on the margin over grid points of the box (through the straight-through
    quantizers); returns every iterate, [steps + 1, D], for the caller to evaluate."""
    device = next(gm.parameters()).device
    k, iterates = start.clone(), [start.clone()]
    width = int((k_hi - k_lo).max())
    labels = torch.tensor([label], device=device)
    for step in range(steps):
        x = _pixels(k[None], shape, device).requires_grad_()
        with torch.enable_grad():
            z = gm(x)
            margin = z[0, label] - z.scatter(1, labels[:, None], float("-inf")).max()
            (grad,) = torch.autograd.grad(margin, x)
        size = max(1, width >> step)  # big steps first, then single grid steps
        k = (k - size * torch.sign(grad.flatten().cpu()).long()).clamp(k_lo, k_hi)
        iterates.append(k.clone())
    return torch.stack(iterates)


def _box_points(k_lo: torch.Tensor, k_hi: torch.Tensor) -> torch.Tensor:
    """Every grid point of one box, [N, D]."""
    dims = (k_hi > k_lo).nonzero().flatten()
    points = k_lo.repeat(int((k_hi - k_lo + 1).prod()), 1)
    if len(dims):
        axes = [torch.arange(int(k_lo[d]), int(k_hi[d]) + 1) for d in dims]
        points[:, dims] = torch.cartesian_prod(*axes).reshape(len(points), len(dims))
    return points


def _chunks(blocks, rows: int):
    """Concatenate blocks of rows into chunks of about ``rows`` rows (bounded memory)."""
    pending, count = [], 0
    for block in blocks:
        pending.append(block)
        count += len(block)
        if count >= rows:
            yield torch.cat(pending)
            pending, count = [], 0
    if pending:
        yield torch.cat(pending)


def _split_guide(gm, lo, hi, labels, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the (training-mode) IBP margin bound against the target class w.r.t. the box centre
    and radius: how much each pixel's width costs the bound, and the direction that lowers the margin."""
    centre, radius = ((lo + hi) / 2).requires_grad_(), ((hi - lo) / 2).requires_grad_()
    with torch.enable_grad():
        margins = margin_bounds(gm, centre - radius, centre + radius, labels, sound=False)
        grad_c, grad_r = torch.autograd.grad(margins.gather(1, target[:, None]).sum(), [centre, radius])
    return grad_c.flatten(1).cpu(), grad_r.flatten(1).cpu()


def verify_complete(gm: torch.fx.GraphModule, x: torch.Tensor, label: int, epsilon: float, timeout: float,
                    oracle: Oracle | None = None, batch_size: int = 256, attack_steps: int = 10,
                    enumerate_points: int = 256, dtype: torch.dtype = torch.float32) -> Verdict:
    """Decide robustness of ``gm`` at image ``x`` [C, H, W] (on the 8-bit grid) with true class ``label``
    over the grid points within L∞ distance ε, in at most about ``timeout`` seconds (checked between
    batches). ``oracle`` judges concrete inputs (default: the simulation); ``attack_steps`` of grid PGD
    run before splitting; a box IBP cannot certify with at most ``enumerate_points`` grid points is decided
    by judging every one of them. Sub-box bounds are sound bounds computed in ``dtype``."""
    start_time = time.monotonic()
    device = next(gm.parameters()).device
    shape = tuple(x.shape)
    judge = oracle or torch_oracle(gm)
    sim_predict = torch_oracle(gm)
    k_lo, k_hi = grid_box(x, epsilon)
    counted = 0

    def verdict(status, margin, example=None):
        ce = None if example is None else _pixels(example[None], shape, "cpu")[0]
        return Verdict(status, margin, counted, time.monotonic() - start_time, ce)

    def confirm(candidates: torch.Tensor, sim_pred: torch.Tensor | None = None) -> torch.Tensor | None:
        """The first candidate (grid ints [N, D]) that the oracle misclassifies, else None. With
        ``sim_pred`` only candidates the simulation misclassifies are sent to the oracle."""
        if sim_pred is not None:
            candidates = candidates[sim_pred != label]
            if oracle is None:
                return candidates[0] if len(candidates) else None
        if len(candidates) == 0:
            return None
        wrong = (judge(_pixels(candidates, shape, "cpu")) != label).nonzero()
        return candidates[wrong[0, 0]] if len(wrong) else None

    def bound(box_lo, box_hi):
        lo, hi = _pixels(box_lo, shape, device), _pixels(box_hi, shape, device)
        labels = torch.full((len(box_lo),), label, device=device)
        with torch.no_grad():
            margins = margin_bounds(gm, lo, hi, labels, sound=True, dtype=dtype)
        return lo, hi, labels, margins, worst_margin(margins, labels).cpu()

    root_margin = float(bound(k_lo[None], k_hi[None])[-1][0])
    counted = 1
    if root_margin > 0:
        return verdict("verified", root_margin)
    # the image itself, then a short attack on the grid
    k0 = torch.round(x.detach().cpu().float().flatten() * LEVELS).long()
    found = confirm(k0[None])
    if found is None and attack_steps > 0:
        iterates = grid_attack(gm, k_lo, k_hi, k0, label, shape, attack_steps)
        found = confirm(iterates, sim_predict(_pixels(iterates, shape, device)))
    if found is not None:
        return verdict("falsified", root_margin, found)

    stack_lo, stack_hi = k_lo[None], k_hi[None]
    while len(stack_lo):
        if time.monotonic() - start_time > timeout:
            return verdict("timeout", root_margin)
        box_lo, box_hi = stack_lo[-batch_size:], stack_hi[-batch_size:]
        stack_lo, stack_hi = stack_lo[:-batch_size], stack_hi[:-batch_size]
        lo, hi, labels, margins, worst = bound(box_lo, box_hi)
        counted += len(box_lo)
        open_ = worst <= 0
        if not open_.any():
            continue
        box_lo, box_hi, lo, hi = box_lo[open_], box_hi[open_], lo[open_.to(device)], hi[open_.to(device)]
        target = margins.scatter(1, labels[:, None], float("inf"))[open_.to(device)].argmin(1)
        # boxes of a few grid points: the oracle decides every point (cheaper than splitting down to them)
        small = (box_hi - box_lo + 1).double().log().sum(1) <= math.log(enumerate_points)
        if small.any():
            blocks = (_box_points(a, b) for a, b in zip(box_lo[small], box_hi[small], strict=True))
            for points in _chunks(blocks, max(enumerate_points, 4096)):
                found = confirm(points)
                if found is not None:
                    return verdict("falsified", root_margin, found)
            keep = ~small
            box_lo, box_hi, lo, hi, target = (box_lo[keep], box_hi[keep], lo[keep.to(device)],
                                              hi[keep.to(device)], target[keep.to(device)])
        if len(box_lo) == 0:
            continue
        grad_c, grad_r = _split_guide(gm, lo, hi, labels[: len(box_lo)], target)
        # the corner that lowers the margin most is a cheap candidate counterexample
        corner = torch.where(grad_c > 0, box_lo, torch.where(grad_c < 0, box_hi, (box_lo + box_hi) // 2))
        found = confirm(corner, sim_predict(_pixels(corner, shape, device)))
        if found is not None:
            return verdict("falsified", root_margin, found)
        width = (box_hi - box_lo).double()
        influence = grad_r.abs().double() * width
        influence = torch.where(influence.amax(1, keepdim=True) > 0, influence, width)  # no signal: widest
        dim = influence.masked_fill(width == 0, -1).argmax(1)
        rows = torch.arange(len(box_lo))
        mid = (box_lo[rows, dim] + box_hi[rows, dim]) // 2
        left_hi, right_lo = box_hi.clone(), box_lo.clone()
        left_hi[rows, dim], right_lo[rows, dim] = mid, mid + 1
        stack_lo = torch.cat([stack_lo, box_lo, right_lo])
        stack_hi = torch.cat([stack_hi, left_hi, box_hi])
    return verdict("verified", root_margin)
