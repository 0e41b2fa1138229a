"""Quantizable layers (conv2d, linear: ``call_module`` nodes with weights; matmul: the product of two activations,
a ``call_module`` node of :class:`MatMul` without weights) and their interval helpers, and the batch-norm sources
that capture folds into the preceding layer."""

from __future__ import annotations

import operator

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

    def lower(self, b, node, args):  # Gemm on (batch, features); MatMul with W transposed (and Add) on tokens
        if len(b.shape(node.args[0])) == 2:
            x, w, bias = b.layer_operands(node, args[0])
            return b.op("Gemm", [x, w] + ([bias] if bias else []), node.name, transB=1)
        x, w, bias = b.layer_operands(node, args[0], transposed=True)
        product = b.op("MatMul", [x, w], node.name if bias is None else f"{node.name}_matmul")
        return product if bias is None else b.op("Add", [product, bias], node.name)

    def interval(self, node, module, lo, hi, sound=True):
        return _affine_interval(module, lo[0], hi[0], F.linear, sound)


class MatMul(nn.Module):
    """The product of two activations (attention's q·kᵀ and softmax·v) as a quantizable layer without weights: its
    input quantizer is the first operand's (a_bits), and the second operand's is per tensor, affine, at w_bits
    (DESIGN §2), so BitOps = MACs × w_bits × a_bits like every layer's. Capture makes one of every matmul, bmm
    and two-operand einsum of activations."""

    bias = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


@register
class MatMulRule(OpRule):
    kind = "matmul"
    sources = (MatMul, torch.matmul, operator.matmul, aten.matmul.default, torch.bmm, aten.bmm.default, "matmul",
               "bmm")
    quantizable = True

    def macs(self, node, module, out_shape):
        depth = node.args[0].meta["tensor_meta"].shape[-1]
        return int(np.prod(out_shape[1:], dtype=np.int64)) * int(depth)

    def lower(self, b, node, args):
        a, second = b.matmul_operands(node, args[0], args[1])
        return b.op("MatMul", [a, second], node.name)

    def interval(self, node, module, lo, hi, sound=True):
        a_lo, a_hi = _input_interval(module, lo[0], hi[0], sound)
        second = getattr(module, "second", None)
        b_lo, b_hi = (lo[1], hi[1]) if second is None else _input_interval(second, lo[1], hi[1], sound)
        return _matmul_interval(a_lo, a_hi, b_lo, b_hi, sound)


def _input_interval(quantizer: nn.Module, lo, hi, sound: bool) -> tuple:
    """[q(lo), q(hi)] through the input quantizer of a layer or of a matmul's second operand (anything with
    ``quantize_input``, ``act``, ``bits`` or ``a_bits``, ``grid_input``); a float layer passes the bounds through."""
    if not hasattr(quantizer, "quantize_input"):
        return lo, hi
    if not sound:  # the straight-through quantizers are monotone; a grid input is left as it is
        return quantizer.quantize_input(lo), quantizer.quantize_input(hi)
    bits = getattr(quantizer, "a_bits", getattr(quantizer, "bits", 32))
    if quantizer.act is not None and bits < 32 and not quantizer.grid_input:
        return _quantizer_interval(quantizer.act, lo, hi)
    return lo, hi


def _matmul_interval(a_lo, a_hi, b_lo, b_hi, sound: bool) -> tuple:
    """Bounds of A·B for A in [a_lo, a_hi], B in [b_lo, b_hi], in centre/radius form: with A = Ac ± Ar and
    B = Bc ± Br, A·B = Ac·Bc ± (|Ac|·Br + Ar·|Bc| + Ar·Br). Sound mode adds the float32 accumulation error of
    the K products of each output, γ_K·(max|A|·max|B|), as the affine layers do."""
    a_c, a_r = (a_hi + a_lo) / 2, (a_hi - a_lo) / 2
    b_c, b_r = (b_hi + b_lo) / 2, (b_hi - b_lo) / 2
    centre = torch.matmul(a_c, b_c)
    radius = torch.matmul(a_c.abs(), b_r) + torch.matmul(a_r, b_c.abs() + b_r)
    if sound:
        terms = a_lo.shape[-1] + 1
        magnitude = torch.matmul(_abs_max(a_lo, a_hi), _abs_max(b_lo, b_hi))
        radius = radius + rounding_margin(terms, a_lo.dtype) * magnitude + terms * rounding.TINY
    return centre - radius, centre + radius


def layer_operands(module: nn.Module, lo, hi, sound: bool) -> tuple:
    """Bounds of a conv/linear layer's (quantized) input and its effective weight and bias. A QuantLayer's
    input quantizer is monotone, so [lo, hi] maps to [q(lo), q(hi)] (DESIGN §4); float layers and grid inputs
    (already on the layer's 8-bit grid: the forward leaves them as they are) pass through.
    Sound mode: in the bounds' dtype, detached; training mode: the straight-through quantizers."""
    quant = hasattr(module, "quantize_input")
    if not sound:
        lo, hi = _input_interval(module, lo, hi, sound)
        if quant:
            return lo, hi, module.effective_weight(), module.effective_bias()
        return lo, hi, module.weight, module.bias
    with torch.no_grad():
        weight = (module.effective_weight() if quant else module.weight).to(lo.dtype)
        bias = module.effective_bias() if quant else module.bias
        bias = None if bias is None else bias.to(lo.dtype)
        lo, hi = _input_interval(module, lo, hi, sound)
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
