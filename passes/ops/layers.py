"""Quantizable layers (conv2d, linear: ``call_module`` nodes with weights) and their interval helpers, and the
batch-norm sources that capture folds into the preceding layer."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arqc.passes.ops import rounding
from arqc.passes.ops.base import OpRule, aten, register
from arqc.passes.ops.rounding import _abs_max, rounding_margin, unit_roundoff


@register
class Conv2dRule(OpRule):
    kind = "conv2d"
    sources = (nn.Conv2d, aten.conv2d.default, aten.convolution.default, F.conv2d)
    quantizable = True

    def macs(self, node, module, out_shape):
        kh, kw = module.kernel_size
        return int(np.prod(out_shape[1:])) * (module.in_channels // module.groups) * kh * kw

    def lower(self, b, node, args):
        m = b.module(node)
        x, w, bias = b.layer_operands(node, args[0])
        ph, pw = m.padding
        attrs = dict(kernel_shape=list(m.kernel_size), strides=list(m.stride), pads=[ph, pw, ph, pw],
                     dilations=list(m.dilation), group=m.groups)
        return b.op("Conv", [x, w] + ([bias] if bias else []), node.name, **attrs)

    def interval(self, node, module, lo, hi, sound=True):
        return _affine_interval(module, lo[0], hi[0], module._conv_forward, sound)


@register
class LinearRule(OpRule):
    kind = "linear"
    sources = (nn.Linear, aten.linear.default, F.linear)
    quantizable = True

    def macs(self, node, module, out_shape):
        return int(np.prod(out_shape[1:-1], dtype=np.int64)) * module.in_features * module.out_features

    def lower(self, b, node, args):
        x, w, bias = b.layer_operands(node, args[0])
        return b.op("Gemm", [x, w] + ([bias] if bias else []), node.name, transB=1)

    def interval(self, node, module, lo, hi, sound=True):
        return _affine_interval(module, lo[0], hi[0], F.linear, sound)


def layer_operands(module: nn.Module, lo, hi, sound: bool) -> tuple:
    """Bounds of a conv/linear layer's (quantized) input and its effective weight and bias. A QuantLayer's
    input quantizer is monotone, so [lo, hi] maps to [q(lo), q(hi)] (DESIGN §4); float layers and grid inputs
    (already on the layer's 8-bit grid: the forward leaves them as they are) pass through.
    Sound mode: in the bounds' dtype, detached; training mode: the straight-through quantizers."""
    quant = hasattr(module, "quantize_input")
    if not sound:  # quantize_input leaves a grid input as it is
        if quant:
            return module.quantize_input(lo), module.quantize_input(hi), module.effective_weight(), \
                module.effective_bias()
        return lo, hi, module.weight, module.bias
    with torch.no_grad():
        weight = (module.effective_weight() if quant else module.weight).to(lo.dtype)
        bias = module.effective_bias() if quant else module.bias
        bias = None if bias is None else bias.to(lo.dtype)
        if quant and module.act is not None and module.a_bits < 32 and not module.grid_input:
            lo, hi = _quantizer_interval(module.act, lo, hi)
    return lo, hi, weight, bias


def _quantizer_interval(act, lo: torch.Tensor, hi: torch.Tensor) -> tuple:
    """Sound bounds of the float32 fake-quantizer (clamp(round(x/s) + z) - z)·s over [lo, hi].
    The float32 forward computes x/s with at most 3 roundings (s to float32, then a division, or a
    reciprocal and a product on some devices), so round() sees x/s·(1 ± 3u): the argument is widened by
    8u (plus two roundings of this computation) before rounding, which is monotone (half to even). The
    dequantized value (q - z)·s is one float32 product with float32(s) (2 roundings): widened by 3u (plus
    ours). Every margin here and below keeps one spare rounding for second-order terms."""
    def q(t):
        return torch.clamp(torch.round(t) + act.zero_point, act.qmin, act.qmax) - act.zero_point

    u, u32 = unit_roundoff(lo.dtype), rounding.U32
    t_lo, t_hi = lo / act.scale, hi / act.scale
    q_lo, q_hi = q(t_lo - (8 * u32 + 2 * u) * t_lo.abs()), q(t_hi + (8 * u32 + 2 * u) * t_hi.abs())
    x_lo, x_hi = q_lo * act.scale, q_hi * act.scale
    return x_lo - (3 * u32 + 2 * u) * x_lo.abs(), x_hi + (3 * u32 + 2 * u) * x_hi.abs()


def _affine_interval(module, lo, hi, affine, sound: bool = True):
    """Bounds of a (simulated-quantized) conv/linear layer in centre/radius form (DESIGN §4):
    [q(lo), q(hi)] through the input quantizer, then W·c + b ± |W|·r. Sound mode adds the float32
    accumulation error γ_n·(|W|·max|x| + |b|) over the n = fan-in + 1 terms of each output."""
    lo, hi, weight, bias = layer_operands(module, lo, hi, sound)
    centre = affine((hi + lo) / 2, weight, bias)
    radius = affine((hi - lo) / 2, weight.abs(), None)
    if sound:
        terms = weight[0].numel() + 1
        magnitude = affine(_abs_max(lo, hi), weight.abs(), None if bias is None else bias.abs())
        radius = radius + rounding_margin(terms, lo.dtype) * magnitude + terms * rounding.TINY
    return centre - radius, centre + radius


# Batch norm is no entry: capture folds it into the conv2d/linear layer before it.
BATCHNORM_SOURCES = (nn.BatchNorm2d, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
