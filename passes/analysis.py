"""Analysis pass: shapes, MACs, parameters and non-negativity of every node (meta["arqc"]), and the
profile (per-layer table and totals) that ``arqc analyze`` prints."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from arqc.passes import ops
from arqc.passes.capture import get_attr
from arqc.passes.meta import FP32, info, quantizable_nodes


def analyze(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fill shapes, MACs, params and ``nonneg`` of every node. Needs ``tensor_meta`` (capture runs ShapeProp)."""
    for node in gm.graph.nodes:
        meta = info(node)
        if "tensor_meta" in node.meta:
            meta.out_shape = tuple(node.meta["tensor_meta"].shape)
        meta.in_shapes = [tuple(a.meta["tensor_meta"].shape) for a in node.all_input_nodes
                          if "tensor_meta" in a.meta]
        if meta.kind == "input":
            meta.nonneg = False  # smoothing noise makes pixel inputs signed
        elif meta.kind == "constant":
            meta.nonneg = bool((get_attr(gm, node.target) >= 0).all())
        elif meta.kind in ops.RULES:
            rule = ops.RULES[meta.kind]
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            meta.macs = rule.macs(node, module, meta.out_shape)
            meta.params = rule.params(module) if module is not None else 0
            meta.nonneg = rule.nonneg(node, _operands_nonneg(node.args))
    return gm


def _operands_nonneg(args: tuple) -> list[bool]:
    """Non-negativity of the operands in argument order: tensors (also inside lists) and numbers."""
    flags = []
    for a in args:
        if isinstance(a, torch.fx.Node):
            flags.append(info(a).nonneg)
        elif isinstance(a, list | tuple) and any(isinstance(x, torch.fx.Node) for x in a):
            flags.extend(info(x).nonneg for x in a)
        elif isinstance(a, int | float) and not isinstance(a, bool):
            flags.append(a >= 0)
    return flags


@dataclass
class LayerRow:
    name: str
    op: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int
    params: int
    w_bits: int
    a_bits: int
    bitops: int
    share: float  # of total BitOps, in [0, 1]

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.op, "in_shape": list(self.in_shape),
                "out_shape": list(self.out_shape), "macs": self.macs, "params": self.params,
                "w_bits": self.w_bits, "a_bits": self.a_bits, "bitops": self.bitops, "share": self.share}


@dataclass
class Profile:
    layers: list[LayerRow]
    total_macs: int  # all MACs of the model (quantizable layers carry all of them)
    total_params: int  # parameters of the quantizable layers (after BatchNorm folding)
    total_bitops: int
    fp32_bitops: int
    size_bits: int  # Σ params × w_bits

    @property
    def bitops_ratio_fp32(self) -> float:
        return self.total_bitops / self.fp32_bitops if self.fp32_bitops else 1.0

    def to_json(self) -> dict:
        return {"total_macs": self.total_macs, "total_params": self.total_params,
                "total_bitops": self.total_bitops, "fp32_bitops": self.fp32_bitops,
                "bitops_ratio_fp32": self.bitops_ratio_fp32, "size_bytes": self.size_bits / 8,
                "size_ratio_fp32": self.size_bits / (32 * self.total_params) if self.total_params else 1.0,
                "layers": [r.to_json() for r in self.layers]}


def profile(gm: torch.fx.GraphModule) -> Profile:
    """Per-layer MACs, params, bits and BitOps of an analyzed graph, with totals."""
    metas = [info(n) for n in quantizable_nodes(gm)]
    total_bitops = sum(m.bitops for m in metas)
    rows = [LayerRow(m.layer, m.kind, m.in_shapes[0], m.out_shape, m.macs, m.params, m.w_bits, m.a_bits,
                     m.bitops, m.bitops / total_bitops if total_bitops else 0.0) for m in metas]
    return Profile(rows, sum(m.macs for m in metas), sum(m.params for m in metas), total_bitops,
                   sum(m.macs for m in metas) * FP32 * FP32, sum(m.params * m.w_bits for m in metas))


def _human(x: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(x) < 1000:
            return f"{x:.4g}{unit}"
        x /= 1000
    return f"{x:.4g}E"


def format_profile(p: Profile) -> str:
    """The per-layer table and totals, as a profiler prints them."""
    head = f"{'layer':<28} {'op':<7} {'in -> out':<30} {'MACs':>8} {'params':>8} {'W':>3} {'A':>3} " \
           f"{'BitOps':>9} {'share':>7}"
    lines = [head, "-" * len(head)]
    for r in p.layers:
        shapes = f"{'x'.join(map(str, r.in_shape[1:]))} -> {'x'.join(map(str, r.out_shape[1:]))}"
        lines.append(f"{r.name[:28]:<28} {r.op:<7} {shapes:<30} {_human(r.macs):>8} {_human(r.params):>8} "
                     f"{r.w_bits:>3} {r.a_bits:>3} {_human(r.bitops):>9} {100 * r.share:>6.2f}%")
    lines.append("-" * len(head))
    lines.append(f"{len(p.layers)} quantizable layers   MACs {_human(p.total_macs)} ({p.total_macs:,})   "
                 f"params {_human(p.total_params)} ({p.total_params:,})")
    lines.append(f"BitOps {_human(p.total_bitops)} = {100 * p.bitops_ratio_fp32:.2f}% of FP32   "
                 f"size {p.size_bits / 8 / 1024:.1f} KiB = {100 * p.size_bits / max(1, 32 * p.total_params):.2f}%"
                 " of FP32")
    return "\n".join(lines)


def by_layer(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    return {info(n).layer: n for n in quantizable_nodes(gm)}

