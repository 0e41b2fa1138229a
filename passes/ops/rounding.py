"""Rounding margins for sound bounds: the unit roundoff of the dtype bounds are computed in, the a-priori error
of a float32 sum of products, and the helpers interval rules widen their results with."""

from __future__ import annotations

import numpy as np
import torch

U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 and float64
TINY = 2.0**-126  # per-op absolute error from underflow (subnormals or flush-to-zero) in float32


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of the dtype sound bounds are computed in."""
    if dtype not in (torch.float32, torch.float64):
        raise NotImplementedError(f"sound bounds in {dtype} (use float32 or float64)")
    return U32 if dtype == torch.float32 else U64


def rounding_margin(terms: int, dtype: torch.dtype = torch.float64) -> float:
    """Relative a-priori error of a float32 sum of ``terms`` products (any order, FMA or not), plus the
    error of computing the bound itself in ``dtype`` (a few more operations): γ_n(float32) + γ_(n+4)(dtype)
    (Higham, Accuracy and Stability of Numerical Algorithms, §3.1)."""
    u = unit_roundoff(dtype)
    return terms * U32 / (1 - terms * U32) + (terms + 4) * u / (1 - (terms + 4) * u)


def _u(*values) -> float:
    """Unit roundoff of the bounds among ``values`` (tensors or numbers)."""
    return unit_roundoff(next(v.dtype for v in values if isinstance(v, torch.Tensor)))


def _widen(lo, hi, error, sound: bool) -> tuple:
    """[lo - e, hi + e] with e = error() (an element-wise bound on the rounding error) when ``sound``."""
    if not sound:
        return lo, hi
    e = error()
    return lo - e, hi + e


def _abs_max(lo, hi):
    """max |x| over [lo, hi], element-wise (numbers allowed)."""
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return torch.maximum(torch.as_tensor(lo).abs(), torch.as_tensor(hi).abs())
    return max(abs(lo), abs(hi))


def _f32(value: float | None) -> float | None:
    """A float constant as the float32 forward sees it."""
    return None if value is None else float(np.float32(value))
