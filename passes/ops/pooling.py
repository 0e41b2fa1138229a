"""Pooling: max pool, average pool, adaptive average pool and the mean over dimensions (and ``_as_tuple``, which
normalizes their size arguments; capture uses it for conv arguments too)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arqc.passes.ops import rounding
from arqc.passes.ops.base import _PassThrough, aten, register
from arqc.passes.ops.rounding import _abs_max, _widen, rounding_margin


def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)


def avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad):
    return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)


def adaptive_avg_pool2d(x, output_size):
    return F.adaptive_avg_pool2d(x, output_size)


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
    return rounding_margin(terms, lo[0].dtype) * pool(_abs_max(lo[0], hi[0]), *lo[1:]) + rounding.TINY


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
        if h % oh == 0 and w % ow == 0:
            return b.op("AveragePool", [args[0]], node.name, kernel_shape=[h // oh, w // ow],
                        strides=[h // oh, w // ow])
        # uneven windows (torch's: rows floor(i·h/oh) to ceil((i + 1)·h/oh)), or more outputs than inputs (AlexNet's
        # 6×6 pool of a 1×1 map): the window means as two products with averaging matrices, P_h · X · P_wᵀ
        cols = b.op("MatMul", [args[0], b.const(_pool_matrix(w, ow).T.copy(), f"{node.name}_cols")],
                    f"{node.name}_cols_mean")
        return b.op("MatMul", [b.const(_pool_matrix(h, oh), f"{node.name}_rows"), cols], node.name)


def _pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size): row i averages torch's adaptive window i of ``size`` inputs."""
    matrix = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = i * size // out, -(-(i + 1) * size // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def mean(x, dims, keepdim):
    return torch.mean(x, dims, keepdim)


@register
class MeanRule(_PassThrough):
    """The mean over some non-batch dimensions (``x.mean([2, 3])``: a global average pool that drops them).
    Monotone in every input, one rounding per term: the average pool's bounds."""

    kind = "mean"
    sources = (torch.mean, aten.mean.dim, "mean")
    fn = staticmethod(mean)

    def canonical_args(self, node, module):
        rank = len(node.args[0].meta["tensor_meta"].shape)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None:
            raise NotImplementedError("mean over every dimension, the batch included")
        dims = tuple(sorted({int(d) % rank for d in ((dims,) if isinstance(dims, int) else dims)}))
        if 0 in dims:
            raise NotImplementedError("mean over the batch dimension")
        keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        return (node.args[0], dims, keepdim)

    def interval(self, node, module, lo, hi, sound=True):
        terms = int(np.prod([lo[0].shape[d] for d in node.args[1]])) + 1  # the sum, and a division

        def average(x, *_):
            return self.fn(x, *node.args[1:])

        return _widen(average(lo[0]), average(hi[0]), lambda: _mean_error(average, terms, lo[:1], hi[:1]), sound)

    def lower(self, b, node, args):  # ReduceMean (opset 18: the axes are an input)
        axes = b.const(np.array(node.args[1], dtype=np.int64), f"{node.name}_axes")
        return b.op("ReduceMean", [args[0], axes], node.name, keepdims=int(node.args[2]))
