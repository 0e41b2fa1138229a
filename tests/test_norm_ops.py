"""Softmax and layer norm (passes/ops/normalization.py): float ops between quantized ops, with sound interval rules.

Oracles: brute force (the float32 forwards of torch and onnxruntime on thousands of points of each box: its corners,
the corners that make each output extreme, and random points) for the interval rules, in boxes of every width from
0 to 10, rows whose inputs are all equal, and rows at an offset of 1000 with a small spread (where a float32 layer
norm cancels); onnxruntime for the lowering; torchvision's convnext_tiny for capture. Each rule's margin and its
dependency reasoning are shown to be needed: without them the same brute force finds outputs outside the bounds.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from arqc.base import ArqcError
from arqc.passes import ops
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.passes.meta import info
from arqc.passes.policy import apply_policy, uniform
from arqc.passes.quantize import simulate
from arqc.runtime.ibp import input_box, interval_bounds

pytestmark = pytest.mark.usefixtures("one_thread")

SOFTMAX, LAYER_NORM = ops.RULES["softmax"], ops.RULES["layer_norm"]


def boxes(rng: np.random.Generator, count: int, n: int, offset: float = 0.0, spread: float = 3.0,
          widths: tuple[float, float] = (-7, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` boxes of rows of ``n`` inputs, float32 corners (valid float32 inputs) held in float64: centres
    offset + spread·N(0, 1), per-box widths 10^U(widths) (each input's own width a random part of it); the first
    quarter degenerate (a point), the next eighth rows whose inputs are all equal (a point or a box)."""
    centre = offset + spread * rng.standard_normal((count, n))
    width = 10.0 ** rng.uniform(*widths, (count, 1)) * rng.uniform(0, 1, (count, n))
    width[: count // 4] = 0
    same = slice(count // 4, count // 4 + count // 8)
    centre[same] = centre[same, :1]
    width[same] = width[same, :1] * (np.arange(count)[same, None] % 2)
    lo = centre - width * rng.uniform(0, 1, (count, n))
    lo, hi = torch.tensor(lo).float(), torch.tensor(lo + width).float()
    return lo.double(), torch.maximum(hi, lo).double()


def points(lo: torch.Tensor, hi: torch.Tensor, count: int, gen: torch.Generator, extremes: bool = True) -> torch.Tensor:
    """Float32 points of each box [B, n] → [B, P, n]: the two ends, random corners, random points, and (with
    ``extremes``) for each coordinate i the corners (lo_i, hi_others) and (hi_i, lo_others), where a softmax
    output and a deviation from the mean are smallest and largest."""
    b, n = lo.shape
    t = torch.rand(b, count, n, dtype=torch.float64, generator=gen)
    t[:, : count // 4] = (t[:, : count // 4] < 0.5).double()  # random corners
    parts = [lo[:, None], hi[:, None], lo[:, None] + (hi - lo)[:, None] * t]
    if extremes:
        eye = torch.eye(n, dtype=torch.bool)[None]
        parts += [torch.where(eye, lo[:, None], hi[:, None]), torch.where(eye, hi[:, None], lo[:, None])]
    return torch.cat(parts, 1).float()  # in [lo, hi]: lo and hi are float32 values and rounding is monotone


def _onnx(node: onnx.NodeProto, n: int, initializers=()) -> ort.InferenceSession:
    shape = ["batch", n]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def onnx_softmax(z: torch.Tensor) -> torch.Tensor:
    session = _onnx(helper.make_node("Softmax", ["x"], ["y"], axis=-1), z.shape[-1])
    return torch.from_numpy(session.run(None, {"x": z.reshape(-1, z.shape[-1]).numpy()})[0]).reshape(z.shape)


def onnx_layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    inits = [numpy_helper.from_array(weight.float().numpy(), "w"), numpy_helper.from_array(bias.float().numpy(), "b")]
    node = helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1, epsilon=eps)
    session = _onnx(node, z.shape[-1], inits)
    return torch.from_numpy(session.run(None, {"x": z.reshape(-1, z.shape[-1]).numpy()})[0]).reshape(z.shape)


def assert_contained(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor, what: str) -> None:
    values, low, high = values.double(), low.double()[:, None], high.double()[:, None]
    below, above = values < low, values > high
    assert not bool(below.any()), f"{what}: {int(below.sum())} float32 outputs below the lower bound"
    assert not bool(above.any()), f"{what}: {int(above.sum())} float32 outputs above the upper bound"


def violations(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> int:
    values, low, high = values.double(), low.double()[:, None], high.double()[:, None]
    return int(((values < low) | (values > high)).sum())


class _Node:  # what an interval rule reads of its node: the canonical arguments
    def __init__(self, *args):
        self.args = args


def softmax_bounds(lo, hi, dtype=torch.float64, sound=True):
    low, high = SOFTMAX.interval(_Node(None, 1), None, [lo.to(dtype), 1], [hi.to(dtype), 1], sound=sound)
    return low.double(), high.double()


def layer_norm_bounds(lo, hi, weight, bias, eps, dtype=torch.float64, sound=True):
    n = lo.shape[-1]
    cast = (lambda t: None if t is None else t.to(dtype))
    args = [(n,), cast(weight), cast(bias), eps]
    low, high = LAYER_NORM.interval(_Node(None, *args), None, [lo.to(dtype), *args], [hi.to(dtype), *args],
                                    sound=sound)
    return low.double(), high.double()


# ------------------------------------------------------------------------------------------------------
# Softmax bounds


SOFTMAX_CASES = [(2, 0.0, 3.0), (3, 0.0, 3.0), (10, 0.0, 5.0), (64, 0.0, 3.0), (64, 1000.0, 0.01), (197, 0.0, 8.0)]


@pytest.mark.parametrize("n, offset, spread", SOFTMAX_CASES, ids=[f"n{n}-x{o:g}±{s:g}" for n, o, s in SOFTMAX_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_softmax_bounds_contain_torch_and_onnxruntime_float32(n, offset, spread, dtype):
    rng, gen = np.random.default_rng(n), torch.Generator().manual_seed(n)
    lo, hi = boxes(rng, 48 if n < 100 else 16, n, offset, spread)
    low, high = softmax_bounds(lo, hi, dtype)
    z = points(lo, hi, 2000 if n < 100 else 500, gen)
    assert_contained(torch.softmax(z, -1), low, high, "torch")
    assert_contained(onnx_softmax(z), low, high, "onnxruntime")
    assert bool((low >= 0).all()) and bool((high <= 1).all())
    # tight: on the degenerate boxes the bounds are the value up to the margin; elsewhere at most the margin wider
    # than the exact range, which the extreme corners reach
    exact = torch.softmax(z.double(), -1)
    reached_lo, reached_hi = exact.min(1).values, exact.max(1).values
    slack = (1e-4 if dtype == torch.float64 else 1e-2) * reached_hi + 1e-9  # float32: ~N·R·u of our own
    assert bool((low >= reached_lo - slack).all()) and bool((high <= reached_hi + slack).all())


def test_softmax_over_an_inner_dimension():
    """dim 1 of [B, n, 3]: the rule moves the dimension and back."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, 3, generator=gen) * 3
    lo, hi = (x - 0.1).double(), (x + 0.1).double()
    low, high = SOFTMAX.interval(_Node(None, 1), None, [lo, 1], [hi, 1])
    for _ in range(200):
        y = torch.softmax((lo + (hi - lo) * torch.rand(lo.shape, dtype=torch.float64, generator=gen)).float(), 1)
        assert bool(((y >= low) & (y <= high)).all())
    assert low.shape == x.shape and bool((high - low < 0.5).all())


def test_softmax_needs_the_opposite_corners_and_its_margin(monkeypatch):
    """Softmax is not monotone in the box: softmax(lo) and softmax(hi) do not bound it (output i is least at
    (lo_i, hi_others)). And without the float32 margin, the forward's own rounding leaves the bounds."""
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    lo, hi = boxes(rng, 48, 10, 0.0, 3.0, widths=(-2, 0))
    z = points(lo, hi, 500, gen)
    values = torch.softmax(z, -1)
    ends = torch.softmax(lo.float(), -1).double(), torch.softmax(hi.float(), -1).double()
    naive = torch.minimum(*ends), torch.maximum(*ends)
    assert violations(values, *naive) > 1000
    assert violations(values, *softmax_bounds(lo, hi)) == 0
    monkeypatch.setattr(ops.rounding, "U32", 0.0)
    monkeypatch.setattr(ops.rounding, "TINY", 0.0)
    lo, hi = boxes(rng, 200, 10, 0.0, 3.0, widths=(-7, -6))
    z = points(lo, hi, 50, gen)
    assert violations(torch.softmax(z, -1), *softmax_bounds(lo, hi)) > 0


# ------------------------------------------------------------------------------------------------------
# Layer norm bounds

# (n, offset, spread, eps, affine: "random" γ of both signs and β / None)
LAYER_NORM_CASES = [(2, 0.0, 3.0, 1e-5, "random"), (5, 0.0, 1.0, 1e-5, "random"), (64, 0.0, 3.0, 1e-5, None),
                    (64, 0.0, 3.0, 1e-6, "random"), (64, 1000.0, 1e-3, 1e-5, "random"),
                    (64, 1000.0, 1.0, 1e-6, "random"), (16, -3000.0, 0.01, 1e-5, None),
                    (768, 0.0, 2.0, 1e-6, "random")]


def _affine(n: int, how, gen: torch.Generator):
    if how is None:
        return None, None
    return (torch.randn(n, generator=gen) * 2).double(), torch.randn(n, generator=gen).double()


@pytest.mark.parametrize("n, offset, spread, eps, how", LAYER_NORM_CASES,
                         ids=[f"n{n}-x{o:g}±{s:g}-eps{e:g}-{h}" for n, o, s, e, h in LAYER_NORM_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_layer_norm_bounds_contain_torch_and_onnxruntime_float32(n, offset, spread, eps, how, dtype):
    rng, gen = np.random.default_rng(n + abs(int(offset))), torch.Generator().manual_seed(n)
    lo, hi = boxes(rng, 48 if n < 500 else 12, n, offset, spread)
    weight, bias = _affine(n, how, gen)
    low, high = layer_norm_bounds(lo, hi, weight, bias, eps, dtype)
    z = points(lo, hi, 1500 if n < 500 else 300, gen, extremes=n < 100)
    w32, b32 = (None, None) if weight is None else (weight.float(), bias.float())
    assert_contained(F.layer_norm(z, (n,), w32, b32, eps), low, high, "torch")
    ones, zeros = torch.ones(n), torch.zeros(n)
    assert_contained(onnx_layer_norm(z, ones if w32 is None else w32, zeros if b32 is None else b32, eps), low, high,
                     "onnxruntime")
    assert bool(torch.isfinite(low).all()) and bool(torch.isfinite(high).all())


def test_layer_norm_bounds_are_tight_on_small_boxes_of_ordinary_inputs():
    """|x| ≲ 10, var ≈ 9, boxes up to 1e-4 wide (not rows of equal inputs, where z is ill-conditioned): the bounds
    exceed the exact range that the sampled points reach by the IBP looseness of the box (the training-mode bounds'
    excess) and a margin of at most 0.5 % of |γ|·(max|z| + 1) (measured: 0.2 % at N = 768, 0.03 % at N = 96)."""
    rng, gen = np.random.default_rng(7), torch.Generator().manual_seed(7)
    for n in (8, 96, 768):
        lo, hi = boxes(rng, 64, n, 0.0, 3.0, widths=(-7, -4))
        keep = torch.cat([torch.arange(16), torch.arange(24, 64)])  # points and boxes, not rows of equal inputs
        lo, hi = lo[keep], hi[keep]
        weight, bias = _affine(n, "random", gen)
        low, high = layer_norm_bounds(lo, hi, weight, bias, 1e-6)
        plain_low, plain_high = layer_norm_bounds(lo, hi, weight, bias, 1e-6, sound=False)
        exact = F.layer_norm(points(lo, hi, 200, gen, extremes=False).double(), (n,), weight, bias, 1e-6)
        reached_lo, reached_hi = exact.min(1).values, exact.max(1).values
        allowed = 5e-3 * weight.abs() * (((exact - bias) / weight).abs().amax((0, 1)) + 1)
        assert bool((reached_lo - low <= (reached_lo - plain_low).clamp_min(0) + allowed).all())
        assert bool((high - reached_hi <= (plain_high - reached_hi).clamp_min(0) + allowed).all())


def test_layer_norm_over_several_dimensions():
    """normalized_shape (4, 6) of [B, 3, 4, 6], weight only: the rule flattens the last two dimensions."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, 6, generator=gen) * 2
    weight = torch.randn(4, 6, generator=gen).double()
    lo, hi = (x - 0.05).double(), (x + 0.05).double()
    node = _Node(None, (4, 6), weight, None, 1e-5)
    low, high = LAYER_NORM.interval(node, None, [lo, (4, 6), weight, None, 1e-5], [hi, (4, 6), weight, None, 1e-5])
    assert low.shape == x.shape
    for _ in range(200):
        z = (lo + (hi - lo) * torch.rand(lo.shape, dtype=torch.float64, generator=gen)).float()
        y = F.layer_norm(z, (4, 6), weight.float(), None, 1e-5)
        assert bool(((y >= low) & (y <= high)).all())


def test_layer_norm_needs_the_dependency_and_its_margin(monkeypatch):
    """Layer norm is not monotone: LN(lo) and LN(hi) do not bound it. Its bounds at the opposite corners hold, and
    are exact there: z_i is largest at (hi_i, lo_others). Without the float32 margin the forward's rounding (the
    cancellation in x − mean at an offset) leaves the bounds."""
    rng, gen = np.random.default_rng(3), torch.Generator().manual_seed(3)
    lo, hi = boxes(rng, 48, 6, 0.0, 1.0, widths=(-1, 0))
    z = points(lo, hi, 500, gen)
    values = F.layer_norm(z, (6,))
    ends = F.layer_norm(lo.float(), (6,)).double(), F.layer_norm(hi.float(), (6,)).double()
    assert violations(values, torch.minimum(*ends), torch.maximum(*ends)) > 1000
    low, high = layer_norm_bounds(lo, hi, None, None, 1e-5)
    assert violations(values, low, high) == 0
    # the dependency d_i² ≤ (N − 1)·var: x = (1, 0, 0) reaches z_1 = sqrt(2) (with eps = 0 exactly), and the bound
    # of [0, 1] × {0} × {0} is sqrt(2) too, where the interval quotient alone gives 2/3 / sqrt(eps)
    low, high = layer_norm_bounds(torch.tensor([[0.0, 0, 0]]), torch.tensor([[1.0, 0, 0]]), None, None, 1e-12,
                                  sound=False)
    assert abs(float(high[0, 0]) - 2**0.5) < 1e-6
    # and the float32 forward's: on wide boxes (var_lo = 0) the sound bounds stay within a few sqrt(N − 1)
    centre, width = torch.randn(16, 1, generator=gen) * 3, 10 ** torch.rand(16, 1, generator=gen)
    lo = (centre - width * torch.rand(16, 64, generator=gen)).double()  # every interval holds the centre
    low, high = layer_norm_bounds(lo, lo + width.double(), None, None, 1e-6)
    assert float(torch.maximum(-low, high).max()) < 2.5 * 63**0.5  # (without it: thousands)
    monkeypatch.setattr(ops.rounding, "U32", 0.0)
    monkeypatch.setattr(ops.rounding, "TINY", 0.0)
    lo, hi = boxes(rng, 96, 64, 1000.0, 0.1, widths=(-7, -6))
    z = points(lo, hi, 20, gen, extremes=False)
    assert violations(F.layer_norm(z, (64,)), *layer_norm_bounds(lo, hi, None, None, 1e-5)) > 0


@pytest.mark.parametrize("rule", ["softmax", "layer_norm"])
def test_training_bounds_are_differentiable_and_contain_the_exact_function(rule):
    """sound=False: plain IBP in float32, gradients finite (also on wide boxes and rows of equal inputs), and the
    bounds contain the exact (float64) function up to their own float32 rounding."""
    rng, gen = np.random.default_rng(5), torch.Generator().manual_seed(5)
    lo, hi = boxes(rng, 32, 12, 0.0, 2.0, widths=(-3, 1))
    lo32, hi32 = lo.float().requires_grad_(), hi.float().requires_grad_()
    weight = torch.randn(12, generator=gen).requires_grad_()
    if rule == "softmax":
        low, high = SOFTMAX.interval(_Node(None, 1), None, [lo32, 1], [hi32, 1], sound=False)
        exact = torch.softmax(points(lo, hi, 300, gen).double(), -1)
    else:
        args = [(12,), weight, None, 1e-5]
        low, high = LAYER_NORM.interval(_Node(None, *args), None, [lo32, *args], [hi32, *args], sound=False)
        exact = F.layer_norm(points(lo, hi, 300, gen).double(), (12,), weight.detach().double(), None, 1e-5)
    (high - low).sum().backward()
    grads = [lo32.grad, hi32.grad] + ([weight.grad] if rule == "layer_norm" else [])
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    tol = 1e-4 * (1 + torch.maximum(low.abs(), high.abs()).detach().double())
    assert violations(exact, low.detach().double() - tol, high.detach().double() + tol) == 0


# ------------------------------------------------------------------------------------------------------
# Capture, simulation, lowering and bounds of nets


class NormNet(nn.Module):
    """conv → permute → LayerNorm → permute → conv, then tokens: a linear, softmax over features (method form),
    a linear back and a residual add, a functional layer norm with a weight only, attention-like pooling weights
    (torch.softmax over the tokens) and a linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.q, self.proj, self.score = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.c2(x)
        n, c, h, w = x.shape
        t = x.reshape(n, c, h * w).transpose(1, 2)
        t = self.proj(self.q(t).softmax(-1)) + t
        t = F.layer_norm(t, (8,), self.gain, None, 1e-3)
        a = torch.softmax(self.score(t), dim=1)
        return self.fc((a * t).mean(1))


def test_capture_simulate_lower_and_bound_a_net_with_softmax_and_layer_norm():
    torch.manual_seed(0)
    model = NormNet().eval()
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calib = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for source in (model, torch.export.export(model, (x[:1],))):
        gm = analyze(capture(source, x[:1]))
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        kinds = [info(n).kind for n in nodes]
        assert kinds.count("softmax") == 2 and kinds.count("layer_norm") == 2, kinds
        assert [n.args[1] for n in nodes if info(n).kind == "softmax"] == [2, 1]  # non-negative, never the batch
        for n in nodes:
            if info(n).kind == "layer_norm":  # constants as get_attr nodes; the functional call has no bias
                assert n.args[1] == (8,) and n.args[2].op == "get_attr" and info(n.args[2]).kind == "constant"
        softmax_node = next(n for n in nodes if info(n).kind == "softmax")
        assert info(softmax_node).nonneg and info(softmax_node).macs == 0
        torch.testing.assert_close(gm(x), model(x))
        apply_policy(gm, uniform(gm, 8, 8))
        sim = simulate(gm, [calib])
        float_ops = [n for n in sim.graph.nodes if info(n).kind in ("softmax", "layer_norm")]
        assert all(info(n).grid is None and all(info(u).kind != "requant" for u in n.users) for n in float_ops)
        with torch.no_grad():
            ref = sim(x).numpy()
        model_bytes = lower(sim, {}).SerializeToString()
        for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
            out = session.run(None, {"input": x.numpy()})[0]
            cosine = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
            assert cosine.min() >= 0.999, cosine
            # the same function: float ops a few ulps apart (onnxruntime's QLinearSoftmax would move grid points)
            assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
        lo, hi = input_box(x[:8], 2 / 255)
        b_lo, b_hi = interval_bounds(sim, lo, hi)
        assert bool(torch.isfinite(b_lo).all()) and float((b_hi - b_lo).max()) < 10
        gen = torch.Generator().manual_seed(3)
        for _ in range(20):
            z = lo + (hi - lo) * torch.rand(lo.shape, generator=gen)
            with torch.no_grad():
                y = sim(z)
            assert bool(((y >= b_lo) & (y <= b_hi)).all())


@pytest.mark.parametrize("make, message", [
    (lambda: nn.Softmax(dim=0), "softmax over the batch dimension"),
    (lambda: nn.Softmax(dim=None), "softmax without a dim"),
    (lambda: _Call(lambda x: F.softmax(x, -1, dtype=torch.float64).float()), "dtype=torch.float64"),
    (lambda: nn.LayerNorm([2, 2, 3, 4]), "not the batch"),
])
@pytest.mark.filterwarnings("ignore:Implicit dimension choice for softmax")
def test_unsupported_uses_are_refused(make, message):
    with pytest.raises(ArqcError, match=message):
        capture(make().eval(), torch.rand(2, 2, 3, 4))


class _Call(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


def test_layer_norm_without_affine_and_softmax2d_lower_to_onnx():
    """nn.LayerNorm(elementwise_affine=False) lowers with ones and zeros, over two dimensions; nn.Softmax2d is a
    softmax over the channels."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.soft = nn.LayerNorm([4, 4], elementwise_affine=False), nn.Softmax2d()

        def forward(self, x):
            return self.soft(self.norm(x * 3))

    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    gm = analyze(capture(Net().eval(), x[:1]))
    norm = next(n for n in gm.graph.nodes if n.op == "call_function" and info(n).kind == "layer_norm")
    assert norm.args[1:] == ((4, 4), None, None, 1e-5)
    assert next(n.args[1] for n in gm.graph.nodes if n.op == "call_function" and info(n).kind == "softmax") == 1
    session = ort.InferenceSession(lower(simulate(gm, [x]), {}).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], Net()(x).numpy(), rtol=1e-5, atol=1e-6)


def test_convnext_tiny_compiles():
    """torchvision's convnext_tiny (LayerNorm2d: permute, F.layer_norm, permute; nn.LayerNorm in every block,
    linears on channels-last tokens, layer scale) captures, lowers at W8A8 and runs in onnxruntime like the
    simulation."""
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    gm = analyze(capture(model, x[:1]))
    assert sum(info(n).kind == "layer_norm" for n in gm.graph.nodes) == 23
    apply_policy(gm, uniform(gm, 8, 8))
    sim = simulate(gm, [torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))])
    with torch.no_grad():
        ref = sim(x).numpy()
    out = ort.InferenceSession(lower(sim, {}).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    cosine = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    assert cosine.min() >= 0.999, cosine
