"""Simulation pass: a fake-quantized model with the exact integer semantics of DESIGN §2.

Scales are either ``"float"`` (DESIGN §2, the default) or ``"po2"``: each scale rounded up to a power of two.
With po2 scales every dequantized value, product and partial sum of a layer is exact in float32 (as long as
an accumulator stays below 2^24 units), so any backend, whatever its summation order or fused integer kernel,
computes bit-identical layer outputs; with float scales, summation order makes rare activations land on the
other side of a rounding boundary (see bench/equivalence.py).

For a quantizable layer with precision (w_bits, a_bits):
- input activation (a_bits < 32): per tensor, affine; q = clamp(round(x / s) + z, qmin, qmax), x̂ = (q - z)·s,
  range [qmin, qmax] = [0, 2^b - 1] (z = 0) when the producer is non-negative, else [-2^(b-1), 2^(b-1) - 1];
  s, z from the min/max seen on calibration batches (0 always inside the range);
- weights (w_bits < 32): symmetric per output channel, q = clamp(round(w / s_c), -(2^(b-1) - 1), 2^(b-1) - 1),
  s_c = max|w_c| / (2^(b-1) - 1);
- bias, when both are quantized: int32 with scale s·s_c (what integer kernels add), else float;
- rounding is half to even (torch.round), like ONNX QuantizeLinear.
The rounding steps are differentiable through a clipped straight-through estimator, so the simulated model
can be fine-tuned.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.fx
from torch import nn

from arqc.passes.meta import FP32, ActQuant, info, quantizable_nodes

INT32_BOUND = 2**31 - 2**7  # the largest float32 below 2^31: the int32 bias range, exact in float32 too


class _FakeQuant(torch.autograd.Function):
    """Forward: (clamp(round(x / s) + z, qmin, qmax) - z) * s. Backward: identity inside the range, 0 outside."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = torch.round(x / scale) + zero_point
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (torch.clamp(q, qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quant(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    return _FakeQuant.apply(x, scale, zero_point, qmin, qmax)


SCALES = ("float", "po2")


def _po2(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= scale (so the range still fits)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def weight_scale(weight: torch.Tensor, bits: int, scales: str = "float") -> torch.Tensor:
    """Per-output-channel symmetric scale, float32, shaped to broadcast against the weight.
    ``scales="po2"`` rounds each scale up to a power of two (see :data:`SCALES`)."""
    qmax = 2 ** (bits - 1) - 1
    amax = weight.detach().abs().flatten(1).amax(1).float()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    if scales == "po2":
        scale = _po2(scale)
    return scale.reshape((-1,) + (1,) * (weight.dim() - 1))


def act_quant(lo: float, hi: float, bits: int, signed: bool, scales: str = "float",
              method: str = "minmax") -> ActQuant:
    """Affine per-tensor parameters for a calibrated min/max range (widened to contain 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not signed:
        lo = 0.0
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    scale = torch.tensor((hi - lo) / (qmax - qmin) if hi > lo else 1.0, dtype=torch.float32)
    if scales == "po2":
        scale = _po2(scale)
    scale = float(scale)
    zero_point = int(min(max(qmin - round(lo / scale), qmin), qmax))
    return ActQuant(bits, signed, scale, zero_point, qmin, qmax, float(lo), float(hi), method)


class QuantLayer:
    """Mixed into nn.Conv2d / nn.Linear: the quantizers of one layer (bits, calibration, STE forward)."""

    w_bits: int
    a_bits: int
    act: ActQuant | None
    signed: bool

    def _init_quant(self, w_bits: int, a_bits: int, signed: bool, scales: str) -> None:
        self.w_bits, self.a_bits, self.signed, self.act, self.scales = w_bits, a_bits, signed, None, scales
        self.observed: tuple[float, float] | None = None
        self.calibrating = False
        self.method = "minmax"
        self.fixed_weight_scale: torch.Tensor | None = None  # set when rebuilt from a lowered model

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits >= FP32:
            return x
        if self.calibrating:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            self.observed = (lo, hi) if self.observed is None else (min(lo, self.observed[0]),
                                                                    max(hi, self.observed[1]))
            return x
        if self.act is None:
            raise RuntimeError(f"{type(self).__name__} with a_bits={self.a_bits} used before calibration")
        a = self.act
        return fake_quant(x, a.scale, a.zero_point, a.qmin, a.qmax)

    def weight_scale(self) -> torch.Tensor:
        if self.fixed_weight_scale is not None:
            return self.fixed_weight_scale.to(self.weight.device)  # a plain attribute: .to() leaves it
        return weight_scale(self.weight, self.w_bits, self.scales)

    def effective_weight(self) -> torch.Tensor:
        if self.w_bits >= FP32:
            return self.weight
        qmax = 2 ** (self.w_bits - 1) - 1
        return fake_quant(self.weight, self.weight_scale(), 0, -qmax, qmax)

    def bias_scale(self) -> torch.Tensor | None:
        """Scale of the int32 bias (s_x · s_w per channel), or None when the bias stays float."""
        if self.bias is None or self.w_bits >= FP32 or self.act is None or self.calibrating:
            return None
        return (self.act.scale * self.weight_scale().flatten()).float()

    def effective_bias(self) -> torch.Tensor | None:
        scale = self.bias_scale()
        if scale is None:
            return self.bias
        return fake_quant(self.bias, scale, 0, -INT32_BOUND, INT32_BOUND)

    def finish_calibration(self) -> None:
        self.calibrating = False
        if self.a_bits < FP32:
            if self.observed is None:
                raise RuntimeError("calibration saw no data")
            self.act = act_quant(*self.observed, self.a_bits, self.signed, self.scales, self.method)


class QuantConv2d(QuantLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.effective_weight(), self.effective_bias())


class QuantLinear(QuantLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(x), self.effective_weight(), self.effective_bias())


def _quant_copy(module: nn.Module, w_bits: int, a_bits: int, signed: bool, scales: str) -> nn.Module:
    q = copy.deepcopy(module)
    q.__class__ = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    q._init_quant(w_bits, a_bits, signed, scales)
    return q


def simulate(gm: torch.fx.GraphModule, calibration: Iterable[torch.Tensor], scales: str = "float",
             method: str = "minmax", ranges: dict[str, tuple[float, float]] | None = None) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose layers are fake-quantized at the bits in their meta (the policy pass sets them),
    with activation ranges calibrated (min/max) on ``calibration`` batches of training images; ``method``
    names how they were made (recorded in each :class:`ActQuant`, e.g. "minmax, noise sigma=0.25").
    ``ranges`` (layer name → observed (min, max), see :func:`observed_ranges`) replaces the calibration run.
    Records each layer's :class:`ActQuant` in ``meta["arqc"].act``."""
    if scales not in SCALES:
        raise ValueError(f"scales must be one of {SCALES}")
    sim = copy.deepcopy(gm)
    layers = {}
    for node in quantizable_nodes(sim):
        meta = info(node)
        producer_nonneg = info(node.args[0]).nonneg
        layer = _quant_copy(sim.get_submodule(node.target), meta.w_bits, meta.a_bits, not producer_nonneg,
                            scales)
        layer.method = method
        owner, _, name = node.target.rpartition(".")
        setattr(sim.get_submodule(owner), name, layer)
        layers[node] = layer
    if ranges is None:
        calibrate(sim, calibration)
    else:
        for node, layer in layers.items():
            layer.observed = ranges.get(info(node).layer)
            layer.finish_calibration()
    for node, layer in layers.items():
        info(node).act = layer.act
    return sim


def observed_ranges(sim: torch.fx.GraphModule) -> dict[str, tuple[float, float]]:
    """Each calibrated layer's observed input (min, max), by layer name. Of a simulation whose weights are all
    unquantized, these are the float model's activation ranges: what calibration finds for any policy in which
    only one layer is quantized (the sensitivity proxy's policies)."""
    return {info(node).layer: sim.get_submodule(node.target).observed for node in quantizable_nodes(sim)
            if sim.get_submodule(node.target).observed is not None}


def calibrate(sim: torch.fx.GraphModule, calibration: Iterable[torch.Tensor]) -> None:
    layers = [m for m in sim.modules() if isinstance(m, QuantLayer)]
    for m in layers:
        m.calibrating, m.observed = True, None
    seen = 0
    with torch.no_grad():
        for batch in calibration:
            sim(batch)
            seen += len(batch)
    if seen == 0:
        raise ValueError("calibration needs at least one image")
    for m in layers:
        m.finish_calibration()
