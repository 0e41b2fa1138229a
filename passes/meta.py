"""What arqc's passes record about a graph node: the one place where those keys are documented.

Every pass reads and writes ``node.meta["arqc"]``, a :class:`NodeInfo`. Fields are filled by the pass
named next to them; a pass never stores per-node facts anywhere else.

Units: shapes include the batch dimension (analysis runs with batch 1); MACs are multiply-accumulates for
one image; BitOps = MACs × w_bits × a_bits (DESIGN §2); bits are 2..8, or 32 for "not quantized".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx

from arqc.base import ArqcError

KEY = "arqc"
FP32 = 32
# The version of the quantization semantics (DESIGN §2) that simulations compute and that ONNX files, state files
# and caches record: 1 = activations float between quantized layers (arqc before 0.3); 2 = integer-only
# inference, every tensor between quantized ops on an 8-bit grid. Files of another version are refused.
SEMANTICS = 2
REQUANT_BITS = 8  # the grid of the tensors between quantized ops


def check_semantics(found: int | None, what: str) -> None:
    """Refuse, in one line (ArqcError), ``what``: a file arqc wrote under other quantization semantics. ``found``
    is the version the file records; None means it records none, as arqc wrote them before semantics 2."""
    found = 1 if found is None else found
    if found != SEMANTICS:
        raise ArqcError(f"{what} was written by arqc under quantization semantics {found} (this arqc computes "
                        f"semantics {SEMANTICS}: integer-only, DESIGN §2), so it describes another function; "
                        "compile or run it again with this arqc")


@dataclass
class ActQuant:
    """Quantization parameters of one activation tensor (a quantizable layer's input, or a requantized tensor).

    Integer value: clamp(round(x / scale) + zero_point, qmin, qmax); real value: (q - zero_point) * scale.
    ``signed`` is False when the producer is non-negative (ReLU, ReLU6, ...): then qmin = 0, zero_point = 0.
    """

    bits: int
    signed: bool
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    lo: float  # calibrated range (float), before snapping to the grid
    hi: float
    method: str = "minmax"


@dataclass
class NodeInfo:
    """Per-node facts. Written by: capture (``kind``, ``layer``, ``bn_scale``), analysis (shapes, counts, ``nonneg``),
    the policy pass (``w_bits``, ``a_bits``), simulation (``grid``, requant nodes), calibration (``act``)."""

    kind: str  # the op's registry key (passes/ops/), e.g. "conv2d", "relu", "add"
    layer: str | None = None  # the quantizable layer's name (its module path), else None
    in_shapes: list[tuple[int, ...]] = field(default_factory=list)
    out_shape: tuple[int, ...] | None = None
    macs: int = 0
    params: int = 0
    nonneg: bool = False  # every value of the output is >= 0 (decides unsigned activation ranges)
    w_bits: int = FP32
    a_bits: int = FP32
    act: ActQuant | None = None  # a layer's input quantizer, or a requant node's grid (None = float input)
    second: ActQuant | None = None  # a matmul layer's second-operand quantizer (w_bits; None = float)
    # the requant node (its module's target) whose 8-bit grid this node's output lies on: set on requant nodes
    # and on the ops that keep their input's grid (relu, max pool, flatten, reshape, permute, slice, zero pad);
    # None = float
    grid: str | None = None
    # capture: the per-output-channel factor γ / sqrt(var + eps) of the BatchNorm folded into this layer's weight
    # (float32; None = none folded). QAT uses it to train the weight as if the BatchNorm were still there.
    bn_scale: torch.Tensor | None = None

    @property
    def quantizable(self) -> bool:
        return self.layer is not None

    @property
    def bitops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


def info(node: torch.fx.Node) -> NodeInfo:
    """The node's :class:`NodeInfo` (raises KeyError if capture has not run)."""
    return node.meta[KEY]


def quantizable_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The quantizable layers (conv2d, linear, matmul) in graph order."""
    return [n for n in gm.graph.nodes if KEY in n.meta and n.meta[KEY].quantizable]
