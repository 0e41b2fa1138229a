"""Element-wise ops: the activations relu and clamp, and the arithmetic add, sub, mul, div (tensor ⊕ tensor or
tensor ⊕ constant; constants are get_attr nodes or numbers), with the rounding errors of the arithmetic."""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arqc.passes.ops import rounding
from arqc.passes.ops.base import OpRule, _PassThrough, aten, register
from arqc.passes.ops.rounding import _abs_max, _f32, _u, _widen

# ------------------------------------------------------------------------------------------------------
# Activations


def relu(x):
    return torch.relu(x)


def clamp(x, lo: float | None, hi: float | None):
    return torch.clamp(x, lo, hi)


@register
class ReluRule(_PassThrough):
    kind = "relu"
    sources = (nn.ReLU, F.relu, torch.relu, aten.relu.default, aten.relu_.default, "relu", "relu_")
    fn = staticmethod(relu)

    def canonical_args(self, node, module):
        return (node.args[0],)

    def nonneg(self, node, inputs_nonneg):
        return True

    def lower(self, b, node, args):
        return b.op("Relu", [args[0]], node.name)


@register
class ClampRule(_PassThrough):
    kind = "clamp"
    sources = (nn.ReLU6, nn.Hardtanh, F.relu6, F.hardtanh, torch.clamp, aten.relu6.default,
               aten.relu6_.default, aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default,
               "clamp")
    fn = staticmethod(clamp)

    def canonical_args(self, node, module):
        if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            return (node.args[0], float(module.min_val), float(module.max_val))
        if node.target in (F.relu6, aten.relu6.default, aten.relu6_.default):
            return (node.args[0], 0.0, 6.0)
        args = list(node.args) + [None] * 3
        if node.target in (F.hardtanh, aten.hardtanh.default, aten.hardtanh_.default):
            lo = node.kwargs.get("min_val", args[1] if args[1] is not None else -1.0)
            hi = node.kwargs.get("max_val", args[2] if args[2] is not None else 1.0)
        else:
            lo, hi = node.kwargs.get("min", args[1]), node.kwargs.get("max", args[2])
        return (node.args[0], None if lo is None else float(lo), None if hi is None else float(hi))

    def nonneg(self, node, inputs_nonneg):
        return inputs_nonneg[0] or (node.args[1] is not None and node.args[1] >= 0)

    def interval(self, node, module, lo, hi, sound=True):
        _, low, high = node.args  # the float32 forward clamps at the float32 constants
        low, high = (_f32(low), _f32(high)) if sound else (low, high)
        return clamp(lo[0], low, high), clamp(hi[0], low, high)

    def lower(self, b, node, args):
        _, lo, hi = node.args
        bounds = [b.const(np.float32(v), f"{node.name}_{k}") if v is not None else "" for k, v in
                  (("min", lo), ("max", hi))]
        return b.op("Clip", [args[0], *bounds], node.name)


# ------------------------------------------------------------------------------------------------------
# Element-wise arithmetic (tensor ⊕ tensor or tensor ⊕ constant; constants are get_attr nodes or numbers)


def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def mul(a, b):
    return a * b


def div(a, b):
    return a / b


class _Binary(OpRule):
    onnx_op = ""

    def canonical_args(self, node, module):
        if node.kwargs.get("alpha", 1) != 1:
            raise NotImplementedError(f"{node.target} with alpha != 1")
        return (node.args[0], node.args[1])

    def lower(self, b, node, args):
        operands = [a if isinstance(a, str) else b.const(np.float32(a), f"{node.name}_{i}")
                    for i, a in enumerate(args)]
        return b.op(self.onnx_op, operands, node.name)


@register
class AddRule(_Binary):
    kind, onnx_op = "add", "Add"
    sources = (operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor, "add", "add_")
    fn = staticmethod(add)

    def nonneg(self, node, inputs_nonneg):
        return all(inputs_nonneg)

    def interval(self, node, module, lo, hi, sound=True):
        return _widen(lo[0] + lo[1], hi[0] + hi[1], lambda: _sum_error(lo, hi), sound)


def _product_error(low, high):
    """Rounding error of a float32 a·b or a/b (at most three roundings, with a constant's), and of ours."""
    return (4 * rounding.U32 + 2 * _u(low)) * _abs_max(low, high) + rounding.TINY


def _sum_error(lo, hi):
    """Rounding error of a float32 a ± b (one rounding, and a constant rounded to float32), and of ours."""
    magnitude = _abs_max(lo[0], hi[0]) + _abs_max(lo[1], hi[1])
    return (3 * rounding.U32 + 2 * _u(*lo)) * magnitude + rounding.TINY


@register
class SubRule(_Binary):
    kind, onnx_op = "sub", "Sub"
    sources = (operator.sub, torch.sub, aten.sub.Tensor, "sub")
    fn = staticmethod(sub)

    def interval(self, node, module, lo, hi, sound=True):
        return _widen(lo[0] - hi[1], hi[0] - lo[1], lambda: _sum_error(lo, hi), sound)


@register
class MulRule(_Binary):
    kind, onnx_op = "mul", "Mul"
    sources = (operator.mul, torch.mul, aten.mul.Tensor, "mul")
    fn = staticmethod(mul)

    def nonneg(self, node, inputs_nonneg):
        return all(inputs_nonneg)

    def interval(self, node, module, lo, hi, sound=True):
        products = torch.stack(torch.broadcast_tensors(lo[0] * lo[1], lo[0] * hi[1], hi[0] * lo[1],
                                                       hi[0] * hi[1]))
        low, high = products.min(0).values, products.max(0).values
        return _widen(low, high, lambda: _product_error(low, high), sound)


@register
class DivRule(_Binary):
    kind, onnx_op = "div", "Div"
    sources = (operator.truediv, torch.div, aten.div.Tensor, "div")
    fn = staticmethod(div)

    def nonneg(self, node, inputs_nonneg):
        return all(inputs_nonneg)

    def interval(self, node, module, lo, hi, sound=True):
        if not bool((torch.as_tensor(lo[1]) > 0).all()):
            raise NotImplementedError("division by an interval that contains 0 or negatives")
        quotients = torch.stack(torch.broadcast_tensors(lo[0] / lo[1], lo[0] / hi[1], hi[0] / lo[1],
                                                        hi[0] / hi[1]))
        low, high = quotients.min(0).values, quotients.max(0).values
        return _widen(low, high, lambda: _product_error(low, high), sound)


def affine(x, scale, shift):
    return x * scale + shift


@register
class AffineRule(OpRule):
    """A per-channel x·scale + shift with constant scale and shift: what a BatchNorm that no conv precedes
    becomes at capture (its sources are none: capture builds it). Float between quantized ops."""

    kind = "affine"
    fn = staticmethod(affine)

    def interval(self, node, module, lo, hi, sound=True):
        scale, shift = lo[1], lo[2]
        a, b = lo[0] * scale, hi[0] * scale
        low, high = torch.minimum(a, b) + shift, torch.maximum(a, b) + shift
        # float32 x·s + t: two roundings, the constants' own (already float32), and ours
        return _widen(low, high, lambda: (4 * rounding.U32 + 4 * _u(low)) * (_abs_max(a, b) + shift.abs())
                      + rounding.TINY, sound)

    def lower(self, b, node, args):
        product = b.op("Mul", [args[0], args[1]], f"{node.name}_scale")
        return b.op("Add", [product, args[2]], node.name)
