"""Noise-aware quantization-aware training: fine-tune a simulated (fake-quantized) model with Gaussian noise
augmentation at σ (as the smoothed classifier sees it) through the straight-through quantizers.

With ``learned_scales`` the quantizers' scales are parameters too (LSQ, Esser et al. 2020: passes/quantize.py
``learn_scales``), trained by the same optimizer without weight decay and written back as fixed scales at the
end, so the lowering exports exactly what was learned, then moved off rounding ties like calibrated ones
(passes/quantize.py ``avoid_ties``, on the first images with noise at σ from a fixed seed). Without it,
activation ranges stay as calibrated and weight scales follow the weights (minmax) or stay as calibrated
(percentile, mse).

With ``unfold_bn`` each layer with a folded BatchNorm trains as if the BatchNorm were still there, frozen at its
running statistics (as QAT from a trained model does in Jacob et al. 2018 and PT2E after freezing BN): the
folded weight is W' = W·g per output channel (g = γ / sqrt(var + eps), capture's ``bn_scale``), and an SGD step
on W moves W' by lr·g²·∂L/∂W' (weight decay and momentum are linear, so they match too). The gradient of W' is
scaled by g² and nothing else changes: the same parameters, the same lowering. ``lr`` is then the learning rate
of the unfolded weights, the one ``arqc train`` used; folded, the small-g channels of the first layers see a
step about 1/g² times larger than in training, which limits folded QAT to a small ``lr``.

With ``distill`` = w > 0 the loss is (1 − w)·cross-entropy + w·KL(teacher ‖ student), the teacher (the float
model) seeing the same noisy image (knowledge distillation, Hinton et al. 2015, as in quantization-aware
distillation): the smoothed classifier counts the base classifier's votes under noise, so the quantized model
learns the float model's whole distribution of votes there, not only the label. The images get the same augmentation
as ``arqc train`` (``auto``: random crops and flips for colour photos). SGD with momentum and a cosine
schedule; one checkpoint per epoch (``state_path``) so an interrupted run resumes with the same result.
It runs on a GPU when there is one (like ``arqc train``); batches, crops and noise are drawn on the CPU either
way, so only the arithmetic moves.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.fx
from tqdm import tqdm

from arqc.augment import AUGMENTS, augment, resolve_augment
from arqc.base import ArqcError, atomic_write
from arqc.passes.meta import KEY
from arqc.passes.quantize import TIE_IMAGES, avoid_ties, clamp_scales, freeze_scales, learn_scales
from arqc.runtime.devices import resolve_device


def finetune(sim: torch.fx.GraphModule, images: torch.Tensor, labels: torch.Tensor, *, sigma: float,
             epochs: int, lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
             state_path: str | Path | None = None, progress: bool = True,
             augmentation: str = "none", device: str | None = None,
             learned_scales: bool = False, scale_lr: float | None = None,
             teacher: torch.nn.Module | None = None, distill: float = 0.0,
             unfold_bn: bool = False) -> torch.fx.GraphModule:
    """Fine-tune ``sim`` in place on (images, labels), augmented (one of ``arqc.augment.AUGMENTS``), with noise
    N(0, σ²) added to the [0, 1] pixels, on ``device`` (default: cuda when available); ``sim`` ends on the
    CPU. ``learned_scales``: LSQ (see the module docstring), the scales at learning rate ``scale_lr`` (default:
    ``lr``). ``distill``: the weight of the distillation loss from ``teacher``; ``unfold_bn``: train folded
    weights as unfolded ones (both in the module docstring)."""
    if epochs < 0 or lr <= 0 or sigma < 0 or (scale_lr is not None and scale_lr <= 0):
        raise ArqcError(f"fine-tuning needs epochs >= 0, lr > 0, scale_lr > 0, sigma >= 0 "
                        f"(got {epochs}, {lr}, {scale_lr}, {sigma})")
    if augmentation not in AUGMENTS:
        raise ArqcError(f"unknown augmentation '{augmentation}'; choose one of {', '.join(AUGMENTS)}")
    if not 0.0 <= distill <= 1.0 or (distill > 0 and teacher is None):
        raise ArqcError(f"distillation needs a weight in [0, 1] and a teacher (got {distill})")
    kind = resolve_augment(augmentation, images)
    if epochs == 0:
        return sim
    dev = resolve_device(device)
    sim.to(dev)
    if distill > 0:
        teacher.to(dev).eval()
    hooks = _unfolded_bn_hooks(sim) if unfold_bn else []
    scales = learn_scales(sim) if learned_scales else []
    learned = {id(p) for p in scales}
    params = [p for p in sim.parameters() if p.requires_grad and id(p) not in learned]
    scale_group = {"params": scales, "weight_decay": 0.0, "lr": lr if scale_lr is None else scale_lr}
    groups = [{"params": params}] + ([scale_group] if scales else [])
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / (epochs * steps_per_epoch))))
    gen = torch.Generator().manual_seed(seed)
    start = 0
    if state_path is not None and Path(state_path).exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        sim.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        schedule.load_state_dict(state["schedule"])
        gen.set_state(state["gen"])
        start = state["epoch"]
    for epoch in range(start, epochs):
        sim.train()
        order = torch.randperm(len(images), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(order.split(batch_size), desc=f"QAT epoch {epoch + 1}/{epochs}", disable=not progress)
        for idx in bar:
            x = augment(images[idx], kind, gen)
            x = (x + sigma * torch.randn(x.shape, generator=gen)).to(dev)  # noise drawn on the CPU (module docstring)
            y = labels[idx].to(dev)
            logits = sim(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            if distill > 0:
                with torch.no_grad():
                    target = torch.log_softmax(teacher(x), dim=1)
                kl = torch.nn.functional.kl_div(torch.log_softmax(logits, dim=1), target, reduction="batchmean",
                                                log_target=True)
                loss = (1 - distill) * loss + distill * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            clamp_scales(scales)
            schedule.step()
            total += len(idx)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
        if state_path is not None:
            state = {"model": sim.state_dict(), "opt": opt.state_dict(), "schedule": schedule.state_dict(),
                     "gen": gen.get_state(), "epoch": epoch + 1}
            atomic_write(state_path, lambda f, state=state: torch.save(state, f))
    for hook in hooks:
        hook.remove()
    sim.to("cpu").eval()
    if distill > 0:
        teacher.to("cpu")
    if learned_scales:
        freeze_scales(sim)
        x = images[:TIE_IMAGES]  # learned scales are float scales (learn_scales refuses po2)
        avoid_ties(sim, x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
    return sim


def _unfolded_bn_hooks(sim: torch.fx.GraphModule) -> list[torch.utils.hooks.RemovableHandle]:
    """Scale the gradient of every weight with a folded BatchNorm by g² per output channel (module docstring)."""
    hooks = []
    for node in sim.graph.nodes:
        info = node.meta.get(KEY)
        if node.op != "call_module" or info is None or info.bn_scale is None:
            continue
        weight = sim.get_submodule(node.target).weight
        factor = info.bn_scale.to(weight.device).square().reshape((-1,) + (1,) * (weight.dim() - 1))
        hooks.append(weight.register_hook(lambda grad, factor=factor: grad * factor))
    return hooks
