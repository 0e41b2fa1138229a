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
- a matmul of two activations (:class:`QuantMatMul`): the first operand as the input above (a_bits), the second
  per tensor, affine, at w_bits (:class:`OperandQuant`), each reading its 8-bit grid as it is at 8 bits;
- rounding is half to even (torch.round), like ONNX QuantizeLinear.
Integer-only inference (DESIGN §2, semantics version 2, :data:`~arqc.passes.meta.SEMANTICS`): every tensor that
runs from one quantized op to the next lives on an 8-bit grid. :func:`integerize` inserts a requant node (a
:class:`Requant` module: per tensor, affine, calibrated like an input quantizer, unsigned when non-negative) after
- each integer layer (w_bits and a_bits < 32), after the ReLU/ReLU6/clamp that directly follows it;
- each add, concat and average pool whose tensor inputs all lie on grids (again after a fused activation);
except where that tensor is the network's output (the logits stay float). Relu, max pool, flatten, reshape,
permute, slice and zero pad keep their input's grid (``meta["arqc"].grid``). A layer whose input lies on a grid
uses that grid as its input quantizer at a_bits = 8 (``grid_input``: nothing to round, the values are on it
already) and requantizes from it at a_bits < 8.
The rounding steps are differentiable through a clipped straight-through estimator, so the simulated model
can be fine-tuned.

Calibration (:data:`CALIBRATIONS`, DESIGN §2: "other calibrations, lowered exactly") chooses each clipping range;
whatever it picks is a scale and a zero point, which the lowering writes as they are:
- ``minmax``: the observed range (weights: max|w_c| per channel, following the weights during QAT);
- ``percentile``: the :data:`PERCENTILE`-th percentile of the observed values at each end (weights: of |w_c|);
- ``mse``: the range, shrunk from the observed one by a factor (:data:`CLIP_RATIOS`, then a grid ten times finer
  around the best of them), that minimizes the mean squared quantization error at the quantizer's own bits (per
  tensor; weights per channel).
Activations are judged on a fixed-seed sample of :data:`SAMPLE_CAP` values per quantizer (exact min and max).
With float scales, every activation scale is then moved off rounding ties (:func:`avoid_ties`): by at most
0.15 %, so that no value the quantized network computes on calibration images lies within 1e-4 of a step of a
tie. Those values are few and frequent (sums of products of a few integer codes and scales; min/max puts the
observed maximum exactly on the last code, and half of it exactly on a tie), and a value that is a tie in exact
arithmetic rounds either way in float32, by each runtime's order of operations: that made OpenVINO disagree with
onnxruntime and torch on 4.4 % of noisy images at uniform W4A4 (akamaster ResNet-20, min/max).
Weight scales from ``percentile`` and ``mse`` are set once, at calibration. :func:`learn_scales` turns every
scale into a parameter for learned step-size QAT (LSQ, Esser et al. 2020) and :func:`freeze_scales` writes the
learned values back, so the lowering again sees fixed scales.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable

import torch
import torch.fx
from torch import nn

from arqc.passes.meta import FP32, KEY, REQUANT_BITS, SEMANTICS, ActQuant, NodeInfo, info, quantizable_nodes
from arqc.passes.ops.layers import MatMul

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


class _LsqFakeQuant(torch.autograd.Function):
    """:class:`_FakeQuant`'s forward (the same operations, so the same numbers) with LSQ's gradients (Esser et
    al. 2020), judged on the unrounded v = x/s + z: for x, 1 where qmin <= v <= qmax, else 0; for the scale,
    round(x/s) - x/s there, qmin - z below and qmax - z above, times ``grad_factor`` and summed to the scale's
    shape (per tensor, or per output channel)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor):
        v = x / scale
        q = torch.round(v) + zero_point
        clamped = torch.clamp(q, qmin, qmax)
        ctx.save_for_backward(v, scale)
        ctx.zero_point, ctx.qmin, ctx.qmax, ctx.grad_factor = zero_point, qmin, qmax, grad_factor
        return (clamped - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        v, scale = ctx.saved_tensors
        z = ctx.zero_point
        below, above = v + z < ctx.qmin, v + z > ctx.qmax
        inside = ~(below | above)
        d_elem = torch.where(below, float(ctx.qmin - z), torch.where(above, float(ctx.qmax - z), torch.round(v) - v))
        d_scale = grad * d_elem * ctx.grad_factor
        dims = [d for d in range(d_scale.dim()) if d >= scale.dim() or scale.shape[d] == 1] \
            if scale.dim() else list(range(d_scale.dim()))
        d_scale = d_scale.sum(dims, keepdim=scale.dim() > 0).reshape(scale.shape)
        return grad * inside, d_scale, None, None, None, None


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int,
                   per: int) -> torch.Tensor:
    """:func:`fake_quant` with a learnable ``scale``; ``per``: values per scale (LSQ's gradient scale
    1/sqrt(per · qmax))."""
    return _LsqFakeQuant.apply(x, scale, zero_point, qmin, qmax, 1.0 / math.sqrt(max(per, 1) * max(qmax, 1)))


SCALES = ("float", "po2")


def _po2(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= scale (so the range still fits)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


CALIBRATIONS = ("minmax", "percentile", "mse")
PERCENTILE = 99.99  # percentile calibration: the share of observed values (%) inside the range at each end
CLIP_RATIOS = torch.linspace(0.01, 1.0, 100)  # mse calibration: the shrink factors of the observed range it tries
SAMPLE_CAP = 1 << 16  # activation values kept per quantizer for percentile and mse calibration
# Float scales off rounding ties (:func:`avoid_ties`): a value counts as on a tie within TIE_MARGIN of a step;
# a scale moves by multiples of TIE_STEP (relative), at most TIE_TRIES of them; TIE_IMAGES images are looked at.
TIE_MARGIN = 1e-4
TIE_STEP = 2.0 ** -14
TIE_TRIES = 24
TIE_IMAGES = 64


def _check_calibration(calibration: str) -> None:
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")


def _best_clip_ratio(errors_of: Callable[[torch.Tensor], torch.Tensor], channels: int) -> torch.Tensor:
    """mse calibration's search, per channel (or per tensor: one channel): the shrink factor of the observed range
    with the least squared error, over :data:`CLIP_RATIOS` and then a grid ten times finer around the best one.
    ``errors_of`` maps a (channels, candidates) tensor of ratios to their errors; the first of equal errors
    wins, and a finer ratio only when it is strictly better."""
    step = float(CLIP_RATIOS[1] - CLIP_RATIOS[0])
    ratios = CLIP_RATIOS.expand(channels, -1)
    best, err = torch.ones(channels), torch.full((channels,), math.inf)
    for _ in range(2):
        errors = errors_of(ratios)
        i = torch.argmin(errors, dim=1, keepdim=True)
        e, ratio = errors.gather(1, i)[:, 0], ratios.gather(1, i)[:, 0]
        better = e < err
        best, err = torch.where(better, ratio, best), torch.where(better, e, err)
        ratios = (best[:, None] + step * torch.linspace(-1, 1, 21)).clamp(max=1.0)
    return best


def weight_scale(weight: torch.Tensor, bits: int, scales: str = "float", calibration: str = "minmax"
                 ) -> torch.Tensor:
    """Per-output-channel symmetric scale, float32, shaped to broadcast against the weight: the channel's
    clipping bound (see :data:`CALIBRATIONS`) over 2^(b-1) - 1. ``scales="po2"`` rounds each scale up to a power
    of two (see :data:`SCALES`)."""
    _check_calibration(calibration)
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().flatten(1).float()
    amax = w.abs().amax(1)
    if calibration == "percentile":
        amax = torch.quantile(w.abs(), PERCENTILE / 100, dim=1)
    elif calibration == "mse":
        def errors_of(ratios: torch.Tensor) -> torch.Tensor:  # channel by channel: (C, K) candidate bounds at once
            errors = []
            for ratio in ratios.T:
                bound = amax * ratio
                s = torch.where(bound > 0, bound / qmax, torch.ones_like(bound))
                if scales == "po2":
                    s = _po2(s)
                errors.append(((torch.round(w / s[:, None]).clamp(-qmax, qmax) * s[:, None] - w) ** 2).sum(1))
            return torch.stack(errors, 1)

        amax = amax * _best_clip_ratio(errors_of, len(amax))
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    if scales == "po2":
        scale = _po2(scale)
    return scale.reshape((-1,) + (1,) * (weight.dim() - 1))


def act_quant(lo: float, hi: float, bits: int, signed: bool, scales: str = "float",
              method: str = "minmax", even_zero: bool = False) -> ActQuant:
    """Affine per-tensor parameters for a calibrated min/max range (widened to contain 0). ``even_zero``: the
    zero point is the even integer nearest the affine one (requant grids: onnxruntime's fused QLinearAdd rounds
    x/s + z half to even where QuantizeLinear rounds x/s, and the two agree on ties only when z is even)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not signed:
        lo = 0.0
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    scale = torch.tensor((hi - lo) / (qmax - qmin) if hi > lo else 1.0, dtype=torch.float32)
    if scales == "po2":
        scale = _po2(scale)
    scale = float(scale)
    zero_point = int(min(max(qmin - round(lo / scale), qmin), qmax))
    if even_zero and zero_point % 2:
        ideal = qmin - lo / scale
        zero_point += 1 if (ideal > zero_point and zero_point < qmax) or zero_point == qmin else -1
    return ActQuant(bits, signed, scale, zero_point, qmin, qmax, float(lo), float(hi), method)


@dataclasses.dataclass
class Observed:
    """What calibration saw of one activation tensor: its exact min and max and a fixed-seed sample of its values
    (at most :data:`SAMPLE_CAP`), from which :meth:`clip` picks the clipping range."""

    lo: float
    hi: float
    sample: torch.Tensor  # float32, 1-D

    @classmethod
    def of(cls, x: torch.Tensor, previous: Observed | None = None) -> Observed:
        x = x.detach().flatten().float()
        lo, hi = float(x.min()), float(x.max())
        if previous is not None:
            lo, hi = min(lo, previous.lo), max(hi, previous.hi)
        gen = torch.Generator().manual_seed(len(previous.sample) if previous is not None else 0)
        take = x[torch.randint(len(x), (min(len(x), SAMPLE_CAP // 4),), generator=gen)]
        sample = take if previous is None else torch.cat([previous.sample, take])
        if len(sample) > SAMPLE_CAP:
            sample = sample[torch.randperm(len(sample), generator=gen)[:SAMPLE_CAP]]
        return cls(lo, hi, sample)

    def clip(self, bits: int, signed: bool, calibration: str = "minmax", scales: str = "float"
             ) -> tuple[float, float]:
        """The clipping range (lo, hi) by ``calibration`` for a quantizer at ``bits``."""
        _check_calibration(calibration)
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if not signed:
            lo = 0.0
        if calibration == "percentile":
            q = torch.quantile(self.sample, torch.tensor([1 - PERCENTILE / 100, PERCENTILE / 100])).tolist()
            return (min(q[0], 0.0) if signed else 0.0), max(q[1], 0.0)
        if calibration == "mse" and hi > lo:
            x = self.sample

            def errors_of(ratios: torch.Tensor) -> torch.Tensor:  # every candidate range in one tensor pass
                grids = [act_quant(lo * r, hi * r, bits, signed, scales) for r in ratios[0].tolist()]
                scale = torch.tensor([a.scale for a in grids], dtype=torch.float32)[:, None]
                zero = torch.tensor([float(a.zero_point) for a in grids])[:, None]
                q = torch.clamp(torch.round(x / scale) + zero, grids[0].qmin, grids[0].qmax)
                return (((q - zero) * scale - x) ** 2).sum(1)[None]

            best = float(_best_clip_ratio(errors_of, 1)[0])
            return lo * best, hi * best
        return lo, hi


class _Observer:
    """Calibration of one activation quantizer: what passes while ``calibrating`` (:class:`Observed`)."""

    observed: Observed | None
    calibrating: bool
    scales: str
    method: str
    calibration: str

    def observe(self, x: torch.Tensor) -> None:
        self.observed = Observed.of(x, self.observed)

    def calibrated(self, bits: int, signed: bool, even_zero: bool = False) -> ActQuant:
        if self.observed is None:
            raise RuntimeError("calibration saw no data")
        lo, hi = self.observed.clip(bits, signed, self.calibration, self.scales)
        return act_quant(lo, hi, bits, signed, self.scales, self.method, even_zero)

    def _quantize(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """``x`` through this quantizer at ``bits`` (observed instead while calibrating; 32 = float)."""
        if bits >= FP32:
            return x
        if self.calibrating:
            self.observe(x)
            return x
        if self.act is None:
            raise RuntimeError(f"{type(self).__name__} with bits={bits} used before calibration")
        a = self.act
        learned = getattr(self, "learned_scale", None)
        if learned is not None:
            return lsq_fake_quant(x, learned, a.zero_point, a.qmin, a.qmax, x[0].numel())
        return fake_quant(x, a.scale, a.zero_point, a.qmin, a.qmax)

    def act_scale(self):
        """The input quantizer's scale as the forward uses it (the learned one during LSQ)."""
        learned = getattr(self, "learned_scale", None)
        return self.act.scale if learned is None else learned


class QuantLayer(_Observer):
    """Mixed into nn.Conv2d / nn.Linear: the quantizers of one layer (bits, calibration, STE forward)."""

    w_bits: int
    a_bits: int
    act: ActQuant | None
    signed: bool

    def _init_quant(self, w_bits: int, a_bits: int, signed: bool, scales: str) -> None:
        self.w_bits, self.a_bits, self.signed, self.act, self.scales = w_bits, a_bits, signed, None, scales
        self.observed: Observed | None = None
        self.calibrating = False
        self.method, self.calibration = "minmax", "minmax"
        # set by percentile/mse calibration, by freeze_scales, and when rebuilt from a lowered model
        self.fixed_weight_scale: torch.Tensor | None = None
        # the requant module whose 8-bit grid the input lies on, when a_bits = 8 uses that grid (integerize)
        self.grid_source: str | None = None

    @property
    def grid_input(self) -> bool:
        """The input already lies on the 8-bit grid this layer reads at a_bits = 8: nothing to quantize."""
        return self.grid_source is not None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.grid_input else self._quantize(x, self.a_bits)

    def weight_scale(self) -> torch.Tensor:
        learned = getattr(self, "learned_weight_scale", None)
        if learned is not None:
            return learned
        if self.fixed_weight_scale is not None:
            return self.fixed_weight_scale.to(self.weight.device)  # a plain attribute: .to() leaves it
        return weight_scale(self.weight, self.w_bits, self.scales)

    def effective_weight(self) -> torch.Tensor:
        if self.w_bits >= FP32:
            return self.weight
        qmax = 2 ** (self.w_bits - 1) - 1
        learned = getattr(self, "learned_weight_scale", None)
        if learned is not None:
            return lsq_fake_quant(self.weight, learned, 0, -qmax, qmax, self.weight[0].numel())
        return fake_quant(self.weight, self.weight_scale(), 0, -qmax, qmax)

    def bias_scale(self) -> torch.Tensor | None:
        """Scale of the int32 bias (s_x · s_w per channel), or None when the bias stays float. During LSQ it
        follows the learned scales without passing gradients to them; a grid-input layer reads its grid's scale
        as last linked, so its bias rounds on a scale up to one QAT run old until :func:`freeze_scales`."""
        if self.bias is None or self.w_bits >= FP32 or self.act is None or self.calibrating:
            return None
        return (self.act_scale() * self.weight_scale().flatten()).detach().float()

    def effective_bias(self) -> torch.Tensor | None:
        scale = self.bias_scale()
        if scale is None:
            return self.bias
        return fake_quant(self.bias, scale, 0, -INT32_BOUND, INT32_BOUND)

    def finish_calibration(self) -> None:
        self.calibrating = False
        if self.a_bits < FP32 and not self.grid_input:  # a grid input's quantizer is its grid (link_grids)
            self.act = self.calibrated(self.a_bits, self.signed)
        self.calibrate_weights()

    def calibrate_weights(self) -> None:
        """Percentile and mse weight scales are chosen once, here (minmax ones follow the weights)."""
        if self.w_bits < FP32 and self.calibration != "minmax" and not isinstance(self, QuantMatMul):
            self.fixed_weight_scale = weight_scale(self.weight, self.w_bits, self.scales, self.calibration)


class QuantConv2d(QuantLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.effective_weight(), self.effective_bias())


class QuantLinear(QuantLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(x), self.effective_weight(), self.effective_bias())


class OperandQuant(_Observer, nn.Module):
    """The quantizer of a matmul layer's second operand: per tensor, affine, at the layer's w_bits (DESIGN §2),
    calibrated like an input quantizer; at 8 bits on an 8-bit grid it is that grid (``grid_source``)."""

    def __init__(self, bits: int, signed: bool, scales: str = "float"):
        super().__init__()
        self.bits, self.signed, self.scales, self.method, self.calibration = bits, signed, scales, "minmax", "minmax"
        self.act: ActQuant | None = None
        self.observed: Observed | None = None
        self.calibrating = False
        self.grid_source: str | None = None

    @property
    def grid_input(self) -> bool:
        return self.grid_source is not None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid_input:
            return x
        if self.calibrating:  # at every precision: a float operand's range serves the policies that quantize it
            self.observe(x)
            return x
        return self._quantize(x, self.bits)

    forward = quantize_input

    def finish_calibration(self) -> None:
        self.calibrating = False
        if self.bits < FP32 and not self.grid_input:
            self.act = self.calibrated(self.bits, self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


class QuantMatMul(QuantLayer, MatMul):
    """A matmul layer: the first operand through the layer's input quantizer (a_bits), the second through
    ``second`` (an :class:`OperandQuant` at w_bits)."""

    second: OperandQuant

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.quantize_input(a), self.second(b))


class Requant(_Observer, nn.Module):
    """Requantization of a tensor between quantized ops to its 8-bit grid (DESIGN §2, integer-only inference):
    per tensor, affine, calibrated on what it sees, unsigned when its input is non-negative."""

    def __init__(self, signed: bool, scales: str = "float", method: str = "minmax", calibration: str = "minmax"):
        super().__init__()
        self.bits, self.signed, self.scales, self.method = REQUANT_BITS, signed, scales, method
        self.calibration = calibration
        self.act: ActQuant | None = None
        self.observed: Observed | None = None
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize(x, self.bits)

    def finish_calibration(self) -> None:
        self.calibrating = False
        self.act = self.calibrated(self.bits, self.signed, even_zero=True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


# Where integerize puts the tensors between quantized ops on 8-bit grids (DESIGN §2), by registry kind.
FUSED_ACTIVATIONS = ("relu", "clamp")  # requantize after these when they directly follow the producer
REQUANTIZED_OPS = ("add", "cat", "avg_pool2d", "adaptive_avg_pool2d")  # requantized when their inputs are on grids
# exact on a grid (pad: with zeros)
GRID_KEEPING_OPS = ("relu", "max_pool2d", "flatten", "reshape", "permute", "slice", "select", "roll", "pad")


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def _integer_producer(sim: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node``'s output is requantized: an integer layer, or an add/concat/average pool of grids."""
    meta = info(node)
    if meta.quantizable:
        return meta.w_bits < FP32 and meta.a_bits < FP32
    inputs = _tensor_inputs(node)
    return meta.kind in REQUANTIZED_OPS and bool(inputs) and all(_grid(a) is not None for a in inputs)


def _grid(node: torch.fx.Node) -> str | None:
    return node.meta[KEY].grid if KEY in node.meta else None


def integerize(sim: torch.fx.GraphModule, scales: str = "float", method: str = "minmax",
               calibration: str = "minmax") -> torch.fx.GraphModule:
    """Insert the requant nodes of integer-only inference into a graph whose layers are QuantLayers (see the
    module docstring), mark the nodes that keep a grid (``meta["arqc"].grid``) and the layers that read one
    (``grid_input``). In place; returns ``sim``."""
    graph = sim.graph
    logits = next(n for n in graph.nodes if n.op == "output").args[0]
    for node in list(graph.nodes):
        if node.op not in ("call_module", "call_function") or KEY not in node.meta:
            continue
        meta, inputs = info(node), _tensor_inputs(node)
        source = _grid(inputs[0]) if inputs else None
        if meta.quantizable and source is not None and meta.a_bits == REQUANT_BITS:
            sim.get_submodule(node.target).grid_source = source
        if meta.kind == "matmul" and _grid(node.args[1]) is not None and meta.w_bits == REQUANT_BITS:
            sim.get_submodule(node.target).second.grid_source = _grid(node.args[1])
        if meta.kind in GRID_KEEPING_OPS and source is not None and (meta.kind != "pad" or node.args[2] == 0):
            meta.grid = source
        if not _integer_producer(sim, node):
            continue
        point, users = node, list(node.users)
        if len(users) == 1 and KEY in users[0].meta and info(users[0]).kind in FUSED_ACTIVATIONS \
                and users[0].args[0] is node:
            point = users[0]
        if point is logits:
            continue
        target = f"arqc_requant.{point.name}"  # a container no user model names
        sim.add_submodule(target, Requant(signed=not info(point).nonneg, scales=scales, method=method,
                                          calibration=calibration))
        with graph.inserting_after(point):
            requant = graph.call_module(target, (point,))
        point.replace_all_uses_with(requant, delete_user_cb=lambda user, new=requant: user is not new)
        shape = info(point).out_shape
        requant.meta[KEY] = NodeInfo(kind="requant", in_shapes=[shape] if shape else [], out_shape=shape,
                                     nonneg=info(point).nonneg, grid=target)
        if "tensor_meta" in point.meta:
            requant.meta["tensor_meta"] = point.meta["tensor_meta"]
    sim.recompile()
    return sim


@contextlib.contextmanager
def one_layer_quantized(sim: torch.fx.GraphModule, layer: str, w_bits: int, a_bits: int,
                        ranges: dict[str, Observed]):
    """Within the block, ``layer`` of a simulation whose layers are all float (32, 32) quantizes its weights
    (w_bits; a matmul: its second operand) or its input (a_bits), with activation ranges from ``ranges``
    (:func:`observed_ranges`); restored on exit. The same function as :func:`simulate` of that one-layer policy
    with those ranges (with one of the pair at 32 bits no op is an integer producer, so there is no requant
    node), without copying the model for each probe: what the sensitivity proxy of the greedy baseline runs."""
    if min(w_bits, a_bits) < FP32 and max(w_bits, a_bits) < FP32:
        raise ValueError("one_layer_quantized quantizes weights or input, not both")
    node = next(n for n in quantizable_nodes(sim) if info(n).layer == layer)
    m = sim.get_submodule(node.target)
    if m.w_bits != FP32 or m.a_bits != FP32:
        raise ValueError("one_layer_quantized needs a simulation whose layers are all at 32 bits")
    second = getattr(m, "second", None)
    saved = (m.act, None if second is None else (second.bits, second.act), m.fixed_weight_scale)
    m.w_bits, m.a_bits = w_bits, a_bits
    if a_bits < FP32:
        m.observed = ranges[layer]
        m.act = m.calibrated(a_bits, m.signed)
    if w_bits < FP32:
        m.calibrate_weights()
    if second is not None and w_bits < FP32:
        second.bits, second.observed = w_bits, ranges[f"{layer}.second"]
        second.act = second.calibrated(w_bits, second.signed)
    try:
        yield sim
    finally:
        m.w_bits, m.a_bits, m.act, m.fixed_weight_scale = FP32, FP32, saved[0], saved[2]
        if second is not None:
            second.bits, second.act = saved[1]


def requant_nodes(sim: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The requant nodes in graph order."""
    return [n for n in sim.graph.nodes if KEY in n.meta and info(n).kind == "requant"]


def link_grids(sim: torch.fx.GraphModule) -> None:
    """After calibration (or after setting quantizers by hand): each grid-input layer's quantizer becomes its
    grid's, and every layer's and requant node's quantizer is recorded in its meta."""
    for node in quantizable_nodes(sim):
        layer = sim.get_submodule(node.target)
        if isinstance(layer, QuantLayer):
            if layer.grid_input:
                layer.act = sim.get_submodule(layer.grid_source).act
            info(node).act = layer.act
            if isinstance(layer, QuantMatMul):
                second = layer.second
                if second.grid_input:
                    second.act = sim.get_submodule(second.grid_source).act
                info(node).second = second.act
    for node in requant_nodes(sim):
        info(node).act = sim.get_submodule(node.target).act


def quant_state(gm: torch.nn.Module) -> str:
    """Every quantizer of a simulation (bits, grid inputs, activation parameters) and the semantics version, as
    text, in module order; "" for a module without quantizers. Backends hash it with the weights."""
    state = {}
    for name, m in gm.named_modules():
        if isinstance(m, QuantLayer):
            fixed = m.fixed_weight_scale
            digest = None if fixed is None else hashlib.sha256(fixed.detach().numpy().tobytes()).hexdigest()
            state[name] = [m.w_bits, m.a_bits, m.grid_source, None if m.act is None else vars(m.act), digest]
        elif isinstance(m, Requant):
            state[name] = None if m.act is None else vars(m.act)
        elif isinstance(m, OperandQuant):
            state[name] = [m.bits, m.grid_source, None if m.act is None else vars(m.act)]
    return json.dumps({"semantics": SEMANTICS, "quantizers": state}) if state else ""


def _quant_copy(module: nn.Module, w_bits: int, a_bits: int, signed: tuple[bool, bool], scales: str) -> nn.Module:
    """The quantized copy of a layer; ``signed``: whether its (first, second) operand's producer can be negative."""
    q = copy.deepcopy(module)
    q.__class__ = QuantConv2d if isinstance(module, nn.Conv2d) else QuantMatMul if isinstance(module, MatMul) \
        else QuantLinear
    q._init_quant(w_bits, a_bits, signed[0], scales)
    if isinstance(q, QuantMatMul):
        q.second = OperandQuant(w_bits, signed[1], scales)
    return q


def simulate(gm: torch.fx.GraphModule, calibration: Iterable[torch.Tensor], scales: str = "float",
             method: str | None = None, ranges: dict[str, Observed] | None = None,
             clipping: str = "minmax") -> torch.fx.GraphModule:
    """A copy of ``gm`` whose layers are fake-quantized at the bits in their meta (the policy pass sets them),
    with clipping ranges chosen by ``clipping`` (:data:`CALIBRATIONS`) from ``calibration`` batches of training
    images; ``method`` names how they were made (recorded in each :class:`ActQuant`, e.g. "mse, noise
    sigma=0.25"; default: ``clipping``). ``ranges`` (quantizer name → :class:`Observed`, see
    :func:`observed_ranges`) replaces the calibration run.
    The graph is integer-only (:func:`integerize`). Records each layer's and requant node's :class:`ActQuant`
    in ``meta["arqc"].act``."""
    if scales not in SCALES:
        raise ValueError(f"scales must be one of {SCALES}")
    _check_calibration(clipping)
    method = clipping if method is None else method
    sim = copy.deepcopy(gm)
    for node in sim.graph.nodes:  # fx copies node.meta shallowly: the simulation gets its own NodeInfos
        if KEY in node.meta:
            node.meta[KEY] = dataclasses.replace(node.meta[KEY])
    for node in quantizable_nodes(sim):
        meta = info(node)
        signed = tuple(not info(a).nonneg for a in node.args[:2] if isinstance(a, torch.fx.Node)) + (True,)
        layer = _quant_copy(sim.get_submodule(node.target), meta.w_bits, meta.a_bits, signed[:2], scales)
        layer.method, layer.calibration = method, clipping
        if isinstance(layer, QuantMatMul):
            layer.second.method, layer.second.calibration = method, clipping
        owner, _, name = node.target.rpartition(".")
        setattr(sim.get_submodule(owner), name, layer)
    integerize(sim, scales, method, clipping)
    if ranges is None:
        first = calibrate(sim, calibration)
        if scales == "float":
            avoid_ties(sim, first[:TIE_IMAGES])
    else:
        for name, m in _quantizers(sim).items():
            m.observed = ranges.get(name)
            m.finish_calibration()
        link_grids(sim)
    return sim


def _quantizers(sim: torch.fx.GraphModule) -> dict[str, _Observer]:
    """The calibrated quantizers by name: each layer's input quantizer by layer name, each requant module by
    its target."""
    found: dict[str, _Observer] = {}
    for n in quantizable_nodes(sim):
        layer = sim.get_submodule(n.target)
        if isinstance(layer, QuantLayer):
            found[info(n).layer] = layer
        if isinstance(layer, QuantMatMul):
            found[f"{info(n).layer}.second"] = layer.second
    return found | {n.target: sim.get_submodule(n.target) for n in requant_nodes(sim)}


def observed_ranges(sim: torch.fx.GraphModule) -> dict[str, Observed]:
    """What each calibrated quantizer observed: layers' inputs by layer name, requant modules by target.
    Of a simulation whose weights are all unquantized, these are the float model's activations: what
    calibration sees for any policy in which only one layer is quantized (the sensitivity proxy's policies)."""
    return {name: m.observed for name, m in _quantizers(sim).items() if m.observed is not None}


def calibrate(sim: torch.fx.GraphModule, calibration: Iterable[torch.Tensor]) -> torch.Tensor:
    """Calibrate every quantizer on ``calibration`` batches (one pass with all activations float) and record
    the results in the nodes' meta. Returns the first batch."""
    quantizers = [m for m in sim.modules() if isinstance(m, QuantLayer | Requant | OperandQuant)]
    for m in quantizers:
        m.calibrating, m.observed = True, None
    seen, first = 0, None
    with torch.no_grad():
        for batch in calibration:
            sim(batch)
            seen += len(batch)
            first = batch if first is None else first
    if seen == 0:
        raise ValueError("calibration needs at least one image")
    for m in quantizers:
        m.finish_calibration()
    link_grids(sim)
    return first


def near_ties(x: torch.Tensor, act: ActQuant, scale: float) -> int:
    """How many values of ``x``, divided by ``scale`` as the quantizer does, lie within :data:`TIE_MARGIN` of a
    step of a rounding tie and round inside the grid's range (a clamped value's rounding does not matter)."""
    v = x / scale
    code = torch.round(v) + act.zero_point
    on_tie = (v - torch.floor(v) - 0.5).abs() < TIE_MARGIN
    return int((on_tie & (code >= act.qmin) & (code <= act.qmax)).sum())


def off_ties(x: torch.Tensor, act: ActQuant) -> ActQuant:
    """``act`` with its scale moved by the fewest :data:`TIE_STEP` (relative, float32) that leave the fewest
    values of ``x`` on a rounding tie (:func:`near_ties`); ``act`` itself when none is."""
    best = None
    for k in sorted(range(-TIE_TRIES, TIE_TRIES + 1), key=lambda k: (abs(k), k)):
        scale = float(torch.tensor(act.scale * (1 + k * TIE_STEP), dtype=torch.float32))
        count = near_ties(x, act, scale)
        if best is None or count < best[0]:
            best = (count, scale)
        if count == 0:
            break
    if best[1] == act.scale:
        return act
    return dataclasses.replace(act, scale=best[1], method=f"{act.method}, off ties")


def avoid_ties(sim: torch.fx.GraphModule, images: torch.Tensor) -> int:
    """Move every float activation scale of a calibrated ``sim`` off rounding ties (:func:`off_ties`) on what it
    rounds when ``sim`` runs on ``images``, in one pass in graph order, so each quantizer sees its inputs as
    computed with the scales already chosen before it. Returns how many scales moved.

    Why: the values a quantizer rounds are few and frequent (an integer layer's output is one of its
    accumulator values times a fixed scale; a grid holds 256), and calibration relates scales to them exactly
    (min/max maps the observed maximum to the last code, so half of it to a tie). A value that is a tie in
    exact arithmetic rounds either way in float32, by each runtime's order of operations, and every element
    that has it flips together. Moving the scale by at most TIE_TRIES · TIE_STEP (0.15 %) leaves the range
    as calibrated and makes such flips as rare as for any other value."""
    moved = 0

    def pick(m: nn.Module, inputs: tuple) -> None:
        nonlocal moved
        if getattr(m, "grid_input", False):  # reads its grid's quantizer, which may just have moved: relink
            m.act = sim.get_submodule(m.grid_source).act
            return
        bits = m.a_bits if isinstance(m, QuantLayer) else m.bits
        if m.act is None or bits >= FP32 or getattr(m, "learned_scale", None) is not None:
            return
        chosen = off_ties(inputs[0].detach(), m.act)
        moved += chosen is not m.act
        m.act = chosen

    quantizers = [m for m in sim.modules() if isinstance(m, QuantLayer | Requant | OperandQuant)]
    handles = [m.register_forward_pre_hook(pick) for m in quantizers]
    training = sim.training
    try:
        sim.eval()
        with torch.no_grad():
            sim(images)
    finally:
        sim.train(training)
        for h in handles:
            h.remove()
    link_grids(sim)
    return moved


def _learnable(sim: torch.nn.Module):
    """(module, attribute, initial scale, shape) of every scale LSQ learns: each activation quantizer that rounds
    (not a grid input, which reads its grid's) and each quantized layer's per-channel weight scale."""
    for m in sim.modules():
        if isinstance(m, QuantLayer | OperandQuant | Requant) and m.act is not None and \
                not getattr(m, "grid_input", False) and (m.a_bits if isinstance(m, QuantLayer) else m.bits) < FP32:
            yield m, "learned_scale", torch.tensor(m.act.scale, dtype=torch.float32)
        if isinstance(m, QuantLayer) and not isinstance(m, QuantMatMul) and m.w_bits < FP32:
            yield m, "learned_weight_scale", m.weight_scale().detach().clone().float()


def learn_scales(sim: torch.fx.GraphModule) -> list[nn.Parameter]:
    """Make every scale of a calibrated simulation a parameter (LSQ), initialized at its calibrated value;
    zero points stay. Returns the new parameters (train them without weight decay; :func:`clamp_scales` after
    each step). Float scales only: a learned scale is no power of two."""
    if any(getattr(m, "scales", "float") == "po2" for m in sim.modules()):
        raise ValueError("learned scales (LSQ) need float scales, not po2")
    params = []
    for m, name, init in list(_learnable(sim)):
        p = nn.Parameter(init.to(next(iter(sim.parameters())).device))
        setattr(m, name, p)
        params.append(p)
    return params


def clamp_scales(params: Iterable[nn.Parameter], floor: float = 1e-8) -> None:
    """Keep learned scales positive after an optimizer step."""
    with torch.no_grad():
        for p in params:
            p.clamp_(min=floor)


def freeze_scales(sim: torch.fx.GraphModule) -> None:
    """Write the learned scales back as fixed ones (an activation's :class:`ActQuant` gets the learned scale and
    ", lsq" in its method; a layer's weights get ``fixed_weight_scale``), remove the parameters and relink the
    grids, so lowering writes exactly the scales the forward used."""
    for m in list(sim.modules()):
        learned = m._parameters.get("learned_scale")
        if learned is not None:
            scale = float(learned.detach().float().cpu())
            del m.learned_scale
            m.act = dataclasses.replace(m.act, scale=scale, method=f"{m.act.method}, lsq")
        learned = m._parameters.get("learned_weight_scale")
        if learned is not None:
            m.fixed_weight_scale = learned.detach().float().cpu().clone()
            del m.learned_weight_scale
    link_grids(sim)


def _channel_means(model: torch.nn.Module, targets: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean output per channel (conv: dim 1; linear: the last dim) of each module in ``targets`` over
    ``batches``, in float64, from one pass."""
    sums: dict[str, list] = {t: [None, 0] for t in targets}

    def hook(target: str, module: torch.nn.Module, out: torch.Tensor) -> None:
        channel = out.dim() - 1 if isinstance(module, nn.Linear) else 1
        dims = [d for d in range(out.dim()) if d != channel]
        s, entry = out.detach().double().sum(dims), sums[target]
        entry[0] = s if entry[0] is None else entry[0] + s
        entry[1] += out.numel() // out.shape[channel]

    handles = [model.get_submodule(t).register_forward_hook(
        lambda m, _, out, t=t: hook(t, m, out)) for t in targets]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return {t: total / count for t, (total, count) in sums.items()}


def correct_biases(sim: torch.fx.GraphModule, float_gm: torch.fx.GraphModule,
                   batches: Iterable[torch.Tensor]) -> None:
    """Empirical bias correction (Nagel et al. 2019): shift each quantized layer's bias by the mean difference,
    per output channel, between the simulation's output of that layer and the float model's, both run on
    ``batches`` (the calibration images, with noise as the base classifier sees them), one layer after the
    other in graph order so that each correction sees the ones before it. In place; the corrected float bias
    is then quantized like any bias (int32 at s_x · s_w), so the lowering stays exact. Layers without a bias,
    and matmuls of two activations, are left alone."""
    batches = list(batches)
    targets = []
    for n in quantizable_nodes(sim):
        m = sim.get_submodule(n.target)
        if isinstance(m, QuantLayer) and not isinstance(m, QuantMatMul) and m.bias is not None and m.w_bits < FP32:
            targets.append(n.target)
    reference = _channel_means(float_gm, targets, batches)
    for target in targets:
        shift = _channel_means(sim, [target], batches)[target] - reference[target]
        layer = sim.get_submodule(target)
        with torch.no_grad():  # from the bias as it was applied (on its int32 grid): within half a step after
            layer.bias.copy_(layer.effective_bias().detach() - shift.to(layer.bias.dtype))
