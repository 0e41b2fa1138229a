"""Incremental randomized smoothing (Ugare, Banerjee, Misailovic & Singh 2024) for a modified network f'.

Certify the full-precision f once and keep, per point, its top class ĉA, pA_lower, the noise seed
and f's class on every estimation sample (``build_cache``). For a modified f' (e.g. quantized):

    IRS(f', σ, x, n', cache, α, α_ζ, γ):
        ĉA, pA_lower ← cache[x]
        if pA_lower ≤ 1/2: abstain                     # no f' sample can change that
        if pA_lower < γ:
            k ← #{i ≤ n' : f'(x + εᵢ) ≠ f(x + εᵢ)}      # εᵢ: the cached estimation noise, replayed
            ζ ← UpperConfBound(k, n', 1 − α_ζ)
            if pA_lower − ζ > 1/2: return ĉA, σ Φ⁻¹(pA_lower − ζ) else: abstain       # path "irs"
        else:
            nA ← #{i ≤ n' : f'(x + ε'ᵢ) = ĉA}          # ε'ᵢ: n' fresh samples
            p'A_lower ← LowerConfBound(nA, n', 1 − α)
            if p'A_lower > 1/2: return ĉA, σ Φ⁻¹(p'A_lower) else: abstain            # path "full"

Why it is sound: P(f'(x+ε) = ĉA) ≥ P(f(x+ε) = ĉA) − P(f'(x+ε) ≠ f(x+ε)) ≥ pA_lower − ζ, where pA_lower
fails with probability ≤ α and ζ with probability ≤ α_ζ; so an "irs" certificate holds with probability
≥ 1 − (α + α_ζ). A "full" certificate holds with probability ≥ 1 − α (ĉA was chosen on noise independent
of the fresh samples). The fallback exists because near pA_lower ≈ 1 even a tiny ζ costs more radius than
estimating p'A afresh; with γ = 0.99 (the paper's choice) the fresh estimate is used there.

The cache file format lives in arqc.runtime.irs_cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy.stats import norm
from tqdm import tqdm

from arqc.base import ArqcError
from arqc.runtime.backends import Backend
from arqc.runtime.cluster import RayPool, run_in_chunks
from arqc.runtime.irs_cache import CachePoint, IrsCache, image_digest, load_cache
from arqc.runtime.noise import Phase, point_seed
from arqc.runtime.smoothing import (
    ABSTAIN,
    certify,
    check_arguments,
    lower_confidence_bound,
    sample_predictions,
    upper_confidence_bound,
)

__all__ = ["DEFAULT_GAMMA", "CachePoint", "IncrementalCertificate", "IrsCache", "build_cache",
           "certify_incremental", "load_cache"]

DEFAULT_GAMMA = 0.99


@dataclass(frozen=True)
class IncrementalCertificate:
    """IRS outcome for one point; ``pA_lower`` is the lower bound on P(f'(x+ε) = ĉA) the radius comes from."""

    prediction: int  # ABSTAIN (-1) or the cached top class ĉA
    radius: float
    pA_lower: float  # pA_lower(f) − ζ on path "irs", the fresh bound on path "full"
    zeta: float | None  # None on path "full"
    disagreements: int | None  # k, None on path "full"
    samples: int  # n' forward passes of f'
    path: str  # "irs" (replayed cached noise) or "full" (fresh samples, pA_lower ≥ γ)


def build_cache(
    backend: Backend,
    images: np.ndarray,
    labels: np.ndarray,
    ids: list[int],
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    seed: int,
    progress: bool = False,
    pool: RayPool | None = None,
) -> IrsCache:
    """CERTIFY f on every image [N, C, H, W] once and keep what IRS needs (save it with ``IrsCache.save``);
    with ``pool``, on a Ray cluster (the same cache)."""
    points = [point for point, _ in cache_points(backend, images, labels, ids, sigma=sigma, n0=n0, n=n, alpha=alpha,
                                                 batch_size=batch_size, seed=seed, progress=progress, pool=pool)]
    return IrsCache(fingerprint=backend.fingerprint(), sigma=sigma, n=n, n0=n0, alpha=alpha, seed=seed,
                    points=points)


def cache_points(backend: Backend, images: np.ndarray, labels, ids: list[int], *, progress: bool = False,
                 pool: RayPool | None = None, **settings) -> Iterator[tuple[CachePoint, float]]:
    """Every image's cache point (CERTIFY keeping f's class on each estimation sample) and its seconds, in
    order: one image at a time here, or in chunks on the Ray ``pool``."""
    images = np.asarray(images, dtype=np.float32)
    labels = [int(v) for v in labels]
    if not len(images) == len(labels) == len(ids):
        raise ArqcError(f"images ({len(images)}), labels ({len(labels)}) and ids ({len(ids)}) differ in "
                        "length; pass one label and one id per image")
    def task(chunk: list[int]):
        return partial(_cache_chunk, images=images[chunk], labels=[labels[i] for i in chunk],
                       ids=[ids[i] for i in chunk], **settings)

    stream = run_in_chunks(backend, pool, list(range(len(ids))), task, settings["n0"] + settings["n"])
    yield from tqdm(stream, total=len(ids), disable=not progress, desc="IRS cache")


def _cache_chunk(backend: Backend, images: np.ndarray, labels: list[int], ids: list[int], *, sigma: float, n0: int,
                 n: int, alpha: float, batch_size: int, seed: int) -> list[tuple[CachePoint, float]]:
    out = []
    for image, label, image_id in zip(images, labels, ids, strict=True):
        start = time.perf_counter()
        cert = certify(backend, image, sigma, n0, n, alpha, batch_size, point_seed(seed, int(image_id)),
                       keep_predictions=True)
        out.append((CachePoint(image_id=int(image_id), label=int(label), top_class=cert.top_class,
                               pA_lower=cert.pA_lower, radius=cert.radius, seed=cert.seed,
                               image_sha256=image_digest(image), predictions=cert.predictions),
                    time.perf_counter() - start))
    return out


def certify_incremental(
    backend_q: Backend,
    x: np.ndarray,
    point: CachePoint,
    *,
    sigma: float,
    alpha: float,
    n_prime: int,
    alpha_zeta: float | None = None,
    gamma: float = DEFAULT_GAMMA,
    batch_size: int = 400,
) -> IncrementalCertificate:
    """IRS-certify f' (``backend_q``) on image x [C, H, W] against f's cached ``point`` (σ, α: the cache's).

    Holds with probability ≥ 1 − (α + α_ζ) on path "irs" and ≥ 1 − α on path "full"; α_ζ defaults to α.
    Path "full" (used when the cached pA_lower ≥ γ) certifies f' from scratch with n' fresh samples for ĉA.
    """
    alpha_zeta = alpha if alpha_zeta is None else alpha_zeta
    check_arguments(sigma=sigma, n0=1, n=n_prime, alpha=alpha)
    check_arguments(sigma=sigma, n0=1, n=n_prime, alpha=alpha_zeta)
    if n_prime > len(point.predictions):
        raise ArqcError(f"n' = {n_prime} exceeds the {len(point.predictions)} cached samples; "
                        f"use n' <= {len(point.predictions)} or rebuild the cache with a larger n")
    if image_digest(x) != point.image_sha256:
        raise ArqcError(f"image {point.image_id} differs from the one in the IRS cache; "
                        "use the same images (and preprocessing) the cache was built on")
    cA = point.top_class
    if point.pA_lower <= 0.5:  # pA_lower − ζ ≤ 1/2 whatever f' does: the same abstention, without sampling
        return IncrementalCertificate(ABSTAIN, 0.0, point.pA_lower, None, None, 0, "irs")
    if point.pA_lower < gamma:
        f_q = sample_predictions(backend_q, x, sigma, n_prime, batch_size, point.seed, Phase.ESTIMATION)
        k = int(np.sum(f_q != point.predictions[:n_prime]))
        zeta = upper_confidence_bound(k, n_prime, alpha_zeta)
        pA_lower = point.pA_lower - zeta
        prediction, radius = _certificate(cA, pA_lower, sigma)
        return IncrementalCertificate(prediction, radius, pA_lower, zeta, k, n_prime, "irs")
    f_q = sample_predictions(backend_q, x, sigma, n_prime, batch_size, point.seed, Phase.FRESH)
    pA_lower = lower_confidence_bound(int(np.sum(f_q == cA)), n_prime, alpha)
    prediction, radius = _certificate(cA, pA_lower, sigma)
    return IncrementalCertificate(prediction, radius, pA_lower, None, None, n_prime, "full")


def _certificate(cA: int, pA_lower: float, sigma: float) -> tuple[int, float]:
    """(ĉA, σ Φ⁻¹(pA_lower)) if pA_lower > 1/2, else (ABSTAIN, 0)."""
    if pA_lower > 0.5:
        return cA, sigma * float(norm.ppf(pA_lower))
    return ABSTAIN, 0.0
