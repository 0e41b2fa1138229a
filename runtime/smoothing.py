"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): CERTIFY and PREDICT for any backend.

The smoothed classifier is g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ²I), with the noise added to
the [0, 1] pixels (see arqc.runtime.noise). The functions below follow the paper's pseudo-code:

    CERTIFY(f, σ, x, n0, n, α):
        counts0 ← SampleUnderNoise(f, x, n0, σ)          # selection noise
        ĉA ← top index in counts0
        counts ← SampleUnderNoise(f, x, n, σ)            # independent estimation noise
        pA_lower ← LowerConfBound(counts[ĉA], n, 1 − α)
        if pA_lower > 1/2: return ĉA, σ Φ⁻¹(pA_lower) else: abstain

    PREDICT(f, σ, x, n, α):
        counts ← SampleUnderNoise(f, x, n, σ)
        ĉA, ĉB ← top two indices in counts
        if BinomPValue(nA, nA + nB, 0.5) ≤ α: return ĉA else: abstain
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import beta, binomtest, norm

from arqc.base import ArqcError
from arqc.runtime.backends import Backend
from arqc.runtime.noise import Phase, noisy_batches

ABSTAIN = -1


@dataclass(frozen=True)
class Certificate:
    """The outcome of CERTIFY for one point; ``prediction`` is ABSTAIN (-1) with radius 0 when it abstains."""

    prediction: int
    radius: float
    pA_lower: float
    nA: int
    top_class: int  # ĉA, the selection winner (kept also when abstaining)
    counts: np.ndarray = field(repr=False)  # counts[c]: estimation samples classified c (len: max class + 1)
    samples: int  # n0 + n forward passes
    seed: int  # point seed; the selection and estimation noise are Phase.SELECTION / Phase.ESTIMATION of it
    predictions: np.ndarray | None = field(default=None, repr=False)  # f's class on each estimation sample


def certify(
    backend: Backend,
    x: np.ndarray,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    seed: int,
    keep_predictions: bool = False,
) -> Certificate:
    """CERTIFY one image x [C, H, W]: the smoothed class and its L2 radius, correct with probability ≥ 1 − α.

    With ``keep_predictions`` the certificate also holds f's class on every estimation sample (for IRS).
    """
    check_arguments(sigma=sigma, n0=n0, n=n, alpha=alpha)
    counts0 = np.bincount(sample_predictions(backend, x, sigma, n0, batch_size, seed, Phase.SELECTION))
    cA = int(counts0.argmax())
    predictions = sample_predictions(backend, x, sigma, n, batch_size, seed, Phase.ESTIMATION)
    nA = int(np.sum(predictions == cA))
    pA_lower = lower_confidence_bound(nA, n, alpha)
    if pA_lower > 0.5:
        prediction, radius = cA, sigma * float(norm.ppf(pA_lower))
    else:
        prediction, radius = ABSTAIN, 0.0
    return Certificate(
        prediction=prediction,
        radius=radius,
        pA_lower=pA_lower,
        nA=nA,
        top_class=cA,
        counts=np.bincount(predictions),
        samples=n0 + n,
        seed=seed,
        predictions=predictions if keep_predictions else None,
    )


def predict(
    backend: Backend, x: np.ndarray, sigma: float, n: int, alpha: float, batch_size: int, seed: int
) -> int:
    """PREDICT one image: g(x), or ABSTAIN when a two-sided binomial test of the top two counts is not
    significant at level α (a returned class is wrong with probability at most α)."""
    check_arguments(sigma=sigma, n0=1, n=n, alpha=alpha)
    predictions = sample_predictions(backend, x, sigma, n, batch_size, seed, Phase.PREDICTION)
    counts = np.bincount(predictions, minlength=2)
    cA, cB = np.argsort(-counts, kind="stable")[:2]
    nA, nB = int(counts[cA]), int(counts[cB])
    if binomtest(nA, nA + nB, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(cA)


def sample_predictions(
    backend: Backend, x: np.ndarray, sigma: float, num: int, batch_size: int, seed: int, phase: Phase
) -> np.ndarray:
    """f's class (int64) on each of the first ``num`` noisy copies x + ε of the (seed, phase) noise stream."""
    batches = noisy_batches(x, sigma, num, batch_size, seed, phase)
    return np.concatenate([backend.predict(batch) for batch in batches] or [np.zeros(0, np.int64)])


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson lower bound on p from k successes in n trials."""
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson upper bound on p from k successes in n trials."""
    return 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))


def check_arguments(*, sigma: float, n0: int, n: int, alpha: float) -> None:
    """Raise ArqcError unless σ > 0, n0 ≥ 1, n ≥ 1 and 0 < α < 1."""
    if not sigma > 0:
        raise ArqcError(f"sigma must be > 0, got {sigma}")
    if n0 < 1 or n < 1:
        raise ArqcError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
    if not 0 < alpha < 1:
        raise ArqcError(f"alpha must be in (0, 1), got {alpha}")
