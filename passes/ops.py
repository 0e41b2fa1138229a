"""The op registry: everything arqc knows about one op sits in one entry.

An entry (an :class:`OpRule` subclass, registered with :func:`register`) says
- which source calls it replaces (``sources``: nn.Module types, functions, aten overloads, method names) and
  how their arguments map to the canonical form (``canonical_args``), so that fx-traced modules and
  torch.export programs end in one IR (see passes/capture.py);
- how many MACs and parameters it has (``macs``, ``params``);
- whether its output is non-negative (``nonneg``: decides unsigned activation ranges);
- how it lowers to ONNX (``lower``);
- how interval bounds pass through it (``interval``, DESIGN §4; :meth:`OpRule.interval` has two modes).

In the canonical IR a quantizable layer (conv2d, linear) is a ``call_module`` node and every other op is a
``call_function`` node whose target is the entry's ``fn`` with normalized positional arguments.
Supporting a new op is one new entry here.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

RULES: dict[str, OpRule] = {}


def register(cls: type[OpRule]) -> type[OpRule]:
    RULES[cls.kind] = cls()
    return cls


def rule_for_kind(kind: str) -> OpRule:
    return RULES[kind]


def matches(target: Any, sources: tuple) -> bool:
    """Whether a source call (a module type, a function or aten overload, a method name) is one of ``sources``;
    module subclasses match their base."""
    if isinstance(target, type):
        return any(isinstance(s, type) and issubclass(target, s) for s in sources)
    return any(target is s or (isinstance(s, str) and target == s) for s in sources)


def rule_for_source(target: Any) -> OpRule | None:
    """The entry that canonicalizes a source call."""
    for rule in RULES.values():
        if matches(target, rule.sources):
            return rule
    return None


class OpRule:
    kind: str = ""
    sources: tuple = ()
    quantizable = False  # a call_module layer with weights, quantized by the policy

    # -- canonical form ------------------------------------------------------------------------------
    @staticmethod
    def fn(*args):  # the canonical callable; overridden by every call_function entry
        raise NotImplementedError

    def canonical_args(self, node: torch.fx.Node, module: nn.Module | None) -> tuple:
        """Positional arguments of ``fn`` for a source node (``module`` is set for call_module sources)."""
        return tuple(node.args)

    # -- analysis --------------------------------------------------------------------------------------
    def macs(self, node: torch.fx.Node, module: nn.Module | None, out_shape: tuple[int, ...]) -> int:
        return 0

    def params(self, module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    def nonneg(self, node: torch.fx.Node, inputs_nonneg: list[bool]) -> bool:
        return False

    # -- lowering and bounds -------------------------------------------------------------------------
    def lower(self, b, node: torch.fx.Node, args: tuple) -> str:
        """Emit ONNX nodes through the builder ``b`` (passes/lower.py); ``args`` are the node's arguments
        with every fx Node replaced by the name of its ONNX value. Returns the output's name."""
        raise NotImplementedError(self.kind)

    def interval(self, node: torch.fx.Node, module: nn.Module | None, lo: list, hi: list,
                 sound: bool = True) -> tuple:
        """Element-wise bounds of the output. ``lo``/``hi`` are the node's arguments with every tensor input
        replaced by its lower/upper bound (constants appear as themselves in both).

        ``sound=True``: the bounds enclose what the *float32* forward of the simulation computes (in any
        summation order). They are computed in the dtype of ``lo`` (float64 or float32), and each rule widens
        its result by the a-priori rounding error of the float32 op plus that of its own arithmetic
        (:func:`rounding_margin`). ``sound=False``: plain IBP, differentiable (through the straight-through
        quantizers), no margins: for training."""
        raise NotImplementedError(self.kind)


def has_interval(rule: OpRule) -> bool:
    return type(rule).interval is not OpRule.interval


# -- rounding margins for sound bounds ------------------------------------------------------------------
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


class _PassThrough(OpRule):
    """Monotone non-decreasing in its (single) tensor input and computed without rounding (a selection or
    rearrangement of its input's values): non-negativity and intervals pass through exactly."""

    def nonneg(self, node, inputs_nonneg):
        return inputs_nonneg[0]

    def interval(self, node, module, lo, hi, sound=True):
        return self.fn(*lo), self.fn(*hi)


# ------------------------------------------------------------------------------------------------------
# Quantizable layers


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
    input quantizer is monotone, so [lo, hi] maps to [q(lo), q(hi)] (DESIGN §4); float layers pass through.
    Sound mode: in the bounds' dtype, detached; training mode: the straight-through quantizers."""
    quant = hasattr(module, "quantize_input")
    if not sound:
        if quant:
            return module.quantize_input(lo), module.quantize_input(hi), module.effective_weight(), \
                module.effective_bias()
        return lo, hi, module.weight, module.bias
    with torch.no_grad():
        weight = (module.effective_weight() if quant else module.weight).to(lo.dtype)
        bias = module.effective_bias() if quant else module.bias
        bias = None if bias is None else bias.to(lo.dtype)
        if quant and module.act is not None and module.a_bits < 32:
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

    u = unit_roundoff(lo.dtype)
    t_lo, t_hi = lo / act.scale, hi / act.scale
    q_lo, q_hi = q(t_lo - (8 * U32 + 2 * u) * t_lo.abs()), q(t_hi + (8 * U32 + 2 * u) * t_hi.abs())
    x_lo, x_hi = q_lo * act.scale, q_hi * act.scale
    return x_lo - (3 * U32 + 2 * u) * x_lo.abs(), x_hi + (3 * U32 + 2 * u) * x_hi.abs()


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
        radius = radius + rounding_margin(terms, lo.dtype) * magnitude + terms * TINY
    return centre - radius, centre + radius


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
    return (4 * U32 + 2 * _u(low)) * _abs_max(low, high) + TINY


def _sum_error(lo, hi):
    """Rounding error of a float32 a ± b (one rounding, and a constant rounded to float32), and of ours."""
    return (3 * U32 + 2 * _u(*lo)) * (_abs_max(lo[0], hi[0]) + _abs_max(lo[1], hi[1])) + TINY


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


# ------------------------------------------------------------------------------------------------------
# Pooling and shape ops


def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)


def avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad):
    return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)


def adaptive_avg_pool2d(x, output_size):
    return F.adaptive_avg_pool2d(x, output_size)


def flatten(x):
    return torch.flatten(x, 1)


def pad(x, pads, value):
    return F.pad(x, pads, "constant", value)


def slice_(x, dim, start, end, step):
    return x[(slice(None),) * dim + (slice(start, end, step),)]


def cat(tensors, dim):
    return torch.cat(tensors, dim)


def _pair(v) -> list[int]:
    return list(v) * 2 if len(v) == 1 else list(v)


def _as_tuple(v) -> tuple[int, int]:
    return tuple(_pair(v)) if isinstance(v, list | tuple) else (int(v), int(v))


@register
class MaxPoolRule(_PassThrough):
    kind = "max_pool2d"
    sources = (nn.MaxPool2d, F.max_pool2d, aten.max_pool2d.default)
    fn = staticmethod(max_pool2d)

    def canonical_args(self, node, module):
        if module is not None:
            m = module
            return (node.args[0], _as_tuple(m.kernel_size), _as_tuple(m.stride or m.kernel_size),
                    _as_tuple(m.padding), _as_tuple(m.dilation), bool(m.ceil_mode))
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        vals = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
        k = _as_tuple(vals["kernel_size"])
        stride = vals.get("stride") or k
        return (node.args[0], k, _as_tuple(stride), _as_tuple(vals.get("padding", 0)),
                _as_tuple(vals.get("dilation", 1)), bool(vals.get("ceil_mode", False)))

    def lower(self, b, node, args):
        _, k, s, p, d, ceil = node.args
        return b.op("MaxPool", [args[0]], node.name, kernel_shape=list(k), strides=list(s),
                    pads=[p[0], p[1], p[0], p[1]], dilations=list(d), ceil_mode=int(ceil))


def _mean_error(pool, terms: int, lo: list, hi: list):
    """Rounding error of a float32 average of at most ``terms - 1`` values: γ·(the average of |x|)."""
    return rounding_margin(terms, lo[0].dtype) * pool(_abs_max(lo[0], hi[0]), *lo[1:]) + TINY


@register
class AvgPoolRule(_PassThrough):
    kind = "avg_pool2d"
    sources = (nn.AvgPool2d, F.avg_pool2d, aten.avg_pool2d.default)
    fn = staticmethod(avg_pool2d)

    def canonical_args(self, node, module):
        if module is not None:
            m = module
            return (node.args[0], _as_tuple(m.kernel_size), _as_tuple(m.stride or m.kernel_size),
                    _as_tuple(m.padding), bool(m.ceil_mode), bool(m.count_include_pad))
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
        vals = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
        k = _as_tuple(vals["kernel_size"])
        return (node.args[0], k, _as_tuple(vals.get("stride") or k), _as_tuple(vals.get("padding", 0)),
                bool(vals.get("ceil_mode", False)), bool(vals.get("count_include_pad", True)))

    def interval(self, node, module, lo, hi, sound=True):  # a mean: monotone, k terms and a division
        terms = node.args[1][0] * node.args[1][1] + 1
        return _widen(self.fn(*lo), self.fn(*hi), lambda: _mean_error(self.fn, terms, lo, hi), sound)

    def lower(self, b, node, args):
        _, k, s, p, ceil, cip = node.args
        return b.op("AveragePool", [args[0]], node.name, kernel_shape=list(k), strides=list(s),
                    pads=[p[0], p[1], p[0], p[1]], ceil_mode=int(ceil), count_include_pad=int(cip))


@register
class AdaptiveAvgPoolRule(_PassThrough):
    kind = "adaptive_avg_pool2d"
    sources = (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d, aten.adaptive_avg_pool2d.default,
               aten._adaptive_avg_pool2d.default)
    fn = staticmethod(adaptive_avg_pool2d)

    def canonical_args(self, node, module):
        size = module.output_size if module is not None else node.args[1]
        return (node.args[0], _as_tuple(size))

    def interval(self, node, module, lo, hi, sound=True):
        (h, w), (oh, ow) = lo[0].shape[2:], node.args[1]
        terms = (-(-h // oh) + 1) * (-(-w // ow) + 1) + 1  # the largest adaptive window, and a division
        return _widen(self.fn(*lo), self.fn(*hi), lambda: _mean_error(self.fn, terms, lo, hi), sound)

    def lower(self, b, node, args):
        h, w = b.shape(node.args[0])[2:]
        oh, ow = node.args[1]
        if (oh, ow) == (1, 1):
            return b.op("GlobalAveragePool", [args[0]], node.name)
        if h % oh or w % ow:
            raise NotImplementedError(f"adaptive_avg_pool2d {h}x{w} -> {oh}x{ow} (not an even split)")
        return b.op("AveragePool", [args[0]], node.name, kernel_shape=[h // oh, w // ow], strides=[h // oh, w // ow])


@register
class FlattenRule(_PassThrough):
    """Flatten everything after the batch dimension (also what a 2-D view/reshape of a batch becomes)."""

    kind = "flatten"
    sources = (nn.Flatten, torch.flatten, aten.flatten.using_ints, "flatten",
               aten.view.default, aten.reshape.default, torch.reshape, "view", "reshape")
    fn = staticmethod(flatten)

    def canonical_args(self, node, module):
        in_shape = node.args[0].meta["tensor_meta"].shape
        out_shape = node.meta["tensor_meta"].shape
        if len(out_shape) != 2 or out_shape[0] != in_shape[0]:
            raise NotImplementedError(f"{node.target} to shape {tuple(out_shape)} (only flattening is supported)")
        return (node.args[0],)

    def lower(self, b, node, args):
        return b.op("Flatten", [args[0]], node.name, axis=1)


@register
class PadRule(_PassThrough):
    kind = "pad"
    sources = (F.pad, aten.pad.default, aten.constant_pad_nd.default)
    fn = staticmethod(pad)

    def canonical_args(self, node, module):
        args = list(node.args) + [None] * 4
        if node.target is aten.constant_pad_nd.default:
            mode, value = "constant", node.kwargs.get("value", args[2])
        else:
            mode = node.kwargs.get("mode", args[2]) or "constant"
            value = node.kwargs.get("value", args[3])
        if mode != "constant":
            raise NotImplementedError(f"pad mode {mode!r}")
        return (node.args[0], tuple(int(p) for p in node.args[1]), float(value or 0.0))

    def nonneg(self, node, inputs_nonneg):
        return inputs_nonneg[0] and node.args[2] >= 0

    def interval(self, node, module, lo, hi, sound=True):
        x, pads, value = node.args  # the float32 forward pads with the float32 constant
        value = _f32(value) if sound else value
        return pad(lo[0], pads, value), pad(hi[0], pads, value)

    def lower(self, b, node, args):
        _, pads, value = node.args
        rank = len(b.shape(node.args[0]))
        begin, end = [0] * rank, [0] * rank
        for i in range(len(pads) // 2):  # torch lists (begin, end) pairs from the last dimension backwards
            begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
        return b.op("Pad", [args[0], b.const(np.array(begin + end, np.int64), f"{node.name}_pads"),
                            b.const(np.float32(value), f"{node.name}_value")], node.name, mode="constant")


@register
class SliceRule(_PassThrough):
    """One strided slice along one dimension; ``x[:, :, ::2, ::2]`` becomes a chain of these."""

    kind = "slice"
    sources = (aten.slice.Tensor,)
    fn = staticmethod(slice_)

    def canonical_args(self, node, module):
        names = ("dim", "start", "end", "step")
        vals = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
        return (node.args[0], int(vals.get("dim", 0)), vals.get("start"), vals.get("end"), int(vals.get("step", 1)))

    def lower(self, b, node, args):
        _, dim, start, end, step = node.args
        big = np.iinfo(np.int64).max
        consts = [np.array([v], np.int64) for v in (start or 0, big if end is None else end, dim, step)]
        names = [b.const(c, f"{node.name}_{k}") for c, k in zip(consts, ("starts", "ends", "axes", "steps"),
                                                                   strict=True)]
        return b.op("Slice", [args[0], *names], node.name)


@register
class CatRule(OpRule):
    kind = "cat"
    sources = (torch.cat, aten.cat.default)
    fn = staticmethod(cat)

    def canonical_args(self, node, module):
        return (list(node.args[0]), int(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)))

    def nonneg(self, node, inputs_nonneg):
        return all(inputs_nonneg)

    def interval(self, node, module, lo, hi, sound=True):
        return torch.cat(lo[0], lo[1]), torch.cat(hi[0], hi[1])

    def lower(self, b, node, args):
        return b.op("Concat", list(args[0]), node.name, axis=node.args[1])


# Sources that compute the identity at inference time; capture removes them.
IDENTITY_SOURCES = (nn.Dropout, nn.Identity, F.dropout, aten.dropout.default, aten.alias.default,
                    aten.clone.default, aten.contiguous.default, aten.detach.default, "contiguous", "detach")
BATCHNORM_SOURCES = (nn.BatchNorm2d, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
