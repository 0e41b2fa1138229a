"""Calibration choices, learned step sizes and bias correction (passes/quantize.py): what each calibration picks,
against brute force over clipping bounds; LSQ's gradients against the autograd of the paper's formulation;
learned scales and corrected biases that the lowering exports exactly."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from qnets import NetSpec, SmallNet, build_sim

from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.passes.meta import info, quantizable_nodes
from arqc.passes.policy import apply_policy
from arqc.passes.quantize import (
    CALIBRATIONS,
    TIE_MARGIN,
    TIE_STEP,
    TIE_TRIES,
    Observed,
    QuantLayer,
    Requant,
    act_quant,
    avoid_ties,
    correct_biases,
    fake_quant,
    freeze_scales,
    learn_scales,
    lsq_fake_quant,
    off_ties,
    simulate,
    weight_scale,
)
from arqc.settings import CALIBRATIONS as SETTINGS_CALIBRATIONS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_settings_name_the_same_calibrations():
    assert SETTINGS_CALIBRATIONS == CALIBRATIONS


def _weight_error(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared quantization error per output channel."""
    qmax = 2 ** (bits - 1) - 1
    return ((torch.round(w / scale).clamp(-qmax, qmax) * scale - w) ** 2).flatten(1).sum(1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_weight_scales_are_near_the_best_bound_and_clip_gaussian_tails(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 6, 3, 3, generator=g)
    w[0, 0, 0, 0] = 25.0  # an outlier: at 2 bits it is worth keeping, at 8 it costs little
    w[1] = torch.randn(6, 3, 3, generator=g) * torch.rand(6, 3, 3, generator=g)  # mixed magnitudes
    minmax, mse = weight_scale(w, bits), weight_scale(w, bits, calibration="mse")
    assert (_weight_error(w, mse, bits) <= _weight_error(w, minmax, bits)).all()
    # brute force over 2,000 bounds between 1 % and 100 % of max|w_c|, per channel
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().flatten(1).amax(1)
    best = torch.stack([_weight_error(w, (amax * r / qmax).reshape(-1, 1, 1, 1), bits)
                        for r in np.linspace(0.01, 1.0, 2000)]).amin(0)
    assert (_weight_error(w, mse, bits) <= 1.02 * best + 1e-6).all()
    # many Gaussian weights per channel: at 3-4 bits the best bound lies well inside the max (about 2-2.5 std)
    wide = torch.randn(3, 4096, generator=g)
    if bits in (3, 4):
        assert (weight_scale(wide, bits, calibration="mse") < 0.8 * weight_scale(wide, bits)).all()


def test_percentile_weight_scales_ignore_a_rare_outlier():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(2, 50_000, generator=g) * 2 - 1
    w[0, 7] = 40.0
    scale = weight_scale(w, 4, calibration="percentile").flatten()
    assert scale[0] * 7 < 1.01 and abs(float(scale[1] * 7) - 1) < 0.01


def test_observations_keep_exact_ends_and_a_bounded_reproducible_sample():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(64, 8, 16, 16, generator=g) for _ in range(6)]
    seen, again = None, None
    for b in batches:
        seen, again = Observed.of(b, seen), Observed.of(b, again)
    everything = torch.cat([b.flatten() for b in batches])
    assert (seen.lo, seen.hi) == (float(everything.min()), float(everything.max()))
    assert len(seen.sample) <= 1 << 16 and torch.equal(seen.sample, again.sample)


def _act_error(x: torch.Tensor, lo: float, hi: float, bits: int, signed: bool) -> float:
    a = act_quant(lo, hi, bits, signed)
    return float(((fake_quant(x, a.scale, a.zero_point, a.qmin, a.qmax) - x) ** 2).sum())


@pytest.mark.parametrize("signed", [False, True])
def test_activation_calibrations_against_brute_force(signed):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40_000, generator=g).abs() if not signed else torch.randn(40_000, generator=g)
    x[5] = 30.0  # a rare outlier stretches min/max
    seen = Observed.of(x)
    lo, hi = seen.clip(3, signed, "minmax")
    assert (lo, hi) == ((float(x.min()) if signed else 0.0), 30.0)
    p_lo, p_hi = seen.clip(3, signed, "percentile")
    assert p_hi < 5 and (p_lo > -5 if signed else p_lo == 0)
    m_lo, m_hi = seen.clip(3, signed, "mse")
    best = min(_act_error(x, lo * r, hi * r, 3, signed) for r in np.linspace(0.01, 1.0, 1000))
    assert _act_error(x, m_lo, m_hi, 3, signed) <= 1.02 * best
    assert _act_error(x, m_lo, m_hi, 3, signed) < _act_error(x, lo, hi, 3, signed) / 2


@pytest.mark.parametrize("shape", [(), (4, 1, 1, 1)])
def test_lsq_gradients_are_the_papers(shape):
    """The oracle: autograd of x̂ = (round_pass(clamp(x/s + z, qmin, qmax)) - z) · s with the step size's
    gradient scaled by g = 1/sqrt(N · qmax) (Esser et al. 2020, round_pass = round forward, identity backward)."""
    g = torch.Generator().manual_seed(4)
    x, w = 2 * torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    z, qmin, qmax, per = 3, -8, 7, 75
    s = torch.full(shape, 0.3, requires_grad=True)
    x1 = x.clone().requires_grad_(True)
    y = lsq_fake_quant(x1, s, z, qmin, qmax, per)
    (y * w).sum().backward()

    s_ref, x_ref = torch.full(shape, 0.3, requires_grad=True), x.clone().requires_grad_(True)
    factor = 1 / math.sqrt(per * qmax)
    scaled = (s_ref - s_ref * factor).detach() + s_ref * factor
    c = torch.clamp(x_ref / scaled + z, qmin, qmax)
    y_ref = ((c.round() - c).detach() + c - z) * scaled
    (y_ref * w).sum().backward()
    assert torch.equal(y, fake_quant(x, torch.full(shape, 0.3), z, qmin, qmax))  # the same forward
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-4) and torch.allclose(x1.grad, x_ref.grad, atol=1e-5)
    assert s.grad.abs().min() > 0


def _trained_sim(steps: int = 30) -> tuple[torch.fx.GraphModule, torch.Tensor, dict, list]:
    """A small residual net at 3-4 bits, its scales learned for ``steps`` SGD steps on a toy task."""
    spec = NetSpec(shape=(3, 8, 8), width=6, hidden=16, classes=4, residual=True, pool="avg")
    sim = build_sim(spec, policy_seed=5, bits=(3, 4))
    before = {name: m.act.scale for name, m in sim.named_modules() if isinstance(m, Requant)}
    params = learn_scales(sim)
    opt = torch.optim.SGD(params, lr=0.05)
    g = torch.Generator().manual_seed(6)
    x = torch.rand(64, 3, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) * 8).long() % 4
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(sim(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sim, x, before, params


def test_learned_scales_move_and_freeze_into_the_same_function():
    sim, x, before, params = _trained_sim()
    assert params and all(p.grad is not None for p in params)
    with torch.no_grad():
        learned = sim(x)
    freeze_scales(sim)
    assert not any("learned" in name for name, _ in sim.named_parameters())
    with torch.no_grad():
        assert torch.equal(sim(x), learned)
    after = {name: m.act.scale for name, m in sim.named_modules() if isinstance(m, Requant)}
    assert any(after[k] != before[k] for k in before)
    layers = [m for m in sim.modules() if isinstance(m, QuantLayer) and m.act is not None]
    assert all(m.act.method.endswith("lsq") or m.grid_input for m in layers)
    assert all(m.fixed_weight_scale is not None for m in sim.modules() if isinstance(m, QuantLayer))


def test_learned_scales_lower_exactly():
    """The ONNX model of a simulation with learned scales computes that simulation (float scales: equal up to
    float rounding, the tolerance of tests/test_lower.py's float-scale check on the QDQ graph as written)."""
    sim, x, _, _ = _trained_sim()
    freeze_scales(sim)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(lower(sim).SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = sim(x).numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_learned_scales_refuse_po2():
    spec = NetSpec(shape=(3, 8, 8), width=4, hidden=8, classes=3, residual=False, pool=None)
    with pytest.raises(ValueError, match="po2"):
        learn_scales(build_sim(spec, policy_seed=1, scales="po2"))


def _channel_mean(model: torch.nn.Module, target: str, x: torch.Tensor) -> torch.Tensor:
    out = {}
    handle = model.get_submodule(target).register_forward_hook(lambda m, i, o: out.setdefault("y", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    y = out["y"]
    return y.transpose(0, 1).flatten(1).double().mean(1) if y.dim() > 2 else y.double().mean(0)


def test_bias_correction_matches_the_float_means_and_lowers_exactly():
    spec = NetSpec(shape=(3, 8, 8), width=6, hidden=16, classes=4, residual=True, pool="avg")
    gm = analyze(capture(SmallNet(spec).eval(), torch.zeros(1, 3, 8, 8)))
    apply_policy(gm, {info(n).layer: (3, 3) for n in quantizable_nodes(gm)})
    g = torch.Generator().manual_seed(7)
    calib = torch.rand(128, 3, 8, 8, generator=g)
    sim = simulate(gm, [calib], scales="po2")
    targets = [n.target for n in quantizable_nodes(sim)]
    before = [float((_channel_mean(sim, t, calib) - _channel_mean(gm, t, calib)).abs().max()) for t in targets]
    correct_biases(sim, gm, [calib[:64], calib[64:]])
    after = [float((_channel_mean(sim, t, calib) - _channel_mean(gm, t, calib)).abs().max()) for t in targets]
    # every layer's mean output per channel now is the float model's, up to half a step of the int32 bias grid
    # (s_x · s_w, coarse at 3 bits with po2 scales)
    grid = [float(sim.get_submodule(t).bias_scale().max()) for t in targets]
    assert max(before) > 1e-2 and sum(after) < sum(before) / 2, (before, after)
    assert all(a <= g / 2 + 1e-6 for a, g in zip(after, grid, strict=True)), (after, grid)
    x = torch.rand(32, 3, 8, 8, generator=g)
    session = ort.InferenceSession(lower(sim).SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.array_equal(session.run(None, {"input": x.numpy()})[0], sim(x).numpy())


def _tie_distances(x: torch.Tensor, scale: float) -> np.ndarray:
    """|x/s - (nearest half-integer)| in float64: the oracle for how close each value is to a rounding tie."""
    v = x.double().numpy() / scale
    return np.abs(v - np.floor(v) - 0.5)


def test_scales_move_off_exact_ties_and_only_then():
    """Values on a lattice (integers times one scale, as an integer layer's outputs are) with min/max: the maximum,
    254 units, maps to the last code 255, so 127 units map to 127.5, a tie in exact arithmetic. off_ties moves
    the scale by the fewest TIE_STEPs that leave no value within TIE_MARGIN of a tie, and leaves a tie-free scale
    alone."""
    gen = torch.Generator().manual_seed(0)
    unit = 0.0123
    lattice = unit * torch.randint(0, 255, (5000,), generator=gen).float()  # integers times one scale
    hi = unit * 254
    x = torch.cat([lattice, torch.tensor([hi])])
    act = act_quant(0.0, float(x.max()), 8, False)
    before = _tie_distances(x, act.scale)
    assert (before < TIE_MARGIN).sum() >= 5  # the draws of 127 units
    moved = off_ties(x, act)
    after = _tie_distances(x, moved.scale)
    assert after.min() >= TIE_MARGIN
    assert moved.scale != act.scale and abs(moved.scale / act.scale - 1) <= TIE_TRIES * TIE_STEP + 1e-9
    assert np.float32(moved.scale) == moved.scale  # a float32 scale, as the ONNX file stores it
    assert (moved.zero_point, moved.qmin, moved.qmax) == (act.zero_point, act.qmin, act.qmax)
    assert moved.method == "minmax, off ties"
    generic = torch.rand(5000, generator=gen) * hi
    plain = act_quant(0.0, float(generic.max()), 8, False)
    if _tie_distances(generic, plain.scale).min() >= TIE_MARGIN:
        assert off_ties(generic, plain) is plain


def test_avoid_ties_leaves_no_computed_value_on_a_tie():
    """On a calibrated float-scale network, every rounding step (input quantizers and requant nodes) sees its
    inputs, as computed with the moved scales before it, at least TIE_MARGIN from a tie, and the grid-input
    layers read their grid's moved scale."""
    torch.manual_seed(0)
    spec = NetSpec((3, 8, 8), width=4)
    sim = build_sim(spec, policy_seed=0, bits=(4, 8))
    x = torch.rand(64, *spec.shape)
    avoid_ties(sim, x)
    seen = {}
    quantizers = [m for m in sim.modules() if isinstance(m, QuantLayer | Requant) and m.act is not None]
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen.setdefault(m, inp[0].detach())) for m in quantizers]
    with torch.no_grad():
        sim(x)
    for h in hooks:
        h.remove()
    for m, inp in seen.items():
        if isinstance(m, QuantLayer) and m.grid_input:
            assert m.act is sim.get_submodule(m.grid_source).act
            continue
        a = m.act
        v = inp.double().numpy() / a.scale
        inside = (np.round(v) + a.zero_point >= a.qmin) & (np.round(v) + a.zero_point <= a.qmax)
        assert _tie_distances(inp, a.scale)[inside].min() >= TIE_MARGIN * 0.99, type(m).__name__
