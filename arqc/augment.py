"""Training-time augmentation, shared by ``arqc train`` and noise-aware QAT: random 4-pixel-padded crops and
horizontal flips, drawn from the caller's generator (so a seeded run is reproducible)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTS = ("auto", "none", "crop-flip", "crop")


def resolve_augment(kind: str, x: torch.Tensor) -> str:
    """``auto``: crops and flips for colour photos (3 channels), nothing for digits; other kinds as given."""
    if kind != "auto":
        return kind
    return "crop-flip" if x.shape[1] == 3 else "none"


def augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crops (and horizontal flips for ``crop-flip``) of a batch."""
    if kind == "none":
        return x
    b, c, h, w = x.shape
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if kind == "crop-flip":
        flip = torch.rand(b, generator=gen) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out
