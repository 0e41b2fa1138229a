"""Smooth and piecewise activations that run in float between quantized ops (DESIGN §2): sigmoid, tanh,
hardsigmoid (monotone), and hardswish, silu, gelu (one interior minimum each).

Interval rules. A monotone non-decreasing f maps [l, h] to [f(l), f(h)]. hardswish, silu and gelu decrease
down to their minimum at x* and increase after it, so over [l, h] the maximum is max(f(l), f(h)) and the
minimum is f(x*) when x* lies in [l, h], else min(f(l), f(h)). The bounds are computed in float64 and, with
``sound``, widened by the float32 forward's error: these are library approximations (exp, erf, tanh), not
correctly rounded, so the margin is generous, 64 float32 ulps of |f(x)| + |x| (|x| covers the cancellation in
gelu's 1 + erf(x/√2) and silu's x·sigmoid(x) for negative x), plus an absolute TINY; the minimum f(x*) is the
float64 value less the same margin.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arqc.passes.ops import rounding
from arqc.passes.ops.base import OpRule, aten, register
from arqc.passes.ops.rounding import _abs_max

ULPS = 64  # float32 ulps of slack for the library approximations of exp, erf and tanh


def sigmoid(x):
    return torch.sigmoid(x)


def tanh(x):
    return torch.tanh(x)


def hardsigmoid(x):
    return F.hardsigmoid(x)


def hardswish(x):
    return F.hardswish(x)


def silu(x):
    return F.silu(x)


def gelu(x, approximate: str = "none"):
    return F.gelu(x, approximate=approximate)


def _minimum(f, lo: float, hi: float) -> tuple[float, float]:
    """(x*, f(x*)) of a function with one interior minimum in [lo, hi], by golden-section search in float64 (to
    float64 rounding: f there exceeds the true minimum by ~1e-32, which the sound margin covers)."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(200):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if f(torch.tensor(c, dtype=torch.float64)) < f(torch.tensor(d, dtype=torch.float64)):
            b = d
        else:
            a = c
    x = (a + b) / 2
    return x, float(f(torch.tensor(x, dtype=torch.float64)))


class _Activation(OpRule):
    """An element-wise activation of one tensor; ``minimum`` is (x*, f(x*)) for the non-monotone ones."""

    onnx_op = ""
    minimum: tuple[float, float] | None = None
    nonnegative = False

    def canonical_args(self, node, module):
        return (node.args[0],)

    def nonneg(self, node, inputs_nonneg):
        return self.nonnegative

    def _error(self, x_abs, f_abs):
        return ULPS * rounding.U32 * (f_abs + x_abs) + rounding.TINY

    def _bounds(self, node, lo, hi):
        f = lambda t: self.fn(t, *node.args[1:])  # noqa: E731 - the canonical extra arguments (gelu's mode)
        f_lo, f_hi = f(lo), f(hi)
        if self.minimum is None:
            return f_lo, f_hi, f_lo, f_hi
        x_star, f_star = self._minimum_of(node)
        low = torch.minimum(f_lo, f_hi)
        low = torch.where((lo <= x_star) & (hi >= x_star), torch.full_like(low, f_star), low)
        return low, torch.maximum(f_lo, f_hi), f_lo, f_hi

    def _minimum_of(self, node) -> tuple[float, float]:
        return self.minimum

    def interval(self, node, module, lo, hi, sound=True):
        low, high, f_lo, f_hi = self._bounds(node, lo[0], hi[0])
        if not sound:
            return low, high
        x_abs = _abs_max(lo[0], hi[0])
        f_abs = torch.maximum(torch.maximum(f_lo.abs(), f_hi.abs()), low.abs())
        e = self._error(x_abs, f_abs)
        return low - e, high + e

    def lower(self, b, node, args):
        return b.op(self.onnx_op, [args[0]], node.name)


@register
class SigmoidRule(_Activation):
    kind, onnx_op, nonnegative = "sigmoid", "Sigmoid", True
    sources = (nn.Sigmoid, torch.sigmoid, F.sigmoid, aten.sigmoid.default, aten.sigmoid_.default, "sigmoid",
               "sigmoid_")
    fn = staticmethod(sigmoid)


@register
class TanhRule(_Activation):
    kind, onnx_op = "tanh", "Tanh"
    sources = (nn.Tanh, torch.tanh, F.tanh, aten.tanh.default, aten.tanh_.default, "tanh", "tanh_")
    fn = staticmethod(tanh)


@register
class HardsigmoidRule(_Activation):
    kind, nonnegative = "hardsigmoid", True
    sources = (nn.Hardsigmoid, F.hardsigmoid, aten.hardsigmoid.default, aten.hardsigmoid_.default)
    fn = staticmethod(hardsigmoid)

    def lower(self, b, node, args):  # torch: relu6(x + 3) / 6 = clip(x / 6 + 1/2, 0, 1)
        return b.op("HardSigmoid", [args[0]], node.name, alpha=1.0 / 6.0, beta=0.5)


@register
class HardswishRule(_Activation):
    kind, onnx_op = "hardswish", "HardSwish"
    sources = (nn.Hardswish, F.hardswish, aten.hardswish.default, aten.hardswish_.default)
    fn = staticmethod(hardswish)
    minimum = (-1.5, -0.375)  # x·(x + 3)/6 on [-3, 3]: exact


@register
class SiluRule(_Activation):
    kind = "silu"
    sources = (nn.SiLU, F.silu, aten.silu.default, aten.silu_.default)
    fn = staticmethod(silu)
    minimum = _minimum(F.silu, -3.0, 0.0)  # x* = -1.2785, f(x*) = -0.2785

    def lower(self, b, node, args):  # x · sigmoid(x): ONNX has no SiLU operator
        return b.op("Mul", [args[0], b.op("Sigmoid", [args[0]], f"{node.name}_sigmoid")], node.name)


_GELU_MINIMA = {mode: _minimum(lambda t, m=mode: F.gelu(t, approximate=m), -3.0, 0.0) for mode in ("none", "tanh")}


@register
class GeluRule(_Activation):
    kind = "gelu"
    sources = (nn.GELU, F.gelu, aten.gelu.default, aten.gelu_.default)
    fn = staticmethod(gelu)
    minimum = _GELU_MINIMA["none"]  # x* = -0.7518, f(x*) = -0.1700

    def canonical_args(self, node, module):
        if isinstance(module, nn.GELU):
            mode = module.approximate
        else:
            mode = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if mode not in _GELU_MINIMA:
            raise NotImplementedError(f"gelu with approximate={mode!r}")
        return (node.args[0], mode)

    def _minimum_of(self, node):
        return _GELU_MINIMA[node.args[1]]

    def lower(self, b, node, args):  # ONNX Gelu (opset 20), the same two modes
        return b.op("Gelu", [args[0]], node.name, approximate=node.args[1])

