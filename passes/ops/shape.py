"""Shape ops, which select or rearrange values: flatten (and 2-D views/reshapes of a batch), constant pad,
strided slice, concatenation; and the sources that compute the identity at inference time."""

from __future__ import annotations

import numpy as np
import torch
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

    def refine(self, node):
        in_shape, out_shape = node.args[0].meta["tensor_meta"].shape, node.meta["tensor_meta"].shape
        flattens = len(out_shape) == 2 and out_shape[0] == in_shape[0]
        return self if flattens or self._explicit(node) else RULES["reshape"]

    @staticmethod
    def _explicit(node) -> bool:  # nn.Flatten / torch.flatten (checked in canonical_args), not a view
        return node.target not in (aten.view.default, aten.reshape.default, torch.reshape, "view", "reshape")

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


@register
class PermuteRule(_PassThrough):
    """permute / transpose of the non-batch dimensions."""

    kind = "permute"
    sources = (torch.permute, aten.permute.default, "permute", torch.transpose, aten.transpose.int, "transpose")
    fn = staticmethod(permute)

    def canonical_args(self, node, module):
        rank = len(node.args[0].meta["tensor_meta"].shape)
        if node.target in (torch.transpose, aten.transpose.int, "transpose"):
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
