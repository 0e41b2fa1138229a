"""The complete verifier against brute-force enumeration, its oracle, and the certify report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from qnets import NetSpec, SmallNet, brute_force_robust, build_sim, grid_points, shift_margin

from arqc.base import ArqcError
from arqc.certify_linf import certify_ibp, format_linf_report
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.runtime.ibp import ieee_float32
from arqc.runtime.verify import grid_box, verify_complete

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPES = [(1, 2, 2), (1, 1, 5), (1, 2, 3), (2, 2, 2), (1, 3, 3), (1, 2, 5), (2, 2, 3), (1, 3, 4), (3, 2, 2)]


def mnist_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A grid image with some black and some white pixels (the box is clipped there)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, shape, generator=g)
    k = torch.where(torch.rand(shape, generator=g) < 0.25, 0, k)
    k = torch.where(torch.rand(shape, generator=g) < 0.1, 255, k)
    return k.float() / 255


def case(shape, seed, radius, closeness):
    """A random quantized net and a grid image whose top class is robust iff ``closeness`` > 0."""
    spec = NetSpec(shape, residual=seed % 2 == 0, pool=("max", "avg", None)[seed % 3], seed=seed, gain=20)
    sim = build_sim(spec, seed, bits=(3, 4, 6, 8, 32))
    x = mnist_like(shape, seed)
    label = shift_margin(sim, x, *grid_box(x, radius / 255), closeness)
    return sim, x, label


@settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16), radius=st.integers(1, 2),
       closeness=st.sampled_from([-0.5, -0.2, -0.05, 0.05, 0.2, 0.5]), attack_steps=st.sampled_from([0, 10]))
def test_complete_verifier_agrees_with_brute_force(shape, seed, radius, closeness, attack_steps):
    if math.prod(shape) > 7:
        radius = 1  # at most 3^12 grid points to enumerate
    sim, x, label = case(shape, seed, radius, closeness)
    epsilon = radius / 255
    verdict = verify_complete(sim, x, label, epsilon, timeout=60, attack_steps=attack_steps, batch_size=64)
    k_lo, k_hi = grid_box(x, epsilon)
    robust = brute_force_robust(sim, k_lo, k_hi, label, shape)
    assert verdict.status == ("verified" if robust else "falsified")
    if not robust:
        ce = verdict.counterexample
        k = torch.round(ce.flatten() * 255).long()
        assert torch.equal(ce.flatten(), k.float() / 255)  # on the grid
        assert ((k >= k_lo) & (k <= k_hi)).all()  # in the box
        assert int(sim(ce[None]).argmax()) != label  # misclassified


def _splitting_case():
    """A case the verifier can only decide by splitting (IBP fails on the whole box, no attack)."""
    for seed in range(50):
        sim, x, label = case((1, 2, 3), seed, 2, 0.1)
        v = verify_complete(sim, x, label, 2 / 255, timeout=60, attack_steps=0)
        if v.subboxes > 20:
            return sim, x, label, v
    raise AssertionError("no case needs splitting")


def test_verifier_splits_and_respects_the_timeout():
    sim, x, label, v = _splitting_case()
    assert v.margin_lower <= 0 and v.status in ("verified", "falsified")
    quick = verify_complete(sim, x, label, 2 / 255, timeout=1e-9, attack_steps=0)
    assert quick.status == "timeout" and quick.counterexample is None


def test_counterexamples_are_confirmed_by_the_oracle():
    falsified = None
    for seed in range(40):
        sim, x, label = case((1, 2, 3), seed, 2, -0.2)
        v = verify_complete(sim, x, label, 2 / 255, timeout=60)
        if v.status == "falsified":
            falsified = (sim, x, label)
            break
    assert falsified is not None
    sim, x, label = falsified
    # an oracle that disagrees with the simulation everywhere: no counterexample may be reported,
    # and grid points are judged by it, so the box ends verified
    never_wrong = lambda images: torch.full((len(images),), label)
    v = verify_complete(sim, x, label, 2 / 255, timeout=60, oracle=never_wrong)
    assert v.status == "verified" and v.counterexample is None
    # the ONNX model of the same network confirms the simulation's counterexample
    v = verify_complete(sim, x, label, 2 / 255, timeout=60, oracle=_onnx_oracle(sim))
    assert v.status == "falsified"
    assert int(sim(v.counterexample[None]).argmax()) != label


def _onnx_oracle(sim):
    from arqc.runtime.verify import onnx_oracle

    return onnx_oracle(lower(sim))


def test_image_off_the_grid_is_refused():
    sim, x, label = case((1, 2, 2), 0, 1, 0.5)
    with pytest.raises(ArqcError, match="8-bit grid"):
        verify_complete(sim, x + 1e-3, label, 1 / 255, timeout=1)


def test_certify_report(tmp_path):
    spec = NetSpec((1, 2, 3), seed=1)
    sim = build_sim(spec, 1, bits=(4, 8))
    x = torch.stack([mnist_like((1, 2, 3), s) for s in range(12)])
    with torch.no_grad():
        y = sim(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # one clean misclassification
    ibp = certify_ibp(sim, (x, y), 2 / 255, device="cpu")
    full = certify_ibp(sim, (x, y), 2 / 255, complete=True, timeout=30, onnx_model=lower(sim), device="cpu")
    for report in (ibp, full):
        json.loads(json.dumps(report))
        assert report["epsilon"] == 2 / 255 and report["num_images"] == 12
        assert report["clean_accuracy"] == pytest.approx(11 / 12)
        assert report["verified"] + report["falsified"] + report["timeouts"] + report["unknown"] == 12
        assert report["verified_accuracy"] == report["verified"] / 12
        point = report["points"][0]
        assert set(point) >= {"index", "label", "status", "margin_lower"} and point["status"] == "falsified"
        for p in report["points"]:
            assert p["status"] != "verified" or p["margin_lower"] > 0 or report is full
        assert f"{100 * report['verified_accuracy']:.2f}%" in format_linf_report(report)
    assert full["unknown"] == 0 and full["judge"] == "onnxruntime"
    assert full["verified"] >= ibp["verified"] and full["ibp_verified_accuracy"] == ibp["verified_accuracy"]
    for p, q in zip(ibp["points"], full["points"], strict=True):  # the complete verifier decides every point
        assert q["status"] in ("verified", "falsified")
        k_lo, k_hi = grid_box(x[p["index"]], 2 / 255)
        assert (q["status"] == "verified") == brute_force_robust(sim, k_lo, k_hi, p["label"], (1, 2, 3)) \
            or p["index"] == 0


def test_certify_refuses_bad_input():
    sim = build_sim(NetSpec((1, 2, 2), seed=0), 0, bits=(4,))
    x, y = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    for eps in (-1 / 255, 1.01):
        with pytest.raises(ArqcError, match="outside \\[0, 1\\]"):
            certify_ibp(sim, (x, y), eps)
    float_gm = analyze(capture(SmallNet(NetSpec((1, 2, 2))).eval(), torch.zeros(1, 1, 2, 2)))
    with pytest.raises(ArqcError, match="--complete needs a quantized model"):
        certify_ibp(float_gm, (x, y), 1 / 255, complete=True)
    assert certify_ibp(float_gm, (x, y), 1 / 255)["num_images"] == 2  # plain IBP works on float graphs
    with pytest.raises(ArqcError, match="8-bit grid"):
        certify_ibp(sim, (x + 0.001, y), 1 / 255, complete=True)


GPU = "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("shape, seed, closeness", [  # on the CPU: 4 verified (3 by splitting), 3 falsified
    ((1, 2, 3), 0, 0.2), ((1, 2, 3), 4, -0.5), ((2, 2, 2), 0, -0.5), ((1, 2, 5), 4, 0.5),
    ((1, 2, 3), 7, -0.2), ((2, 2, 2), 4, -0.2), ((1, 3, 3), 7, -0.5)])
def test_complete_verifier_on_the_gpu_agrees_with_the_gpus_own_brute_force(shape, seed, closeness):
    """With the simulation on the GPU (bounds, attack and enumeration all run there), the verdict agrees with
    every grid point of the box judged by the GPU's own forward (IEEE float32, as the verifier's judge runs
    it), and a counterexample is one the GPU misclassifies."""
    sim, x, label = case(shape, seed, 1, closeness)
    sim = sim.to(GPU)
    verdict = verify_complete(sim, x, label, 1 / 255, timeout=60, batch_size=64)
    k_lo, k_hi = grid_box(x, 1 / 255)
    points = (grid_points(k_lo, k_hi).float() / 255).reshape(-1, *shape).to(GPU)
    with torch.no_grad(), ieee_float32():
        z = sim(points)
        assert z.device.type == torch.device(GPU).type
        robust = bool((z.argmax(1) == label).all())
        assert verdict.status == ("verified" if robust else "falsified")
        if not robust:
            assert int(sim(verdict.counterexample[None].to(GPU)).argmax()) != label
