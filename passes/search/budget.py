"""BitOps accounting for candidate policies and HAQ's budget wall."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.fx
from torch import nn

from arqc.base import ArqcError
from arqc.passes.meta import info, quantizable_nodes
from arqc.passes.policy import Policy


@dataclass(frozen=True)
class LayerSpec:
    """What the search knows about one quantizable layer (from the analysis pass)."""

    name: str
    index: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    depthwise: bool
    weights: int
    in_size: int  # input feature-map height × width (1 for linear layers)
    macs: int


def layer_specs(gm: torch.fx.GraphModule) -> list[LayerSpec]:
    specs = []
    for i, node in enumerate(quantizable_nodes(gm)):
        meta, m = info(node), gm.get_submodule(node.target)
        in_shape = meta.in_shapes[0]
        if isinstance(m, nn.Conv2d):
            spec = LayerSpec(meta.layer, i, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0],
                             m.groups > 1 and m.groups == m.in_channels, m.weight.numel(),
                             in_shape[2] * in_shape[3], meta.macs)
        elif meta.kind == "matmul":  # (..., M, K) · (..., K, N): no weights; M rows like a feature map's pixels
            second = node.args[1].meta["tensor_meta"].shape
            spec = LayerSpec(meta.layer, i, in_shape[-1], second[-1], 1, 1, False, 0,
                             int(np.prod(in_shape[1:-1], dtype=np.int64)), meta.macs)
        else:
            spec = LayerSpec(meta.layer, i, m.in_features, m.out_features, 1, 1, False, m.weight.numel(), 1,
                             meta.macs)
        specs.append(spec)
    return specs


def bitops(layers: list[LayerSpec], policy: Policy) -> int:
    return sum(layer.macs * policy[layer.name][0] * policy[layer.name][1] for layer in layers)


def fp32_bitops(layers: list[LayerSpec]) -> int:
    return sum(layer.macs for layer in layers) * 32 * 32


def parse_budget(text: str | float) -> float:
    """A BitOps budget as a fraction of FP32: "1.5%" → 0.015; a plain number ≤ 1 is a fraction."""
    try:
        value = float(str(text).strip().rstrip("%")) / (100 if str(text).strip().endswith("%") else 1)
    except ValueError:
        raise ArqcError(f"--budget {text!r} is not a number; give a share of FP32 BitOps like 1.5%") from None
    return value


def check_budget(layers: list[LayerSpec], budget: float, min_bits: int, fixed: dict[str, int]) -> None:
    floor = {layer.name: (fixed.get(layer.name, min_bits),) * 2 for layer in layers}
    lowest = bitops(layers, floor) / fp32_bitops(layers)
    if budget >= 1.0 or budget <= 0:
        raise ArqcError(f"budget {100 * budget:.3g}% must be above 0 and below 100% of FP32 BitOps")
    if budget < lowest:
        raise ArqcError(f"budget {100 * budget:.3g}% is below what {min_bits}-bit layers reach "
                        f"({100 * lowest:.3g}% of FP32 BitOps, first/last layers fixed); raise --budget")


def enforce_budget(layers: list[LayerSpec], policy: Policy, budget: float, min_bits: int = 2,
                   fixed: dict[str, int] | None = None) -> Policy:
    """HAQ's wall: while BitOps exceed the budget, sweep from the last layer back, taking one bit from each
    layer's wider side (weights on a tie). Layers in ``fixed`` keep their bits.

    Taking the wider side keeps w and a balanced: w·a falls fastest for the bit it costs, and a layer never
    reaches 2-bit weights while its activations still have 7 (lowering weights first did exactly that, and
    such policies lose almost all accuracy without fine-tuning)."""
    fixed = fixed or {}
    policy = dict(policy)
    limit = budget * fp32_bitops(layers)
    while bitops(layers, policy) > limit:
        changed = False
        for layer in reversed(layers):
            if layer.name in fixed:
                continue
            w, a = policy[layer.name]
            if max(w, a) > min_bits:
                policy[layer.name] = (w - 1, a) if w >= a else (w, a - 1)
                changed = True
            if bitops(layers, policy) <= limit:
                break
        if not changed:
            raise ArqcError("the budget cannot be met even with every free layer at the minimum bits; "
                            "raise --budget")
    return policy
