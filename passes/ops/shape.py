"""Shape ops, which select or rearrange values: flatten (and 2-D views/reshapes of a batch), reshape, permute,
constant pad, strided slice, select, concatenation, a constant expanded over the batch; and the sources that
compute the identity at inference time."""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
import torchvision
from torch import nn

from arqc.passes.ops.base import RULES, OpRule, _PassThrough, aten, register
from arqc.passes.ops.rounding import _f32


def flatten(x):
    return torch.flatten(x, 1)


def pad(x, pads, value):
    return F.pad(x, pads, "constant", value)


def slice_(x, dim, start, end, step):
    return x[(slice(None),) * dim + (slice(start, end, step),)]


def cat(tensors, dim):
    return torch.cat(tensors, dim)


@register
class FlattenRule(_PassThrough):
    """Flatten everything after the batch dimension (also what a 2-D view/reshape of a batch becomes)."""

    kind = "flatten"
    sources = (nn.Flatten, torch.flatten, aten.flatten.using_ints, "flatten",
               aten.view.default, aten.reshape.default, torch.reshape, "view", "reshape")
    fn = staticmethod(flatten)

    def refine(self, node):  # flatten(x, 2) and views to other shapes are reshapes
        in_shape, out_shape = node.args[0].meta["tensor_meta"].shape, node.meta["tensor_meta"].shape
        flattens = len(out_shape) == 2 and out_shape[0] == in_shape[0]
        return self if flattens else RULES["reshape"]

    def canonical_args(self, node, module):
        in_shape = node.args[0].meta["tensor_meta"].shape
        out_shape = node.meta["tensor_meta"].shape
        if len(out_shape) != 2 or out_shape[0] != in_shape[0]:
            raise NotImplementedError(f"{node.target} to shape {tuple(out_shape)} (only flattening is supported)")
        return (node.args[0],)

    def lower(self, b, node, args):
        return b.op("Flatten", [args[0]], node.name, axis=1)


def reshape(x, shape):
    return x.reshape(x.shape[0], *shape)


def permute(x, perm):
    return x.permute(perm)


@register
class ReshapeRule(_PassThrough):
    """A view/reshape that keeps the batch dimension (channel shuffles, token grids); flattening views stay
    ``flatten``. A rearrangement of its input's values: bounds and grids pass through."""

    kind = "reshape"
    sources = ()  # reached through FlattenRule.refine: view and reshape are its sources
    fn = staticmethod(reshape)

    def canonical_args(self, node, module):
        in_shape, out_shape = node.args[0].meta["tensor_meta"].shape, node.meta["tensor_meta"].shape
        if out_shape[0] != in_shape[0]:
            raise NotImplementedError(f"{node.target} to shape {tuple(out_shape)} moves the batch dimension")
        return (node.args[0], tuple(int(d) for d in out_shape[1:]))

    def lower(self, b, node, args):  # 0 copies the (dynamic) batch dimension
        shape = b.const(np.array([0, *node.args[1]], dtype=np.int64), f"{node.name}_shape")
        return b.op("Reshape", [args[0], shape], node.name)


# the sources that swap two dimensions
SWAPS = (torch.transpose, aten.transpose.int, "transpose", torch.swapaxes, aten.swapaxes.default, "swapaxes",
         torch.swapdims, aten.swapdims.default, "swapdims")


@register
class PermuteRule(_PassThrough):
    """permute / transpose of the non-batch dimensions."""

    kind = "permute"
    sources = (torch.permute, aten.permute.default, "permute", *SWAPS)
    fn = staticmethod(permute)

    def canonical_args(self, node, module):
        rank = len(node.args[0].meta["tensor_meta"].shape)
        if node.target in SWAPS:
            a, c = (int(d) % rank for d in node.args[1:3])
            perm = list(range(rank))
            perm[a], perm[c] = perm[c], perm[a]
        else:
            dims = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
            perm = [int(d) % rank for d in dims]
        if perm[0] != 0:
            raise NotImplementedError(f"{node.target} moves the batch dimension")
        return (node.args[0], tuple(perm))

    def lower(self, b, node, args):
        return b.op("Transpose", [args[0]], node.name, perm=list(node.args[1]))


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


def select(x, dim, index):
    return x.select(dim, index)


@register
class SelectRule(_PassThrough):
    """One index along one non-batch dimension, which it removes (ViT's class token ``x[:, 0]``)."""

    kind = "select"
    sources = (aten.select.int, torch.select, "select")
    fn = staticmethod(select)

    def canonical_args(self, node, module):
        rank = len(node.args[0].meta["tensor_meta"].shape)
        dim, index = (int(v) for v in node.args[1:3])
        if dim % rank == 0:
            raise NotImplementedError("select along the batch dimension")
        return (node.args[0], dim % rank, index)

    def lower(self, b, node, args):
        return b.op("Gather", [args[0], b.const(np.int64(node.args[2]), f"{node.name}_index")], node.name,
                    axis=node.args[1])


def roll(x, shifts, dims):
    return torch.roll(x, shifts, dims)


@register
class RollRule(_PassThrough):
    """A cyclic shift along non-batch dimensions (Swin's shifted windows)."""

    kind = "roll"
    sources = (torch.roll, aten.roll.default, "roll")
    fn = staticmethod(roll)

    def canonical_args(self, node, module):
        rank = len(node.args[0].meta["tensor_meta"].shape)
        names = ("shifts", "dims")
        given = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
        shifts, dims = given["shifts"], given.get("dims")
        shifts, dims = (tuple(v) if isinstance(v, list | tuple) else (v,) for v in (shifts, dims))
        if dims == (None,) or any(int(d) % rank == 0 for d in dims) or len(dims) != len(shifts):
            raise NotImplementedError("roll of the flattened tensor or along the batch dimension")
        return (node.args[0], tuple(int(s) for s in shifts), tuple(int(d) % rank for d in dims))

    def lower(self, b, node, args):  # per dimension: the last s entries, then the others (two Slices, a Concat)
        x, shape = args[0], b.shape(node.args[0])
        for i, (shift, dim) in enumerate(zip(node.args[1], node.args[2], strict=True)):
            shift %= shape[dim]
            if shift == 0:
                continue
            pieces = []
            for start, end, what in ((shape[dim] - shift, shape[dim], "tail"), (0, shape[dim] - shift, "head")):
                consts = [b.const(np.array([v], np.int64), f"{node.name}_{i}_{what}_{k}")
                          for v, k in ((start, "start"), (end, "end"), (dim, "axis"))]
                pieces.append(b.op("Slice", [x, *consts], f"{node.name}_{i}_{what}"))
            x = b.op("Concat", pieces, f"{node.name}_{i}" if i + 1 < len(node.args[1]) else node.name, axis=dim)
        return x if x != args[0] else b.op("Identity", [x], node.name)


def expand(x, like):
    return x.expand(like.shape[0], *x.shape[1:])


@register
class ExpandRule(_PassThrough):
    """A constant with one image's worth of values, repeated over the batch of another tensor (ViT's class token
    ``class_token.expand(x.shape[0], -1, -1)``): ``expand(constant, like)``."""

    kind = "expand"
    sources = (aten.expand.default, "expand")
    fn = staticmethod(expand)

    def canonical_args(self, node, module):
        x, sizes = node.args[0], node.args[1:] if len(node.args) > 2 else node.args[1]
        shape = x.meta["tensor_meta"].shape
        like = _size_source(sizes[0]) if sizes else None
        if x.op != "get_attr" or shape[0] != 1 or like is None or any(
                s != -1 and s != d for s, d in zip(sizes[1:], shape[1:], strict=False)):
            raise NotImplementedError("expand of anything but a constant to the batch size of a tensor")
        return (x, like)

    def lower(self, b, node, args):
        x, like = args
        batch = b.op("Shape", [like], f"{node.name}_batch", start=0, end=1)
        rest = b.const(np.array(b.shape(node.args[0])[1:], np.int64), f"{node.name}_rest")
        shape = b.op("Concat", [batch, rest], f"{node.name}_shape", axis=0)
        return b.op("Expand", [x, shape], node.name)


def _size_source(size):
    """The tensor whose batch size ``size`` is (``x.shape[0]`` or ``x.size(0)`` in a traced graph), else None."""
    if not isinstance(size, torch.fx.Node):
        return None
    if size.op == "call_method" and size.target == "size" and size.args[1:] in ((0,), ()):
        return size.args[0] if size.args[1:] else None
    if size.target is operator.getitem and size.args[1] == 0:
        shape = size.args[0]
        if isinstance(shape, torch.fx.Node) and (shape.target is getattr and shape.args[1] == "shape"
                                                 or shape.op == "call_method" and shape.target == "size"
                                                 and len(shape.args) == 1):
            return shape.args[0]
    return None


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


# Sources that compute the identity at inference time (capture works on the model in eval mode: dropout and
# torchvision's stochastic depth pass their input through); capture removes them.
IDENTITY_SOURCES = (nn.Dropout, nn.Identity, F.dropout, aten.dropout.default, aten.alias.default,
                    aten.clone.default, aten.contiguous.default, aten.detach.default, "contiguous", "detach",
                    torchvision.ops.StochasticDepth, torchvision.ops.stochastic_depth)
