"""An op plugin for arqc: nn.ELU (and F.elu), which arqc does not know, as a registry entry of this package.

Install this folder (``pip install ./examples/ops_plugin``): its pyproject.toml declares this module as an entry
point of group ``arqc.ops``, so arqc imports it before capturing a model. Or, without installing, put the folder on
PYTHONPATH and set ``ARQC_OPS=arqc_elu``.

The entry is a canonical function and a registered :class:`~arqc.passes.ops.OpRule` subclass (see
passes/ops/__init__.py and passes/ops/activations.py in arqc for the contract and more examples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arqc.passes import ops


def elu(x, alpha: float):
    return F.elu(x, alpha)


@ops.register
class EluRule(ops.OpRule):
    kind = "elu"
    sources = (nn.ELU, F.elu, torch.ops.aten.elu.default)  # what capture replaces: module, function, aten op
    fn = staticmethod(elu)  # the canonical call: elu(x, alpha)

    def canonical_args(self, node, module):
        alpha = module.alpha if module is not None else node.kwargs.get(
            "alpha", node.args[1] if len(node.args) > 1 else 1.0)
        return (node.args[0], float(alpha))

    def nonneg(self, node, inputs_nonneg):  # elu(x) < 0 for x < 0
        return False

    def lower(self, b, node, args):  # ONNX has Elu
        return b.op("Elu", [args[0]], node.name, alpha=node.args[1])

    def interval(self, node, module, lo, hi, sound=True):
        """ELU with alpha >= 0 is monotone non-decreasing: [f(lo), f(hi)]. Sound mode widens by the float32
        error of expm1 (a library function: 64 ulps of |f| + |x|, like arqc's own activations) and an absolute
        smallest normal."""
        alpha = node.args[1]
        if alpha < 0:
            raise NotImplementedError("elu with alpha < 0 is not monotone")
        low, high = elu(lo[0], alpha), elu(hi[0], alpha)
        if not sound:
            return low, high
        u32 = ops.rounding.U32
        error = 64 * u32 * (torch.maximum(low.abs(), high.abs()) + ops.rounding._abs_max(lo[0], hi[0])) \
            + ops.rounding.TINY
        return low - error, high + error
