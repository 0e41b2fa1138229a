"""Ops that run in float between quantized ops: the activations of passes/ops/activations.py (sigmoid, tanh,
hardsigmoid, hardswish, silu, gelu in both modes), the mean over dimensions (passes/ops/pooling.py) and the
per-channel affine of a standalone BatchNorm (passes/ops/elementwise.py); and the rearrangements reshape,
permute and chunk (passes/ops/shape.py, passes/capture.py).

Oracles: brute force (the float32 forward of torch itself on many points of each interval, the interval's ends
and the neighbourhood of the interior minimum) for the interval rules; onnxruntime for the lowering; torchvision's
own models for capture.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
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

# (kind, extra canonical arguments, the torch forward)
ACTIVATIONS = [("sigmoid", (), torch.sigmoid), ("tanh", (), torch.tanh), ("hardsigmoid", (), F.hardsigmoid),
               ("hardswish", (), F.hardswish), ("silu", (), F.silu),
               ("gelu", ("none",), lambda t: F.gelu(t, approximate="none")),
               ("gelu", ("tanh",), lambda t: F.gelu(t, approximate="tanh"))]


class _Node:  # what an interval rule reads of its node: the canonical arguments
    def __init__(self, *args):
        self.args = args


def intervals(rng: np.random.Generator, count: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals of every width around every feature of the functions: their minima (-1.5, -1.28, -0.75), the
    kinks of the hard ones (±3), saturation, zero, tiny and wide."""
    centers = np.concatenate([rng.choice([-1.5, -1.2785, -0.7518, -3.0, 3.0, 0.0, -8.0, 8.0], count // 2),
                              rng.uniform(-10, 10, count - count // 2)])
    widths = 10.0 ** rng.uniform(-7, 1.3, count)
    lo = centers - widths * rng.uniform(0, 1, count)
    return torch.tensor(lo), torch.tensor(lo + widths)


@pytest.mark.parametrize("kind, extra, forward", ACTIVATIONS, ids=[f"{k}{e}" for k, e, _ in ACTIVATIONS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sound_bounds_contain_the_float32_forward_and_are_tight(kind, extra, forward, dtype):
    rule = ops.RULES[kind]
    rng = np.random.default_rng(0)
    lo, hi = intervals(rng)
    node = _Node(None, *extra)
    b_lo, b_hi = rule.interval(node, None, [lo.to(dtype)], [hi.to(dtype)], sound=True)
    t = torch.rand(lo.shape[0], 4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    points = lo[:, None] + (hi - lo)[:, None] * t
    x_star = rule._minimum_of(node)[0] if rule.minimum is not None else 0.0
    near = x_star + torch.linspace(-1e-3, 1e-3, 201, dtype=torch.float64)[None, :]
    near = torch.clamp(near, lo[:, None], hi[:, None])
    points = torch.cat([points, lo[:, None], hi[:, None], near], dim=1).float()  # what a float32 forward sees
    values = forward(points).double()
    assert bool((values >= b_lo.double()[:, None]).all()), "a float32 output below the lower bound"
    assert bool((values <= b_hi.double()[:, None]).all()), "a float32 output above the upper bound"
    # tight: the bounds exceed the sampled range by no more than the rounding margin and the sampling gap
    reached_lo, reached_hi = values.min(1).values, values.max(1).values
    slack = 1e-3 * (hi - lo) + 1e-4
    assert bool((b_lo.double() >= reached_lo - slack).all()) and bool((b_hi.double() <= reached_hi + slack).all())


@pytest.mark.parametrize("kind", ["hardswish", "silu", "gelu"])
def test_the_interior_minimum_is_needed(kind):
    """Without the minimum the rule would be unsound: over [-2, 0] each function dips below both ends."""
    rule = ops.RULES[kind]
    node = _Node(None, "none") if kind == "gelu" else _Node(None)
    lo, hi = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    b_lo, _ = rule.interval(node, None, [lo], [hi], sound=True)
    ends = torch.minimum(rule.fn(lo, *node.args[1:]), rule.fn(hi, *node.args[1:]))
    assert float(b_lo) <= rule._minimum_of(node)[1] < float(ends) - 0.03


class Activations(nn.Module):
    """Every activation, in module, functional and method form, with a squeeze-excite gate (mul of two
    activations) and an add."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.se = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)
        self.act1, self.act2, self.gate = nn.Hardswish(), nn.GELU(approximate="tanh"), nn.Hardsigmoid()

    def forward(self, x):
        x = self.act1(self.c1(x))
        y = F.silu(self.c2(x))
        y = y * self.gate(self.se(F.adaptive_avg_pool2d(y, 1)))
        y = self.act2(self.c3(y)) + x.tanh()
        y = F.gelu(y) + torch.sigmoid(y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_capture_lower_and_bound_a_net_of_every_activation():
    torch.manual_seed(0)
    model = Activations().eval()
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for source in (model, torch.export.export(model, (x[:1],))):
        gm = analyze(capture(source, x[:1]))
        kinds = {info(n).kind for n in gm.graph.nodes}
        assert {"hardswish", "silu", "hardsigmoid", "gelu", "tanh", "sigmoid", "mul"} <= kinds, kinds
    for bits, scales in ((8, "po2"), (4, "float")):
        apply_policy(gm, uniform(gm, bits, bits))
        sim = simulate(gm, [torch.rand(32, 3, 8, 8)], scales=scales)
        with torch.no_grad():
            ref = sim(x).numpy()
        session = ort.InferenceSession(lower(sim, {}).SerializeToString(), providers=["CPUExecutionProvider"])
        out = session.run(None, {"input": x.numpy()})[0]
        assert np.abs(ref).max() > 0 and (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
        assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()  # float activations: ulps apart per op
        lo, hi = input_box(x[:8], 2 / 255)
        b_lo, b_hi = interval_bounds(sim, lo, hi)
        for _ in range(10):
            z = lo + (hi - lo) * torch.rand_like(lo)
            with torch.no_grad():
                y = sim(z)
            assert bool(((y >= b_lo) & (y <= b_hi)).all())


@pytest.mark.parametrize("dims, keepdim", [((2, 3), False), ((2, 3), True), ((1,), True), ((-1,), False)])
def test_mean_bounds_contain_the_float32_forward_and_lower_to_reduce_mean(dims, keepdim):
    class Mean(nn.Module):
        def forward(self, x):
            return x.mean(dims, keepdim=keepdim)

    x = torch.randn(4, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 10
    gm = analyze(capture(Mean().eval(), x[:1]))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert info(node).kind == "mean"
    rule = ops.RULES["mean"]
    lo, hi = (x - 0.5).double(), (x + 0.5).double()  # float32 values: the corners are valid inputs
    b_lo, b_hi = rule.interval(node, None, [lo], [hi], sound=True)
    points = [lo.float(), hi.float()] + [(lo + (hi - lo) * torch.rand_like(lo)).float() for _ in range(50)]
    for z in points:  # at the corners the float32 sum reaches the bounds up to its rounding
        y = gm(z).double()
        assert bool(((y >= b_lo) & (y <= b_hi)).all())
    ref = torch.mean(x, [d % 4 for d in dims], keepdim)
    torch.testing.assert_close(gm(x), ref)
    session = ort.InferenceSession(lower(simulate(gm, [x]), {}).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], ref.numpy(), rtol=1e-5, atol=1e-5)


class Shuffle(nn.Module):
    """ShuffleNet's moves: chunk, a channel shuffle (view → transpose → view), a permute there and back, cat."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, torch.relu(self.c2(b))], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        x = x.permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        return torch.flatten(self.c3(x), 1)


def test_reshape_permute_and_chunk_keep_the_grid_and_lower_bit_exactly():
    torch.manual_seed(0)
    model = Shuffle().eval()
    x = torch.rand(32, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    for source in (model, torch.export.export(model, (x[:1],))):
        gm = analyze(capture(source, x[:1]))
        kinds = [info(n).kind for n in gm.graph.nodes if n.op == "call_function"]
        assert {"reshape", "permute", "slice", "cat"} <= set(kinds), kinds
        torch.testing.assert_close(gm(x), model(x))
    apply_policy(gm, uniform(gm, 8, 8))
    sim = simulate(gm, [torch.rand(16, 3, 6, 6)], scales="po2")
    grids = {info(n).kind: info(n).grid for n in sim.graph.nodes if n.op == "call_function"}
    assert grids["reshape"] is not None and grids["permute"] is not None  # exact rearrangements keep the grid
    with torch.no_grad():
        ref = sim(x).numpy()
    model_bytes = lower(sim, {}).SerializeToString()
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        out = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
        assert np.array_equal(out[0], ref)  # po2: exact
    lo, hi = input_box(x[:4], 2 / 255)
    b_lo, b_hi = interval_bounds(sim, lo, hi)
    assert bool((torch.from_numpy(ref[:4]) >= b_lo).all()) and bool((torch.from_numpy(ref[:4]) <= b_hi).all())


def test_a_view_that_moves_the_batch_is_refused():
    class Fold(nn.Module):
        def forward(self, x):
            return x.reshape(1, -1)

    with pytest.raises(ArqcError, match="unsupported use of reshape .*moves the batch dimension"):
        capture(Fold().eval(), torch.rand(2, 3, 4, 4))


def test_affine_bounds_contain_the_float32_forward():
    """The standalone BatchNorm's rule, with scales of both signs: brute force on the corners and inside."""
    rule = ops.RULES["affine"]
    g = torch.Generator().manual_seed(4)
    scale, shift = torch.randn(6, 1, 1, generator=g) * 3, torch.randn(6, 1, 1, generator=g) * 5
    x = torch.randn(4, 6, 5, 5, generator=g) * 4
    lo, hi = (x - 0.25).double(), (x + 0.25).double()
    b_lo, b_hi = rule.interval(None, None, [lo, scale, shift], [hi, scale, shift], sound=True)
    for z in [lo.float(), hi.float()] + [(lo + (hi - lo) * torch.rand_like(lo)).float() for _ in range(50)]:
        y = ops.affine(z, scale, shift).double()
        assert bool(((y >= b_lo) & (y <= b_hi)).all())
    assert bool((b_hi - b_lo <= 0.5 * scale.abs().double() + 1e-4).all())  # tight: the box's width times |scale|


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5", "shufflenet_v2_x0_5",
                                  "densenet121"])
def test_torchvision_families_with_these_ops_compile(name):
    """mobilenet_v3_small (hardswish, hardsigmoid squeeze-excite), efficientnet_b0 (silu, sigmoid gates,
    stochastic depth), mnasnet0_5 (x.mean([2, 3])), shufflenet_v2_x0_5 (chunk, channel shuffle) and densenet121
    (BatchNorm after a concat) capture, lower at W8A8 and run in onnxruntime like the simulation."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    gm = analyze(capture(model, x[:1]))
    apply_policy(gm, uniform(gm, 8, 8))
    sim = simulate(gm, [torch.rand(16, 3, 32, 32)], scales="po2")
    with torch.no_grad():
        ref = sim(x).numpy()
    out = ort.InferenceSession(lower(sim, {}).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    cosine = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    assert cosine.min() >= 0.999, cosine


@pytest.mark.parametrize("size, out", [((1, 1), (6, 6)), ((5, 7), (3, 4)), ((3, 4), (5, 2))])
def test_uneven_adaptive_average_pools_lower_like_torch(size, out):
    """AlexNet at its smallest input pools a 1×1 map to 6×6; other sizes split unevenly (torch's overlapping
    windows): lowered as products with averaging matrices."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(out), nn.Flatten()).eval()
    x = torch.rand(4, 3, *size, generator=torch.Generator().manual_seed(0))
    gm = analyze(capture(model, x[:1]))
    apply_policy(gm, uniform(gm, 32, 32))
    sim = simulate(gm, [x])
    got = ort.InferenceSession(lower(sim, {}).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-6, atol=1e-6)
