"""The requant node of integer-only inference (DESIGN §2): a tensor between quantized ops put on its 8-bit grid.
Only simulations have these nodes (passes/quantize.py: integerize inserts them); capture never emits one."""

from __future__ import annotations

from arqc.passes.ops.base import OpRule, register
from arqc.passes.ops.layers import _quantizer_interval


@register
class RequantRule(OpRule):
    kind = "requant"

    def nonneg(self, node, inputs_nonneg):
        return inputs_nonneg[0]

    def lower(self, b, node, args):
        return b.requantize(args[0], node.target, b.module(node).act, node.name)

    def interval(self, node, module, lo, hi, sound=True):
        if not sound:  # the straight-through fake quantizer is monotone
            return module(lo[0]), module(hi[0])
        return _quantizer_interval(module.act, lo[0], hi[0])
