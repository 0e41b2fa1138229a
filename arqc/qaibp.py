"""QA-IBP training (Lechner et al. 2023): interval bound propagation through the quantized network.

Loss per batch: κ·CE(z(x), y) + (1 − κ)·CE(ẑ(x, ε), y), where z are the logits of the fake-quantized
simulation and ẑ the worst-case logits from IBP bounds over the ε-box (ẑ_j = −lower bound of
z_y − z_j, with the specification folded into the last layer). Bounds pass through every quantizer as
[q(l), q(u)] and gradients through its straight-through estimator. ε and κ follow the schedule of Gowal
et al. (2018), which QA-IBP adopts: natural warm-up (ε = 0, κ = 1), then ε ramps linearly to its target
while κ goes from 1 to κ_end. Activation ranges are recalibrated on clean training images at the start
of every epoch after the first (DESIGN §2), so the last epoch trains the network with its final quantizers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from arqc.base import ArqcError
from arqc.data import ImageSet
from arqc.passes.policy import Policy, apply_policy
from arqc.passes.quantize import QuantLayer, calibrate, simulate
from arqc.runtime.devices import resolve_device
from arqc.runtime.ibp import (
    check_epsilon,
    check_supported,
    input_box,
    margin_bounds,
    worst_case_logits,
    worst_margin,
)


@dataclass(frozen=True)
class Schedule:
    """ε and κ per optimizer step: ``warmup`` natural steps, then a linear ``ramp`` to ε and κ_end."""

    epsilon: float
    warmup: int
    ramp: int
    kappa_end: float = 0.5

    def at(self, step: int) -> tuple[float, float]:
        t = min(max((step - self.warmup + 1) / max(self.ramp, 1), 0.0), 1.0) if step >= self.warmup else 0.0
        return self.epsilon * t, 1.0 - t * (1.0 - self.kappa_end)


def qaibp_loss(sim: torch.fx.GraphModule, x: torch.Tensor, y: torch.Tensor, epsilon: float,
               kappa: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, natural logits, margin lower bounds [B, K]) of one batch."""
    logits = sim(x)
    loss = F.cross_entropy(logits, y)
    if kappa >= 1.0:
        return loss, logits, logits.new_full((len(y), logits.shape[1]), float("nan"))
    margins = margin_bounds(sim, *input_box(x, epsilon), y, sound=False)
    return kappa * loss + (1 - kappa) * F.cross_entropy(worst_case_logits(margins), y), logits, margins


def recalibrate(sim: torch.fx.GraphModule, batches: list[torch.Tensor]) -> None:
    """Recompute every activation range on clean ``batches`` and record it in the nodes' meta."""
    calibrate(sim, batches)


def train_qaibp(model: torch.fx.GraphModule, train: ImageSet, epsilon: float, epochs: int,
                policy: Policy | None = None, *, kappa_end: float = 0.5, warmup_epochs: float | None = None,
                ramp_epochs: float | None = None, lr: float = 1e-3, batch_size: int = 128,
                calibration_images: int = 512, seed: int = 0, device: str | None = None,
                log: Callable[[dict], None] | None = None) -> tuple[torch.fx.GraphModule, list[dict]]:
    """Train a quantized network with QA-IBP; returns the trained simulated graph and per-epoch history.

    ``model`` is either a simulated graph (arqc.passes.quantize.simulate; trained in place) or a captured, analyzed
    float graph, which is first quantized at ``policy`` (uniform or from arqc's search) and calibrated on the
    first ``calibration_images`` training images. ε ramps to ``epsilon`` and κ to ``kappa_end``; defaults:
    0.1·epochs of warm-up and 0.5·epochs of ramp. The learning rate (Adam) drops 10× for the last quarter."""
    epsilon = check_epsilon(epsilon)
    if epochs < 1 or batch_size < 1 or calibration_images < 1:
        raise ArqcError(f"epochs, batch size and calibration images must be >= 1 (got {epochs}, "
                        f"{batch_size}, {calibration_images})")
    if not 0 <= kappa_end <= 1:
        raise ArqcError(f"kappa_end = {kappa_end} is outside [0, 1]; it weighs the natural loss")
    device = resolve_device(device)
    calib = [x.to(device) for x, _ in train.subset(num=calibration_images).batches(batch_size)]
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        if policy is not None:
            raise ArqcError("the model is already quantized; give either a float graph and a policy, or a "
                            "simulated graph without one")
        sim = model.to(device)
    elif policy is None:
        raise ArqcError("QA-IBP trains a quantized network: give a precision policy (e.g. uniform bits)")
    else:
        sim = simulate(apply_policy(model, policy).to(device), calib)
    check_supported(sim)

    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    warmup = round((0.1 * epochs if warmup_epochs is None else warmup_epochs) * steps_per_epoch)
    ramp = round((0.5 * epochs if ramp_epochs is None else ramp_epochs) * steps_per_epoch)
    schedule = Schedule(epsilon, warmup, ramp, kappa_end)
    params = [p.requires_grad_() for p in sim.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    lr_drop = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(0.75 * total)], gamma=0.1)
    generator = torch.Generator().manual_seed(seed)

    history, step = [], 0
    sim.train()
    for epoch in range(epochs):
        if epoch > 0:
            recalibrate(sim, calib)
        start, sums = time.monotonic(), {"loss": 0.0, "natural": 0, "robust": 0, "seen": 0}
        order = torch.randperm(len(train), generator=generator)
        for i in range(0, len(train), batch_size):
            index = order[i : i + batch_size]
            x, y = train.x[index].to(device), train.y[index].to(device)
            eps, kappa = schedule.at(step)
            loss, logits, margins = qaibp_loss(sim, x, y, eps, kappa)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_drop.step()
            step += 1
            sums["loss"] += loss.item() * len(y)
            sums["natural"] += int((logits.argmax(1) == y).sum())
            sums["robust"] += int((worst_margin(margins.detach(), y) > 0).sum())
            sums["seen"] += len(y)
        record = {"epoch": epoch + 1, "epsilon": eps, "kappa": kappa, "loss": sums["loss"] / sums["seen"],
                  "natural_accuracy": sums["natural"] / sums["seen"],
                  "ibp_accuracy": sums["robust"] / sums["seen"], "seconds": time.monotonic() - start}
        history.append(record)
        if log is not None:
            log(record)
    sim.eval()
    for p in params:
        p.requires_grad_(False)
    return sim, history
