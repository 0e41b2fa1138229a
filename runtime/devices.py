"""Where torch work runs: the one rule for the default device (a CUDA GPU when there is one, else the CPU)."""

from __future__ import annotations

import torch

from arqc.base import ArqcError


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``--device``: cpu or cuda[:N]; None means cuda when a GPU is available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ArqcError(f"unknown --device '{name}'; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArqcError("--device cuda asked for but no CUDA GPU is available; use --device cpu")
    return device
