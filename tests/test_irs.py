"""Incremental randomized smoothing: ζ, radii, paths, measured soundness and the cache file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gaussian_oracles import bivariate_normal_cdf, disagreement_probability, standardized_margin, weights_of
from linear_models import SHAPE, LinearClassifier, W
from scipy.optimize import brentq
from scipy.stats import binom, multivariate_normal, norm

from arqc.base import ArqcError
from arqc.runtime.backends import TorchBackend
from arqc.runtime.irs import build_cache, certify_incremental
from arqc.runtime.irs_cache import load_cache
from arqc.runtime.noise import Phase, noisy_batches
from arqc.runtime.run import certify_dataset, format_table
from arqc.runtime.smoothing import ABSTAIN, certify

SIGMA, N0, N, ALPHA = 0.5, 10, 1000, 0.001


def backend_of(w: np.ndarray = W, b: float = 0.0) -> TorchBackend:
    return TorchBackend(LinearClassifier(w, b), batch_size=2000, device="cpu")


def point_with_probability(p: float, rng: np.random.Generator, sigma: float = SIGMA) -> np.ndarray:
    """An image x whose smoothed f puts probability p on class 1 (p < 1/2: on class 0)."""
    v = rng.uniform(0, 1, size=W.size)
    v -= (v @ W) / (W @ W) * W
    margin = sigma * np.linalg.norm(W) * norm.ppf(p)
    return (v + margin / (W @ W) * W).reshape(SHAPE).astype(np.float32)


def cp_upper_independent(k: int, n: int, alpha: float) -> float:
    """Clopper–Pearson upper bound by its definition: the p with P(Binomial(n, p) ≤ k) = α (1 when k = n)."""
    if k == n:
        return 1.0
    return brentq(lambda p: binom.cdf(k, n, p) - alpha, 1e-15, 1 - 1e-15, xtol=1e-15, rtol=1e-14)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.stack([point_with_probability(p, rng) for p in (0.9, 0.15, 0.97, 0.8, 1 - 1e-9)])


@pytest.fixture(scope="module")
def cache(images):
    labels = np.array([1, 0, 1, 1, 1])
    return build_cache(backend_of(), images, labels, [0, 1, 2, 3, 4], sigma=SIGMA, n0=N0, n=N, alpha=ALPHA,
                       batch_size=500, seed=21)


def test_cache_holds_f_certificates(cache, images):
    f = backend_of()
    for point, image in zip(cache.points, images, strict=True):
        cert = certify(f, image, SIGMA, N0, N, ALPHA, 500, point.seed, keep_predictions=True)
        assert (point.top_class, point.pA_lower, point.radius) == (cert.top_class, cert.pA_lower, cert.radius)
        assert np.array_equal(point.predictions, cert.predictions) and len(point.predictions) == N
    assert cache.points[4].pA_lower >= 0.99 > max(p.pA_lower for p in cache.points[:4])


def test_same_network_gives_the_zeta_floor(cache, images):
    n_prime, alpha_zeta = 400, 0.01
    for i in range(4):
        point = cache.points[i]
        cert = certify_incremental(backend_of(), images[i], point, sigma=SIGMA, alpha=ALPHA, n_prime=n_prime,
                                   alpha_zeta=alpha_zeta)
        floor = 1 - alpha_zeta ** (1 / n_prime)  # Clopper–Pearson upper bound of 0 disagreements in n'
        assert cert.path == "irs" and cert.disagreements == 0 and cert.samples == n_prime
        assert cert.zeta == pytest.approx(floor, rel=1e-10)
        assert cert.pA_lower == pytest.approx(point.pA_lower - floor, rel=1e-12)
        assert cert.prediction == point.top_class
        assert cert.radius == pytest.approx(SIGMA * norm.ppf(point.pA_lower - floor), rel=1e-10)


def test_perturbed_network_disagrees_and_never_gains_radius(cache, images):
    w_q = W + np.random.default_rng(3).normal(0, 0.15, W.size)
    n_prime = 1000
    for i in range(4):
        point = cache.points[i]
        cert = certify_incremental(backend_of(w_q), images[i], point, sigma=SIGMA, alpha=ALPHA,
                                   n_prime=n_prime)
        noisy = np.concatenate(list(noisy_batches(images[i], SIGMA, n_prime, 1000, point.seed,
                                                  Phase.ESTIMATION)))
        flat = noisy.reshape(n_prime, -1).astype(np.float64)
        k = int(np.sum((flat @ W > 0) != (flat @ w_q > 0)))  # counted here, independently of arqc
        assert cert.path == "irs" and cert.disagreements == k > 0
        assert cert.zeta == pytest.approx(cp_upper_independent(k, n_prime, ALPHA), abs=1e-9)
        assert cert.radius <= point.radius
        if cert.prediction != ABSTAIN:
            assert cert.prediction == point.top_class
            assert cert.radius == pytest.approx(SIGMA * norm.ppf(point.pA_lower - cert.zeta), rel=1e-10)
        else:
            assert point.pA_lower - cert.zeta <= 0.5 and cert.radius == 0.0


def test_fallback_when_pA_lower_reaches_gamma(cache, images):
    point, n_prime = cache.points[4], 500
    cert = certify_incremental(backend_of(), images[4], point, sigma=SIGMA, alpha=ALPHA, n_prime=n_prime)
    assert cert.path == "full" and cert.zeta is None and cert.samples == n_prime
    expected = ALPHA ** (1 / n_prime)  # pA ≈ 1 - 1e-9: all n' fresh samples vote for ĉA
    assert cert.pA_lower == pytest.approx(expected, rel=1e-10)
    assert cert.radius == pytest.approx(SIGMA * norm.ppf(expected), rel=1e-10)
    replayed = certify_incremental(backend_of(), images[4], point, sigma=SIGMA, alpha=ALPHA, n_prime=n_prime,
                                   gamma=1.0)
    assert replayed.path == "irs"
    low = certify_incremental(backend_of(), images[0], cache.points[0], sigma=SIGMA, alpha=ALPHA,
                              n_prime=n_prime, gamma=0.5)
    assert low.path == "full"


def test_incremental_refuses_other_images_and_too_many_samples(cache, images):
    with pytest.raises(ArqcError, match="differs"):
        certify_incremental(backend_of(), images[1], cache.points[0], sigma=SIGMA, alpha=ALPHA, n_prime=100)
    with pytest.raises(ArqcError, match="exceeds"):
        certify_incremental(backend_of(), images[0], cache.points[0], sigma=SIGMA, alpha=ALPHA, n_prime=N + 1)


def test_gaussian_oracle_matches_scipy_and_monte_carlo():
    """The closed-form oracle the coverage test trusts: Φ₂ against scipy's multivariate normal, and
    P(f ≠ f′), P(f′ = 1) against 10⁶ Monte Carlo samples (within 5 standard errors)."""
    rng = np.random.default_rng(0)
    for h, k, rho in [(0.3, -1.2, 0.8), (2.0, 1.5, 0.999), (-0.7, 0.4, -0.5), (0.0, 1.0, 0.3), (0.0, 0.0, 0.6)]:
        exact = multivariate_normal(mean=[0, 0], cov=[[1, rho], [rho, 1]]).cdf([h, k])
        assert bivariate_normal_cdf(h, k, rho) == pytest.approx(exact, abs=1e-6)
    sigma, m = 0.5, 1_000_000
    for s, b_q in [(0.3, -0.2), (0.05, 0.4)]:
        x = rng.uniform(0, 1, W.size)
        f_wb, g_wb = (W, 0.1), (W + rng.normal(0, s, W.size), b_q)
        noisy = x + rng.normal(0, sigma, (m, W.size))
        f, g = noisy @ f_wb[0] + f_wb[1] > 0, noisy @ g_wb[0] + g_wb[1] > 0
        for measured, p in [(np.mean(f != g), disagreement_probability(x, f_wb, g_wb, sigma)),
                            (np.mean(g), norm.cdf(standardized_margin(x, *g_wb, sigma)))]:
            assert abs(measured - p) < 5 * np.sqrt(p * (1 - p) / m) and 0.01 < p < 0.99


def _f_prime_for(x: np.ndarray, sign: int, full: bool, rng: np.random.Generator, sigma: float) -> LinearClassifier:
    """A modified f′ for a point whose f-class is 1 (sign +1) or 0 (sign −1).

    For path "irs" points: W perturbed (ρ < 1) and shifted towards the other class, so that f and f′ disagree
    with probability ~0.003–0.35 (median 0.06), mostly by f′ losing f's class (then pA(f′) ≈ pA(f) − P(f ≠ f′):
    the bound is nearly tight, and an unsound ζ shows as unsound radii). For path "full" points (f's pA ≈ 1):
    f′'s probability of f's class is set to 0.95–0.999, on both sides of the fresh bound's ceiling α^(1/n′).
    """
    if not full:
        w_q = W + rng.normal(0, rng.uniform(0.02, 0.3), W.size)
        return LinearClassifier(w_q, -sign * rng.uniform(0.0, 0.6))
    w_q = W + rng.normal(0, 0.05, W.size)
    a_q = norm.ppf(rng.uniform(0.95, 0.999))  # f′'s standardized margin towards f's class
    w32 = w_q.astype(np.float32).astype(np.float64)
    return LinearClassifier(w_q, sign * a_q * sigma * np.linalg.norm(w32) - float(x.ravel().astype(np.float64) @ w32))


def test_irs_coverage_against_closed_form_oracle():
    """ζ and the IRS radii against closed-form truths, over many independent (point, f′, noise) trials.

    f and f′ are half-spaces, so P(f(x+ε) ≠ f′(x+ε)) is a bivariate-normal orthant probability and f′'s pA is
    Φ(margin / (σ‖w′‖)) (tests/gaussian_oracles.py, no arqc code). Each trial has its own point, f′ and noise
    seed, so the miss counts are sums of independent Bernoulli variables with rates ≤ the nominal levels:
    (a) ζ < P(f ≠ f′) in at most α_ζ of path-"irs" trials, (b) an "irs" radius above f′'s true radius in at most
    α + α_ζ of them, and a "full" radius above it in at most α — each up to the Binomial(trials, level) quantile
    at 1 − 1e-6. The point estimate k/n′ in place of ζ misses about half the time (checked below as a control).
    """
    sigma, alpha, alpha_zeta, n0, n, n_prime = 0.5, 0.05, 0.05, 100, 1000, 100
    num_irs, num_full, level = 1500, 300, 1e-6
    rng = np.random.default_rng(20240611)
    f_wb = weights_of(LinearClassifier())
    norm_w = float(np.linalg.norm(f_wb[0]))
    images, f_primes = [], []
    for i in range(num_irs + num_full):
        full, sign = i >= num_irs, int(rng.choice([-1, 1]))
        a = rng.uniform(5.5, 7.0) if full else norm.ppf(rng.uniform(0.7, 0.97))  # f's standardized margin
        v = rng.uniform(0, 1, W.size)
        v -= (v @ f_wb[0]) / norm_w**2 * f_wb[0]
        x = (v + sign * a * sigma / norm_w * f_wb[0]).reshape(SHAPE).astype(np.float32)
        images.append(x)
        f_primes.append(_f_prime_for(x, sign, full, rng, sigma))
    images = np.stack(images)
    cache = build_cache(backend_of(), images, np.zeros(len(images), int), list(range(len(images))), sigma=sigma,
                        n0=n0, n=n, alpha=alpha, batch_size=1000, seed=17)
    paths = {"irs": 0, "full": 0}
    zetas = zeta_misses = plug_in_misses = 0
    unsound = {"irs": 0, "full": 0}
    certified = {"irs": 0, "full": 0}
    plug_in_unsound = 0
    for i, (x, point, f_q) in enumerate(zip(images, cache.points, f_primes, strict=True)):
        cert = certify_incremental(TorchBackend(f_q, batch_size=1000, device="cpu"), x, point, sigma=sigma,
                                   alpha=alpha, n_prime=n_prime, alpha_zeta=alpha_zeta)
        assert cert.path == ("full" if i >= num_irs else "irs")  # the cache's pA_lower is ≥ γ exactly there
        paths[cert.path] += 1
        cA = point.top_class
        a_q = standardized_margin(x, *weights_of(f_q), sigma) * (1 if cA == 1 else -1)  # towards ĉA
        true_radius, pA_q = sigma * a_q, float(norm.cdf(a_q))  # negative radius: ĉA is not g′(x)
        if cert.zeta is not None:  # "irs" and f's pA_lower > 1/2
            zetas += 1
            p_dis = disagreement_probability(x, f_wb, weights_of(f_q), sigma)
            zeta_misses += cert.zeta < p_dis
            plug_in_misses += cert.disagreements / n_prime < p_dis
            plug_in_unsound += point.pA_lower - cert.disagreements / n_prime > max(pA_q, 0.5)
        if cert.prediction != ABSTAIN:
            assert cert.prediction == cA
            certified[cert.path] += 1
            failed = cert.radius > true_radius
            assert failed == (cert.pA_lower > pA_q)  # the same event, in radius and in probability
            unsound[cert.path] += failed
    allowed_zeta = binom.ppf(1 - level, zetas, alpha_zeta)
    allowed_irs = binom.ppf(1 - level, paths["irs"], alpha + alpha_zeta)
    allowed_full = binom.ppf(1 - level, paths["full"], alpha)
    print(f"\nIRS vs closed form, {paths}: zeta < P(f != f') in {zeta_misses}/{zetas} (allowed {allowed_zeta:.0f}; "
          f"k/n' instead of zeta: {plug_in_misses}); unsound 'irs' radii {unsound['irs']}/{certified['irs']} "
          f"certified (allowed {allowed_irs:.0f}; with k/n': {plug_in_unsound}); unsound 'full' radii "
          f"{unsound['full']}/{certified['full']} certified (allowed {allowed_full:.0f})")
    assert paths["irs"] == num_irs and paths["full"] == num_full
    assert certified["irs"] > num_irs // 2 and certified["full"] > num_full // 2
    assert zeta_misses <= allowed_zeta
    assert unsound["irs"] <= allowed_irs
    assert unsound["full"] <= allowed_full
    assert plug_in_misses > 3 * allowed_zeta  # the measurement tells a confidence bound from a point estimate


# --- the cache file -------------------------------------------------------------------------------


def test_cache_file_round_trips(cache, tmp_path):
    path = tmp_path / "f.irs.npz"
    cache.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["f.irs.npz"]  # no temp file left behind
    loaded = load_cache(path, fingerprint=backend_of().fingerprint(), sigma=SIGMA, n=N, ids=[4, 0])
    assert (loaded.fingerprint, loaded.sigma, loaded.n, loaded.n0, loaded.alpha, loaded.seed) == (
        cache.fingerprint, SIGMA, N, N0, ALPHA, 21)
    for a, b in zip(loaded.points, cache.points, strict=True):
        assert (a.image_id, a.label, a.top_class, a.pA_lower, a.radius, a.seed, a.image_sha256) == (
            b.image_id, b.label, b.top_class, b.pA_lower, b.radius, b.seed, b.image_sha256)
        assert a.predictions.dtype == np.uint8 and np.array_equal(a.predictions, b.predictions)
    assert loaded.point(3) is loaded.points[3]
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(str(data["header"]))
    assert (header["format"], header["version"]) == ("arqc-irs-cache", 1)
    assert header["image_ids"] == [0, 1, 2, 3, 4]


def test_cache_refuses_other_model_sigma_n_ids(cache, tmp_path):
    path = tmp_path / "f.irs.npz"
    cache.save(path)
    right = dict(fingerprint=backend_of().fingerprint(), sigma=SIGMA, n=N, ids=[0, 1])
    for wrong in (dict(fingerprint=backend_of(W * 1.1).fingerprint()), dict(sigma=0.25), dict(n=500),
                  dict(ids=[0, 9])):
        with pytest.raises(ArqcError) as error:
            load_cache(path, **(right | wrong))
        assert "\n" not in str(error.value) and "rebuild" in str(error.value)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ArqcError, match="cannot read"):
        load_cache(tmp_path / "junk.npz", **right)
    with pytest.raises(ArqcError, match="not in the IRS cache"):
        cache.point(99)


def test_certify_dataset_with_irs_cache(cache, images):
    x, y, ids = torch.from_numpy(images), torch.tensor([1, 0, 1, 1, 1]), [0, 1, 2, 3, 4]
    w_q = W + np.random.default_rng(3).normal(0, 0.05, W.size)
    args = dict(sigma=SIGMA, n0=N0, n=500, alpha=ALPHA, batch_size=250, seed=21, progress=False)
    result = certify_dataset(backend_of(w_q), x, y, ids, irs_cache=cache, **args)
    assert [p["path"] for p in result.points] == ["irs"] * 4 + ["full"]
    assert result.irs["paths"] == {"irs": 4, "full": 1} and result.samples_per_point == 500
    for p, image, point in zip(result.points, images, cache.points, strict=True):
        cert = certify_incremental(backend_of(w_q), image, point, sigma=SIGMA, alpha=ALPHA, n_prime=500)
        assert (p["prediction"], p["radius"], p["zeta"]) == (cert.prediction, cert.radius, cert.zeta)
    assert "IRS:" in format_table(result)
    with pytest.raises(ArqcError, match="sigma"):
        certify_dataset(backend_of(w_q), x, y, ids, irs_cache=cache, **(args | dict(sigma=0.25)))
    with pytest.raises(ArqcError, match="exceeds"):
        certify_dataset(backend_of(w_q), x, y, ids, irs_cache=cache, **(args | dict(n=N + 1)))


def test_a_point_f_abstains_on_is_not_sampled(images):
    """pA_lower ≤ 1/2 in the cache: IRS abstains whatever f' does, so it spends no samples."""
    rng = np.random.default_rng(3)
    near_tie = np.stack([point_with_probability(0.52, rng)])
    cache = build_cache(backend_of(), near_tie, np.array([1]), [0], sigma=SIGMA, n0=N0, n=N, alpha=ALPHA,
                        batch_size=500, seed=5)
    assert cache.points[0].pA_lower <= 0.5
    cert = certify_incremental(backend_of(b=0.3), near_tie[0], cache.points[0], sigma=SIGMA, alpha=ALPHA,
                               n_prime=200)
    assert cert.prediction == ABSTAIN and cert.samples == 0


def test_search_reward_skips_only_images_that_score_zero(images, cache):
    """The ARQ reward samples only images whose cached class is right; it equals IRS on every image."""
    from arqc.rewards import CertifiedReward

    labels = torch.tensor([1, 1, 1, 0, 1])  # the cached classes are 1, 0, 1, 1, 1: images 1 and 3 are wrong
    x, ids = torch.from_numpy(images), [0, 1, 2, 3, 4]
    shifted = LinearClassifier(W, 0.05)
    reward = CertifiedReward(lambda policy: shifted, x, labels, ids, cache, n_prime=500, lam=0.5, batch_size=500)
    assert reward.ids == [0, 2, 4]
    value, info = reward({"l": (8, 8)})
    full = certify_dataset(TorchBackend(shifted, batch_size=500), x, labels, ids, sigma=SIGMA, n=500, alpha=ALPHA,
                           batch_size=500, irs_cache=cache, progress=False)
    assert info["acr"] == pytest.approx(full.acr) and info["clean_accuracy"] == pytest.approx(full.clean_accuracy)
    assert value == pytest.approx(full.acr + 0.5 * full.clean_accuracy)
    assert info["samples"] < sum(p["samples"] for p in full.points)
