"""Attention and the rearrangements around it: the matmul layer of two activations (passes/ops/layers.py), capture
of torch.matmul / @ / einsum / nn.MultiheadAttention, select, roll, a constant expanded over the batch, constant
folding, Swin's window attention rewritten with the batch in front (passes/rewrites.py), L2 normalization, and the
greedy baseline's in-place probes (passes/quantize.py: one_layer_quantized).

Oracles: the float32 forward of torch on many points of each box (interval rules), the original torch module
(capture computes what the model computes), onnxruntime (lowering, and which integer kernels it runs), and
simulate() itself for the in-place probes.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import swin_transformer

from arqc.base import ArqcError
from arqc.passes import ops
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.passes.meta import info, quantizable_nodes
from arqc.passes.policy import apply_policy, uniform
from arqc.passes.quantize import observed_ranges, one_layer_quantized, simulate
from arqc.passes.search.budget import layer_specs
from arqc.runtime.ibp import input_box, interval_bounds

pytestmark = pytest.mark.usefixtures("one_thread")


def random_box(shape, rng, scale=1.0):
    centre = rng.normal(0, scale, shape)
    width = 10.0 ** rng.uniform(-6, 0.3, shape) * rng.uniform(0, 1, shape) * scale
    return torch.tensor(centre - width / 2), torch.tensor(centre + width / 2)


def points_of(lo, hi, count, rng):
    """``count`` float32 points of the box [lo, hi], corners among them."""
    t = torch.tensor(rng.uniform(0, 1, (count, *lo.shape)))
    t[: count // 4] = (t[: count // 4] > 0.5).double()
    return (lo + (hi - lo) * t).float()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matmul_bounds_contain_the_float32_product_and_are_tight(dtype):
    rng = np.random.default_rng(0)
    a_lo, a_hi = random_box((2, 3, 5, 7), rng)
    b_lo, b_hi = random_box((2, 3, 7, 4), rng, scale=3.0)
    lo, hi = ops.layers._matmul_interval(a_lo.to(dtype), a_hi.to(dtype), b_lo.to(dtype), b_hi.to(dtype), True)
    a, b = points_of(a_lo, a_hi, 400, rng), points_of(b_lo, b_hi, 400, rng)
    products = torch.matmul(a, b).double()
    assert bool((products >= lo.double()).all()) and bool((products <= hi.double()).all())
    # tight: for each output, the product's exact range is reached by choosing every term's corner; the bound
    # exceeds it by at most 2·Σ_k Ar·Br (the centre/radius form's slack, where the corner signs disagree) and the
    # rounding margin
    exact_hi = torch.maximum(torch.maximum(a_lo[..., :, :, None] * b_lo[..., None, :, :],
                                           a_lo[..., :, :, None] * b_hi[..., None, :, :]),
                             torch.maximum(a_hi[..., :, :, None] * b_lo[..., None, :, :],
                                           a_hi[..., :, :, None] * b_hi[..., None, :, :])).sum(-2)
    slack = 2 * torch.matmul((a_hi - a_lo) / 2, (b_hi - b_lo) / 2)
    assert bool((hi.double() <= exact_hi + slack + 1e-4).all())


def test_matmul_bounds_need_the_product_of_radii():
    """Without the Ar·Br term the bound misses products of two wide operands (the oracle can fail)."""
    a_lo, a_hi = torch.tensor([[[-1.0, -1.0]]]).double(), torch.tensor([[[1.0, 1.0]]]).double()
    b_lo, b_hi = torch.tensor([[[-1.0], [-1.0]]]).double(), torch.tensor([[[1.0], [1.0]]]).double()
    lo, hi = ops.layers._matmul_interval(a_lo, a_hi, b_lo, b_hi, True)
    assert float(hi) >= 2.0 and float(lo) <= -2.0  # a = b = (1, 1) gives 2; the centres are 0
    a_c, b_r = (a_hi + a_lo) / 2, (b_hi - b_lo) / 2
    without = torch.matmul(a_c.abs(), b_r) + torch.matmul((a_hi - a_lo) / 2, b_c_abs := ((b_hi + b_lo) / 2).abs())
    assert float(without) < 2.0 and b_c_abs.sum() == 0


class Attention(nn.Module):
    """Tokens from a conv, a class token expanded over the batch, q·kᵀ as an einsum, softmax, @ v, a product with
    a constant matrix (a linear layer), the class token selected."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, 4)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.w = nn.Parameter(torch.randn(16, 8) / 4)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        scores = torch.einsum("bid,bjd->bij", self.q(x), self.k(x)) * 0.25
        y = torch.matmul(F.softmax(scores, dim=-1), self.v(x)) + x
        y = torch.roll(y, shifts=1, dims=2) @ self.w
        return self.fc(torch.relu(y[:, 0]))


def _ort(model: onnx.ModelProto, x: np.ndarray, optimized: str | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


def test_attention_captures_as_matmul_layers_lowers_to_integer_kernels_and_bounds(tmp_path):
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    gm = analyze(capture(model, x[:1]))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    layers = {info(n).layer: info(n) for n in quantizable_nodes(gm)}
    matmuls = [m for m in layers.values() if m.kind == "matmul"]
    assert len(matmuls) == 2 and sorted(m.macs for m in matmuls) == [17 * 17 * 16] * 2
    assert layers["matmul_1"].kind == "linear"  # y @ W with W a parameter
    kinds = {info(n).kind for n in gm.graph.nodes}
    assert {"expand", "select", "roll", "softmax", "cat"} <= kinds
    specs = {s.name: s for s in layer_specs(gm)}  # the search's state for a matmul layer
    assert specs[matmuls[0].layer].weights == 0 and specs[matmuls[0].layer].in_size == 17
    for bits in ((8, 8), (4, 6)):
        apply_policy(gm, uniform(gm, *bits))
        sim = simulate(gm, [torch.rand(8, 3, 16, 16)])
        with torch.no_grad():
            ref = sim(x).numpy()
        out = _ort(lower(sim, {}), x.numpy(), str(tmp_path / "opt.onnx"))
        cosine = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
        assert cosine.min() >= 0.9999, cosine
        fused = collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
        assert fused["QLinearMatMul"] >= 2, fused  # both matmul layers run on integers
        lo, hi = input_box(x[:4], 2 / 255)
        b_lo, b_hi = interval_bounds(sim, lo, hi)
        for _ in range(20):
            with torch.no_grad():
                y = sim(lo + (hi - lo) * torch.rand_like(lo))
            assert bool(((y >= b_lo) & (y <= b_hi)).all())


class SelfAttention(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (B, 16 positions of a 4×4 grid, 16 channels)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.fc(out.mean(1))


def test_multihead_attention_becomes_its_layers_and_computes_the_same_function():
    torch.manual_seed(0)
    model = SelfAttention().eval()
    x = torch.rand(8, 16, 4, 4)
    gm = analyze(capture(model, x[:1]))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    layers = [info(n).layer for n in quantizable_nodes(gm)]
    assert layers == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.scores", "attn.context", "attn.out_proj",
                      "fc"]


def test_attention_that_arqc_cannot_expand_is_one_line():
    for model in (SelfAttention(batch_first=False).eval(),):
        with pytest.raises(ArqcError, match="batch_first=False, masks") as caught:
            capture(model, torch.rand(1, 16, 4, 4))
        assert "\n" not in str(caught.value)


def test_einsum_that_is_no_matmul_is_refused():
    class Outer(nn.Module):
        def forward(self, x):
            t = x.flatten(2)
            return torch.einsum("bi,bj->bij", t[:, 0], t[:, 1]).flatten(1)

    with pytest.raises(ArqcError, match="unsupported einsum 'bi,bj->bij'"):
        capture(Outer().eval(), torch.rand(1, 2, 2, 2))


def _swin(v2: bool) -> nn.Module:
    """A small Swin (V1 or V2) for 32×32 inputs: 8×8 tokens, windows of 4 (shifted in every second block), one
    patch merging."""
    torch.manual_seed(0)
    extra = dict(block=swin_transformer.SwinTransformerBlockV2,
                 downsample_layer=swin_transformer.PatchMergingV2) if v2 else {}
    return swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                            window_size=[4, 4], num_classes=10, **extra).eval()


@pytest.mark.parametrize("v2", [False, True], ids=["swin_v1", "swin_v2"])
def test_swin_window_attention_rewrite_computes_torchvisions_function(v2, tmp_path):
    model = _swin(v2)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gm = analyze(capture(model, x[:1]))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)  # masks, rolls, relative position bias
    kinds = collections.Counter(info(n).kind for n in gm.graph.nodes)
    # roll: the shifted block of stage 1 (stage 2 is one window); normalize: V2's cosine attention
    assert kinds["roll"] == 2 and kinds["matmul"] == 8 and (kinds["normalize"] == 8) == v2
    assert all("cpb_mlp" not in (info(n).layer or "") for n in quantizable_nodes(gm))  # folded: a constant
    # every tensor keeps its batch in front: the graph runs at another batch size
    assert gm(x[:3]).shape == (3, 10)
    apply_policy(gm, uniform(gm, 8, 8))
    sim = simulate(gm, [torch.rand(16, 3, 32, 32)])
    with torch.no_grad():
        ref = sim(x).numpy()
    out = _ort(lower(sim, {}), x.numpy())
    cosine = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    assert cosine.min() >= 0.999, cosine
    lo, hi = input_box(x[:2], 1 / 255)
    b_lo, b_hi = interval_bounds(sim, lo, hi)
    for _ in range(10):
        with torch.no_grad():
            y = sim(lo + (hi - lo) * torch.rand_like(lo))
        assert bool(((y >= b_lo) & (y <= b_hi)).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalize_bounds_contain_the_float32_forward(dtype):
    rng = np.random.default_rng(3)
    rule = ops.RULES["normalize"]

    class Node:
        args = (None, 2, 1e-12)

    for scale in (1e-3, 1.0, 100.0):
        lo, hi = random_box((4, 3, 6), rng, scale)
        lo[0, 0] = hi[0, 0] = 0.0  # a row through zero and a degenerate box
        b_lo, b_hi = rule.interval(Node, None, [lo.to(dtype)], [hi.to(dtype)], sound=True)
        values = F.normalize(points_of(lo, hi, 500, rng), dim=-1).double()
        assert bool((values >= b_lo.double()).all()) and bool((values <= b_hi.double()).all())
        reached_lo, reached_hi = values.min(0).values, values.max(0).values
        assert bool((b_hi.double() - b_lo.double() <= reached_hi - reached_lo + 0.2 + 1e-5).all())


def test_greedy_probes_in_place_equal_a_simulation_of_the_one_layer_policy():
    torch.manual_seed(0)
    gm = analyze(capture(Attention().eval(), torch.rand(1, 3, 16, 16)))
    names = [info(n).layer for n in quantizable_nodes(gm)]
    apply_policy(gm, {name: (32, 8) for name in names})
    ranges = observed_ranges(simulate(gm, [torch.rand(8, 3, 16, 16)]))
    apply_policy(gm, {name: (32, 32) for name in names})
    probe = simulate(gm, [], ranges=ranges)
    x = torch.rand(4, 3, 16, 16)
    for name in names:
        for w, a in ((3, 32), (32, 3), (8, 32), (32, 5)):
            apply_policy(gm, {other: (32, 32) for other in names} | {name: (w, a)})
            with torch.no_grad():
                expected = simulate(gm, [], ranges=ranges)(x)
                with one_layer_quantized(probe, name, w, a, ranges):
                    got = probe(x)
            assert torch.equal(got, expected), (name, w, a)
            with torch.no_grad():
                assert torch.equal(probe(x), simulate(apply_policy(gm, {n: (32, 32) for n in names}), [],
                                                      ranges=ranges)(x))  # restored
