"""Baseline allocators in the same harness and budget as ARQ: uniform bits and a sensitivity-greedy
allocator (HAWQ-like, with a cheap proxy). Random search and HAQ live in loop.py (HAQ's reward: arqc/rewards.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from arqc.base import ArqcError
from arqc.passes.policy import Policy
from arqc.passes.search.budget import LayerSpec, bitops, fp32_bitops


def uniform_policy(layers: list[LayerSpec], budget: float, min_bits: int = 2, max_bits: int = 8,
                   fixed: dict[str, int] | None = None) -> Policy:
    """The highest uniform (b, b) — layers in ``fixed`` keep their bits — whose BitOps fit the budget."""
    fixed = fixed or {}
    for b in range(max_bits, min_bits - 1, -1):
        policy = {layer.name: (fixed.get(layer.name, b),) * 2 for layer in layers}
        if bitops(layers, policy) <= budget * fp32_bitops(layers):
            return policy
    raise ArqcError(f"no uniform policy of {min_bits}..{max_bits} bits fits the budget; raise --budget")


def sensitivity(layers: list[LayerSpec], logits_of: Callable[[Policy], torch.Tensor], reference: torch.Tensor,
                min_bits: int = 2, max_bits: int = 8) -> dict[tuple[str, int, int], float]:
    """Proxy sensitivity of each layer alone: mean KL(p_fp32 ‖ p_quantized) of the logits on a few noisy
    search images when only that layer's weights (kind 0) or input activations (kind 1) are at b bits."""
    p_ref = torch.log_softmax(reference, 1)
    out = {}
    for layer in layers:
        for kind in (0, 1):
            for b in range(min_bits, max_bits + 1):
                bits = (b, 32) if kind == 0 else (32, b)
                policy = {other.name: (32, 32) for other in layers} | {layer.name: bits}
                logp = torch.log_softmax(logits_of(policy), 1)
                out[(layer.name, kind, b)] = float((p_ref.exp() * (p_ref - logp)).sum(1).mean())
    return out


def greedy_policy(layers: list[LayerSpec], budget: float, sens: dict[tuple[str, int, int], float],
                  min_bits: int = 2, max_bits: int = 8, fixed: dict[str, int] | None = None) -> Policy:
    """Start every free layer at ``max_bits``; repeatedly lower by one bit the (layer, weights|activations)
    whose sensitivity rises least per BitOps saved, until the budget holds."""
    fixed = fixed or {}
    policy = {layer.name: (fixed.get(layer.name, max_bits),) * 2 for layer in layers}
    limit = budget * fp32_bitops(layers)
    while bitops(layers, policy) > limit:
        best, best_cost = None, float("inf")
        for layer in layers:
            if layer.name in fixed:
                continue
            w, a = policy[layer.name]
            for kind, current in ((0, w), (1, a)):
                if current <= min_bits:
                    continue
                saved = layer.macs * (a if kind == 0 else w)  # BitOps saved by one bit less
                cost = (sens[(layer.name, kind, current - 1)] - sens[(layer.name, kind, current)]) / saved
                if cost < best_cost:
                    best, best_cost = (layer.name, kind), cost
        if best is None:
            raise ArqcError("the budget cannot be met with every free layer at the minimum bits; raise --budget")
        w, a = policy[best[0]]
        policy[best[0]] = (w - 1, a) if best[1] == 0 else (w, a - 1)
    return policy
