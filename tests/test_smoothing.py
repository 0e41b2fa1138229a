"""CERTIFY / PREDICT statistics, measured soundness, metrics and resumable data-set certification."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from linear_models import SHAPE, LinearClassifier, W
from scipy.optimize import brentq
from scipy.stats import beta, binom, binomtest, norm

from arqc.base import ArqcError
from arqc.runtime.backends import TorchBackend
from arqc.runtime.metrics import summarize
from arqc.runtime.noise import Phase, noisy_batches, point_seed
from arqc.runtime.run import CertifyResult, certify_dataset, format_table
from arqc.runtime.smoothing import (
    ABSTAIN,
    certify,
    lower_confidence_bound,
    predict,
    sample_predictions,
    upper_confidence_bound,
)


def point_with_margin(margin: float, rng: np.random.Generator, w: np.ndarray = W) -> np.ndarray:
    """An image x with w·x = margin (plus a random part orthogonal to w)."""
    v = rng.uniform(0, 1, size=w.size)
    v -= (v @ w) / (w @ w) * w
    return (v + margin / (w @ w) * w).reshape(SHAPE).astype(np.float32)


def cp_lower_independent(k: int, n: int, alpha: float) -> float:
    """Clopper–Pearson lower bound by its definition: the p with P(Binomial(n, p) ≥ k) = α (0 when k = 0)."""
    if k == 0:
        return 0.0
    return brentq(lambda p: binom.sf(k - 1, n, p) - alpha, 1e-15, 1 - 1e-15, xtol=1e-15, rtol=1e-14)


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    return TorchBackend(LinearClassifier(), batch_size=1000, device="cpu")


# --- soundness, measured --------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_certified_radius_is_sound_on_a_linear_classifier(backend, alpha):
    sigma, n0, n, num_points = 0.5, 10, 200, 10_000
    rng = np.random.default_rng(1234)
    norm_w = float(np.linalg.norm(W))
    failures = naive_failures = certified = 0
    for i in range(num_points):
        pA = rng.uniform(0.6, 0.999)
        true_class = int(rng.integers(2))
        margin = (1 if true_class == 1 else -1) * sigma * norm_w * norm.ppf(pA)
        true_radius = abs(margin) / norm_w  # = σ Φ⁻¹(pA)
        cert = certify(backend, point_with_margin(margin, rng), sigma, n0, n, alpha, 1000, seed=10**6 * i + 7)
        if cert.prediction != ABSTAIN:
            certified += 1
            failures += cert.prediction != true_class or cert.radius > true_radius
        # negative control: the plug-in estimate nA/n instead of a confidence bound is unsound
        naive_radius = sigma * norm.ppf(min(cert.nA / n, 1 - 1e-12))
        naive_failures += cert.nA / n > 0.5 and (cert.top_class != true_class or naive_radius > true_radius)
    bound = binom.ppf(0.999, num_points, alpha) / num_points
    rate, naive_rate = failures / num_points, naive_failures / num_points
    print(f"\nalpha={alpha}: {failures}/{num_points} unsound certificates "
          f"(rate {rate:.5f}, allowed {bound:.5f}); "
          f"{certified} certified; plug-in estimate fails at rate {naive_rate:.3f}")
    assert certified > num_points // 2
    assert rate <= bound
    assert naive_rate > bound  # the measurement can tell a sound bound from an unsound one


# --- the statistics against independent computations ----------------------------------------------


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (7, 10), (10, 10), (99, 100), (500, 1000), (9990, 10000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_lower_confidence_bound_is_clopper_pearson(k, n, alpha):
    assert lower_confidence_bound(k, n, alpha) == pytest.approx(cp_lower_independent(k, n, alpha), abs=1e-9)
    if 0 < k:
        exact = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
        assert lower_confidence_bound(k, n, alpha) == pytest.approx(exact, abs=1e-9)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (0, 500), (17, 500)])
def test_upper_confidence_bound_is_clopper_pearson(k, n):
    alpha = 0.01
    expected = 1.0 if k == n else brentq(lambda p: binom.cdf(k, n, p) - alpha, 1e-15, 1 - 1e-15, xtol=1e-15)
    assert upper_confidence_bound(k, n, alpha) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("p_true,n", [(0.7, 100), (0.9, 300), (0.99, 1000), (0.999, 200), (0.55, 50)])
def test_radius_is_sigma_times_probit_of_independent_bound(backend, p_true, n):
    sigma, alpha, seed = 0.25, 0.001, 99
    x = point_with_margin(sigma * np.linalg.norm(W) * norm.ppf(p_true), np.random.default_rng(0))
    cert = certify(backend, x, sigma, 20, n, alpha, 64, seed)
    # count nA ourselves on the estimation stream, with the closed-form classifier
    noisy = np.concatenate(list(noisy_batches(x, sigma, n, 1000, seed, Phase.ESTIMATION)))
    predictions = (noisy.reshape(n, -1).astype(np.float64) @ W > 0).astype(int)
    assert cert.nA == int(np.sum(predictions == cert.top_class)) == cert.counts[cert.top_class]
    p_lower = cp_lower_independent(cert.nA, n, alpha)
    assert cert.pA_lower == pytest.approx(p_lower, abs=1e-9)
    if p_lower > 0.5:
        assert cert.prediction == cert.top_class
        assert cert.radius == pytest.approx(sigma * norm.ppf(p_lower), rel=1e-8)
    else:
        assert (cert.prediction, cert.radius) == (ABSTAIN, 0.0)
    assert cert.samples == 20 + n


class PixelArgmax(torch.nn.Module):
    """A 4-class f on 1×2×2 images: the logits are the four pixels, so f(x+ε) = argmax of the noisy pixels,
    exactly (no arithmetic, so a replay in numpy sees the very same float32 values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).clone()


def test_multiclass_certify_takes_the_class_from_the_selection_samples():
    """ĉA is the top class of the n0 selection samples; nA counts THAT class on the n estimation samples.

    Points where two of four classes near-tie make the selection and estimation winners differ at many points;
    both noise streams are replayed here (noisy_batches with the point seed and phase) through the closed-form
    f, so a CERTIFY that took ĉA from the estimation counts (the bias Cohen et al.'s separate n0 avoids) fails.
    """
    sigma, n0, n, alpha, run_seed = 0.25, 25, 400, 0.001, 5
    backend = TorchBackend(PixelArgmax(), batch_size=1000, device="cpu")
    rng = np.random.default_rng(31)
    images = []
    for _ in range(40):  # two classes near-tie at ~0.35 each, the other two ~0.15 each
        x = np.full(4, 0.4)
        x[rng.choice(4, 2, replace=False)] = 0.5 + rng.normal(0, 0.01, 2)
        images.append(x)
    for _ in range(12):  # one class dominates (pA ≈ 0.87): certified with a radius
        x = rng.uniform(0, 0.3, 4)
        x[rng.integers(4)] = 0.9
        images.append(x)
    differ = certified = 0
    top_classes = set()
    for i, image in enumerate(images):
        x, seed = image.reshape(SHAPE).astype(np.float32), point_seed(run_seed, i)
        cert = certify(backend, x, sigma, n0, n, alpha, 64, seed)
        counts = {}
        for phase, num in ((Phase.SELECTION, n0), (Phase.ESTIMATION, n)):
            noisy = np.concatenate(list(noisy_batches(x, sigma, num, 1000, seed, phase)))
            counts[phase] = np.bincount(noisy.reshape(num, -1).argmax(axis=1), minlength=4)
        selection, estimation = counts[Phase.SELECTION], counts[Phase.ESTIMATION]
        selection_top = np.flatnonzero(selection == selection.max())
        estimation_top = np.flatnonzero(estimation == estimation.max())
        assert cert.top_class in selection_top  # the selection winner (any of them on a tie)
        if len(selection_top) == len(estimation_top) == 1 and selection_top[0] != estimation_top[0]:
            differ += 1
        assert np.array_equal(cert.counts, estimation[: len(cert.counts)]) and not estimation[len(cert.counts):].any()
        nA = int(estimation[cert.top_class])
        assert cert.nA == nA
        expected = 0.0 if nA == 0 else float(beta.ppf(alpha, nA, n - nA + 1))  # one-sided Clopper–Pearson
        assert cert.pA_lower == pytest.approx(expected, abs=1e-12)
        if expected > 0.5:
            certified += 1
            assert cert.prediction == cert.top_class
            assert cert.radius == pytest.approx(sigma * norm.ppf(expected), rel=1e-10)
        else:
            assert (cert.prediction, cert.radius) == (ABSTAIN, 0.0)
        assert cert.samples == n0 + n
        top_classes.add(cert.top_class)
    print(f"\nmulti-class CERTIFY: selection and estimation winners differ at {differ}/{len(images)} points; "
          f"{certified} certified; top classes {sorted(top_classes)}")
    assert differ >= 8  # else the test could not tell the selection winner from the estimation winner
    assert certified >= 8 and top_classes == {0, 1, 2, 3}


def test_certify_abstains_when_bound_is_at_most_one_half(backend):
    x = point_with_margin(0.0, np.random.default_rng(3))  # pA = 1/2
    cert = certify(backend, x, 0.5, 10, 200, 0.001, 1000, seed=5)
    assert cert.prediction == ABSTAIN and cert.radius == 0.0 and cert.pA_lower <= 0.5


def test_predict_is_the_two_sided_binomial_test(backend):
    sigma, n, alpha = 0.5, 300, 0.05
    x = point_with_margin(sigma * np.linalg.norm(W) * norm.ppf(0.56), np.random.default_rng(4))
    outcomes = []
    for seed in range(40):
        predictions = sample_predictions(backend, x, sigma, n, 1000, seed, Phase.PREDICTION)
        counts = np.bincount(predictions, minlength=2)
        expected = ABSTAIN if binomtest(int(counts.max()), n, 0.5).pvalue > alpha else int(counts.argmax())
        outcomes.append(predict(backend, x, sigma, n, alpha, 1000, seed))
        assert outcomes[-1] == expected
    assert ABSTAIN in outcomes and 1 in outcomes
    confident = point_with_margin(sigma * np.linalg.norm(W) * norm.ppf(0.99), np.random.default_rng(4))
    assert predict(backend, confident, sigma, n, 0.001, 1000, seed=1) == 1


@pytest.mark.parametrize("args", [dict(sigma=0.0), dict(sigma=-1.0), dict(n0=0), dict(n=0), dict(alpha=0.0),
                                  dict(alpha=1.0)])
def test_invalid_arguments_are_refused(backend, args):
    kwargs = dict(sigma=0.25, n0=10, n=10, alpha=0.01) | args
    with pytest.raises(ArqcError):
        certify(backend, np.zeros(SHAPE, np.float32), batch_size=10, seed=0, **kwargs)


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_by_hand():
    points = [(1, 1, 0.6), (0, 0, 0.2), (1, 0, 0.9), (2, -1, 0.0), (3, 3, 1.3)]  # (label, prediction, radius)
    s = summarize(points, radii=(0.0, 0.25, 0.5, 1.0, 1.5))
    assert s.certified_accuracy == {0.0: 3 / 5, 0.25: 2 / 5, 0.5: 2 / 5, 1.0: 1 / 5, 1.5: 0.0}
    assert s.acr == pytest.approx((0.6 + 0.2 + 1.3) / 5)
    assert s.clean_accuracy == 3 / 5 and s.abstain_rate == 1 / 5 and s.num_points == 5
    with pytest.raises(ArqcError):
        summarize([])


# --- certify_dataset: results, resumability -------------------------------------------------------


def _dataset(num: int = 6, sigma: float = 0.25):
    rng = np.random.default_rng(11)
    p = np.linspace(0.55, 0.999, num)
    margins = sigma * np.linalg.norm(W) * norm.ppf(p) * np.where(np.arange(num) % 2, 1, -1)
    x = torch.from_numpy(np.stack([point_with_margin(m, rng) for m in margins]))
    y = torch.tensor([1 if m > 0 else 0 for m in margins])
    y[0] = 1 - y[0]  # one wrong label
    return x, y, [10 + 3 * i for i in range(num)]


ARGS = dict(sigma=0.25, n0=10, n=100, alpha=0.01, batch_size=64, seed=3, progress=False)


def _without_timing(result: CertifyResult) -> dict:
    data = json.loads(json.dumps(result.to_json()))
    data.pop("time_per_point_s")
    for p in data["points"]:
        p.pop("seconds")
    return data


class Interrupt(Exception):
    pass


class InterruptingBackend(TorchBackend):
    """Raises after a number of predict calls, as if the run were killed."""

    def __init__(self, calls: int) -> None:
        super().__init__(LinearClassifier(), batch_size=1000, device="cpu")
        self.calls = calls

    def predict(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise Interrupt
        return super().predict(x)


def test_certify_dataset_result(backend):
    x, y, ids = _dataset()
    result = certify_dataset(backend, x, y, ids, **ARGS)
    assert result.num_images == 6 and result.backend == "torch"
    assert [p["index"] for p in result.points] == ids
    for p, image, image_id in zip(result.points, x, ids, strict=True):
        cert = certify(backend, image.numpy(), 0.25, 10, 100, 0.01, 64, point_seed(3, image_id))
        assert (p["prediction"], p["radius"], p["pA_lower"], p["samples"], p["path"]) == (
            cert.prediction, cert.radius, cert.pA_lower, 110, "full")
    summary = summarize([(p["label"], p["prediction"], p["radius"]) for p in result.points])
    assert result.certified_accuracy["0.50"] == summary.certified_accuracy[0.5]
    assert result.acr == summary.acr and result.clean_accuracy == result.certified_accuracy["0.00"]
    assert result.samples_per_point == 110
    json.dumps(result.to_json())  # JSON-serializable
    table = format_table(result)
    for text in ("n=100", "n0=10", "alpha=0.01", "sigma=0.25", "images=6", "ACR", "abstain rate", "0.25"):
        assert text in table


def test_subset_gives_the_same_points(backend):
    x, y, ids = _dataset()
    full = certify_dataset(backend, x, y, ids, **ARGS)
    subset = certify_dataset(backend, x[2:4], y[2:4], ids[2:4], **ARGS)
    assert _without_timing(subset)["points"] == _without_timing(full)["points"][2:4]


def test_interrupted_run_resumes_to_the_same_result(backend, tmp_path):
    x, y, ids = _dataset()
    uninterrupted = certify_dataset(backend, x, y, ids, state_path=tmp_path / "a.jsonl", **ARGS)
    state = tmp_path / "b.jsonl"
    with pytest.raises(Interrupt):  # 3 predict calls per point (n0: 1 batch, n: 2 batches): dies in the 4th
        certify_dataset(InterruptingBackend(calls=10), x, y, ids, state_path=state, **ARGS)
    assert len(state.read_text().splitlines()) == 1 + 3
    with open(state, "a") as f:
        f.write('{"index": 19, "lab')  # a line cut off mid-write
    resumed = certify_dataset(backend, x, y, ids, state_path=state, **ARGS)
    assert _without_timing(resumed) == _without_timing(uninterrupted)
    assert len(state.read_text().splitlines()) == 1 + 6
    again = certify_dataset(InterruptingBackend(calls=0), x, y, ids, state_path=state, **ARGS)  # nothing left
    assert _without_timing(again) == _without_timing(uninterrupted)


@pytest.mark.parametrize("change", [dict(sigma=0.5), dict(n=200), dict(n0=20), dict(alpha=0.001),
                                    dict(seed=4)])
def test_resume_with_other_arguments_is_refused(backend, tmp_path, change):
    x, y, ids = _dataset()
    state = tmp_path / "s.jsonl"
    certify_dataset(backend, x[:2], y[:2], ids[:2], state_path=state, **ARGS)
    with pytest.raises(ArqcError, match="state file"):
        certify_dataset(backend, x[:2], y[:2], ids[:2], state_path=state, **(ARGS | change))


def test_resume_with_another_model_or_other_images_is_refused(backend, tmp_path):
    x, y, ids = _dataset()
    state = tmp_path / "s.jsonl"
    certify_dataset(backend, x[:2], y[:2], ids[:2], state_path=state, **ARGS)
    other = TorchBackend(LinearClassifier(W * 1.01), batch_size=1000, device="cpu")
    with pytest.raises(ArqcError, match="backend"):
        certify_dataset(other, x[:2], y[:2], ids[:2], state_path=state, **ARGS)
    with pytest.raises(ArqcError, match="data"):
        certify_dataset(backend, x[1:3], y[1:3], ids[1:3], state_path=state, **ARGS)


def test_more_images_extend_a_state_file_to_the_uninterrupted_result(backend, tmp_path):
    """A run on 2 images, then on 6 whose first 2 are those: the first two points are not computed again, and
    the result equals one run on the 6."""
    x, y, ids = _dataset()
    state = tmp_path / "s.jsonl"
    first = certify_dataset(backend, x[:2], y[:2], ids[:2], state_path=state, **ARGS)
    extended = certify_dataset(InterruptingBackend(calls=3 * 4), x, y, ids, state_path=state, **ARGS)  # 4 points
    whole = certify_dataset(backend, x, y, ids, **ARGS)
    assert _without_timing(extended) == _without_timing(whole)
    assert extended.points[:2] == first.points
    assert json.loads(state.read_text().splitlines()[0])["data"]["num_images"] == len(ids)
    with pytest.raises(ArqcError, match="data"):  # fewer images than the state file: refused, as before
        certify_dataset(backend, x[:2], y[:2], ids[:2], state_path=state, **ARGS)
    certify_dataset(backend, x[:2], y[:2], ids[:2], state_path=tmp_path / "t.jsonl", **ARGS)
    with pytest.raises(ArqcError, match="args"):  # more images, other arguments: refused
        certify_dataset(backend, x, y, ids, state_path=tmp_path / "t.jsonl", **(ARGS | {"seed": 4}))
