"""A base classifier whose smoothed class probability is known in closed form (for the statistics tests)."""

from __future__ import annotations

import numpy as np
import torch

SHAPE = (1, 2, 2)
W = np.array([1.0, -2.0, 0.5, 1.5])


class LinearClassifier(torch.nn.Module):
    """f(x) = 1[w·x + b > 0]: P(f(x+ε) = 1) = Φ((w·x + b) / (σ‖w‖)); the true L2 radius is |w·x + b| / ‖w‖."""

    def __init__(self, w: np.ndarray = W, b: float = 0.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float32))
        self.b = torch.nn.Parameter(torch.tensor(float(b)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], dim=1)
