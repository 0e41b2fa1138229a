"""The bit-allocation environment in the style of HAQ (Wang et al. 2019, lib/env/quantize_env.py).

Layers are visited in graph order; each gets two steps: its weight bits, then its activation bits. The
state of a step is ten features, each min-max normalized over the model's layers: layer index, input
channels, output channels, kernel size, stride, depthwise flag, number of weights, input feature-map size,
previous action, weight-or-activation flag — plus the share of the FP32 BitOps already spent. An action in
[0, 1] maps to bits in [min_bits, max_bits]. Layers in ``fixed`` (HAQ keeps the first and last at 8) are
not visited. After the last step the budget wall (budget.py) makes the policy fit the budget. The
environment never computes rewards.
"""

from __future__ import annotations

import torch

from arqc.passes.policy import Policy
from arqc.passes.search.budget import LayerSpec, enforce_budget, fp32_bitops

STATE_DIM = 11


def action_to_bits(action: float, min_bits: int, max_bits: int) -> int:
    """HAQ's mapping: equal-width bins over [0, 1]."""
    bits = round(min_bits - 0.5 + action * (max_bits - min_bits + 1))
    return int(min(max(bits, min_bits), max_bits))


class BitAllocationEnv:
    def __init__(self, layers: list[LayerSpec], budget: float, min_bits: int = 2, max_bits: int = 8,
                 fixed: dict[str, int] | None = None):
        self.layers, self.budget = layers, budget
        self.min_bits, self.max_bits = min_bits, max_bits
        self.fixed = dict(fixed or {})
        self.free = [layer for layer in layers if layer.name not in self.fixed]
        self.total = fp32_bitops(layers)
        raw = torch.tensor([[layer.index, layer.in_channels, layer.out_channels, layer.kernel, layer.stride,
                             float(layer.depthwise), layer.weights, layer.in_size] for layer in self.free],
                           dtype=torch.float64)
        span = (raw.max(0).values - raw.min(0).values).clamp_min(1e-12)
        self.features = ((raw - raw.min(0).values) / span).float()

    def reset(self) -> torch.Tensor:
        self.step_index = 0
        self.previous_action = 0.0
        self.bits: list[int] = []
        return self._state()

    @property
    def steps(self) -> int:
        return 2 * len(self.free)

    def _spent(self) -> float:
        spent = 0
        for i, layer in enumerate(self.free[: len(self.bits) // 2]):
            spent += layer.macs * self.bits[2 * i] * self.bits[2 * i + 1]
        return spent / self.total

    def _state(self) -> torch.Tensor:
        if self.step_index >= self.steps:
            return torch.zeros(STATE_DIM)
        layer = self.step_index // 2
        flag = float(self.step_index % 2)
        return torch.cat([self.features[layer], torch.tensor([self.previous_action, flag, self._spent()])])

    def step(self, action: float) -> tuple[torch.Tensor, bool]:
        """Apply one action; returns (next state, done)."""
        self.bits.append(action_to_bits(action, self.min_bits, self.max_bits))
        self.previous_action = action
        self.step_index += 1
        return self._state(), self.step_index >= self.steps

    def policy(self) -> Policy:
        """The chosen policy of the finished episode, after the budget wall."""
        policy = {layer.name: (self.bits[2 * i], self.bits[2 * i + 1]) for i, layer in enumerate(self.free)}
        policy |= {name: (bits, bits) for name, bits in self.fixed.items()}
        policy = {layer.name: policy[layer.name] for layer in self.layers}  # graph order
        return enforce_budget(self.layers, policy, self.budget, self.min_bits, self.fixed)
