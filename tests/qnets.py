"""Small random quantized networks for the IBP, verifier and QA-IBP tests (conv, linear, relu, add, pooling,
flatten, and a normalization's sub/div), captured, analyzed and simulated like any arqc model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.meta import info, quantizable_nodes
from arqc.passes.policy import apply_policy
from arqc.passes.quantize import simulate

BITS = (2, 3, 4, 6, 8, 32)


@dataclass(frozen=True)
class NetSpec:
    shape: tuple[int, int, int]  # C, H, W
    width: int = 3  # conv channels
    residual: bool = True
    pool: str | None = "max"  # "max", "avg" or None
    hidden: int = 8
    classes: int = 3
    seed: int = 0
    gain: float = 1.0  # input scale: with a large gain one grid step of a pixel crosses quantization steps


class SmallNet(nn.Module):
    def __init__(self, spec: NetSpec):
        super().__init__()
        torch.manual_seed(spec.seed)
        c, h, w = spec.shape
        self.register_buffer("mean", torch.rand(1, c, 1, 1) * 0.5, persistent=False)
        self.register_buffer("std", (0.2 + torch.rand(1, c, 1, 1)) / spec.gain, persistent=False)
        self.conv1 = nn.Conv2d(c, spec.width, 3, padding=1)
        self.conv2 = nn.Conv2d(spec.width, spec.width, 3, padding=1) if spec.residual else None
        self.pool = spec.pool if min(h, w) >= 2 else None
        size = spec.width * ((h // 2) * (w // 2) if self.pool else h * w)
        self.fc1 = nn.Linear(size, spec.hidden)
        self.fc2 = nn.Linear(spec.hidden, spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1((x - self.mean) / self.std))
        if self.conv2 is not None:
            x = F.relu(self.conv2(x) + x)
        if self.pool == "max":
            x = F.max_pool2d(x, 2)
        elif self.pool == "avg":
            x = F.avg_pool2d(x, 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def build_sim(spec: NetSpec, policy_seed: int, scales: str = "float", calibration: int = 32,
              bits: tuple[int, ...] = BITS) -> torch.fx.GraphModule:
    """SmallNet captured, with a random per-layer policy from ``bits`` and random calibration images."""
    gm = analyze(capture(SmallNet(spec).eval(), torch.zeros(1, *spec.shape)))
    g = torch.Generator().manual_seed(policy_seed)
    pick = lambda: bits[int(torch.randint(len(bits), (1,), generator=g))]
    apply_policy(gm, {info(n).layer: (pick(), pick()) for n in quantizable_nodes(gm)})
    return simulate(gm, [torch.rand(calibration, *spec.shape, generator=g)], scales=scales)


def grid_image(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255


def grid_points(k_lo: torch.Tensor, k_hi: torch.Tensor) -> torch.Tensor:
    """Every point of the integer box [k_lo, k_hi] (flattened pixel levels), [N, D]."""
    axes = [torch.arange(int(a), int(b) + 1) for a, b in zip(k_lo, k_hi, strict=True)]
    return torch.cartesian_prod(*axes).reshape(-1, len(axes))


def brute_force_logits(sim: torch.fx.GraphModule, k_lo: torch.Tensor, k_hi: torch.Tensor,
                       shape: tuple[int, ...], chunk: int = 1 << 16) -> torch.Tensor:
    """The logits of every grid point of the box."""
    points = grid_points(k_lo, k_hi)
    with torch.no_grad():
        return torch.cat([sim((points[i : i + chunk].float() / 255).reshape(-1, *shape))
                          for i in range(0, len(points), chunk)])


def brute_force_robust(sim: torch.fx.GraphModule, k_lo: torch.Tensor, k_hi: torch.Tensor, label: int,
                       shape: tuple[int, ...]) -> bool:
    """Whether every grid point of the box is classified ``label``."""
    return bool((brute_force_logits(sim, k_lo, k_hi, shape).argmax(1) == label).all())


def shift_margin(sim: torch.fx.GraphModule, x: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor,
                 closeness: float) -> int:
    """Shift the last layer's bias for the top class at ``x`` so that its smallest margin over the grid box
    becomes ``closeness`` × max(its margin at x − that smallest margin, 0.05): robust iff closeness > 0 (up
    to the bias's rounding). x stays correctly classified (|closeness| is used where it would not).
    Returns the class."""
    with torch.no_grad():
        label = int(sim(x[None])[0].argmax())
        z = brute_force_logits(sim, k_lo, k_hi, tuple(x.shape))
        gap = z[:, label] - z.scatter(1, torch.full((len(z), 1), label), float("-inf")).max(1).values
        z_x = sim(x[None])[0]
        gap_x = float(z_x[label] - z_x.scatter(0, torch.tensor([label]), float("-inf")).max())
        worst = float(gap.min())
        target = closeness * max(gap_x - worst, 0.05)
        if gap_x - worst + target < 0.01:
            target = abs(target)
        last = [m for m in sim.modules() if isinstance(m, nn.Linear)][-1]
        last.bias[label] += target - worst
        step = last.bias_scale()
        while int(sim(x[None])[0].argmax()) != label:  # the bias is quantized: undo a rounding overshoot
            last.bias[label] += 1e-3 if step is None else float(step[label])
    return label

