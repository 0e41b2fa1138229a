"""Certify a test set, resumably, and report it as a :class:`CertifyResult` (stable JSON) and a plain-text table.

Each point's noise seed derives from (run seed, image id), so a subset, a resumed run and an
uninterrupted run give the same numbers. With ``state_path`` every finished point is appended as one
JSON line to a state file whose first line records all arguments and the backend fingerprint; a rerun
with the same arguments continues after the last finished point, a rerun with other arguments is refused.
A rerun on more images, whose first images are the state file's, extends it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from arqc.base import ArqcError, Log, first_difference, quiet
from arqc.passes.meta import SEMANTICS, check_semantics
from arqc.runtime.backends import Backend, ComparingBackend, TorchBackend, runtime_backend
from arqc.runtime.cluster import RayPool, run_in_chunks
from arqc.runtime.irs import DEFAULT_GAMMA, certify_incremental
from arqc.runtime.irs_cache import CachePoint, IrsCache
from arqc.runtime.metrics import DEFAULT_RADII, summarize
from arqc.runtime.noise import NOISE_SCHEME, point_seed
from arqc.runtime.smoothing import certify, check_arguments, upper_confidence_bound

STATE_FORMAT = "arqc-certify-state"
STATE_VERSION = 1


def certify_dataset(
    backend: Backend,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | Sequence[int],
    ids: Sequence[int] | None = None,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 400,
    seed: int = 0,
    state_path: str | Path | None = None,
    progress: bool = True,
    irs_cache: IrsCache | None = None,
    gamma: float = DEFAULT_GAMMA,
    alpha_zeta: float | None = None,
    radii: Sequence[float] = DEFAULT_RADII,
    pool: RayPool | None = None,
) -> CertifyResult:
    """Certify every image x[i] (N, C, H, W; pixels in [0, 1]) with label y[i] and id ids[i] (default i).

    Without ``irs_cache``: CERTIFY(n0, n) per point (path "full"). With it: IRS against the cached f,
    with n' = n samples of the backend's model f' (σ and α must be the cache's; n0 and seed are unused: the
    noise comes from the seeds recorded in the cache). With ``pool`` the points run in chunks on a Ray
    cluster and come back in order: the same points as a local run (timings aside).
    """
    check_arguments(sigma=sigma, n0=n0, n=n, alpha=alpha)
    images = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float32)
    labels = [int(v) for v in (y.tolist() if isinstance(y, torch.Tensor) else y)]
    ids = list(range(len(images))) if ids is None else [int(i) for i in ids]
    if images.ndim != 4 or not len(images) == len(labels) == len(ids):
        raise ArqcError(f"need images [N, C, H, W] with N labels and N ids; got shape {tuple(images.shape)}, "
                        f"{len(labels)} labels, {len(ids)} ids")
    if len(set(ids)) != len(ids) or min(ids, default=0) < 0:
        raise ArqcError("image ids must be distinct non-negative integers")
    irs = _irs_settings(irs_cache, sigma, n, alpha, gamma, alpha_zeta)
    header = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "semantics": SEMANTICS,
        "args": {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed, "noise": NOISE_SCHEME,
                 "irs": irs},
        "backend": {"name": backend.name, "fingerprint": backend.fingerprint()},
        "data": {"num_images": len(ids), "sha256": _data_digest(images, labels, ids)},
    }
    points = (_resume(Path(state_path), header, ids, lambda k: _data_digest(images[:k], labels[:k], ids[:k]))
              if state_path is not None else [])
    settings = dict(sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size, seed=seed, gamma=gamma,
                    alpha_zeta=alpha_zeta)
    todo = list(range(len(points), len(ids)))

    def task(chunk: list[int]):
        return partial(_certify_chunk, images=images[chunk], labels=[labels[i] for i in chunk],
                       ids=[ids[i] for i in chunk], **settings,
                       cache_points=None if irs_cache is None else [irs_cache.point(ids[i]) for i in chunk])

    stream = run_in_chunks(backend, pool, todo, task, n if irs_cache is not None else n0 + n)
    state = open(state_path, "a", encoding="utf-8") if state_path is not None else None
    try:
        for point in tqdm(stream, total=len(ids), initial=len(points), disable=not progress, desc="certify"):
            points.append(point)
            if state is not None:
                state.write(json.dumps(point) + "\n")
                state.flush()
                os.fsync(state.fileno())
    finally:
        if state is not None:
            state.close()
    return CertifyResult.build(header["args"], backend.name, header["backend"]["fingerprint"], points, radii)


def _certify_chunk(backend: Backend, images: np.ndarray, labels: list[int], ids: list[int],
                   cache_points: list[CachePoint] | None, **settings) -> list[dict]:
    """The JSON points of some images (with their IRS cache points, or None), each with its seconds: what a
    local run does one image at a time and a Ray worker one chunk at a time."""
    out = []
    for k, (image, label, image_id) in enumerate(zip(images, labels, ids, strict=True)):
        start = time.perf_counter()
        cached = None if cache_points is None else cache_points[k]
        point = _certify_point(backend, image, label, image_id, cached, **settings)
        out.append(point | {"seconds": time.perf_counter() - start})
    return out


def _certify_point(backend: Backend, image: np.ndarray, label: int, image_id: int, cached: CachePoint | None, *,
                   sigma: float, n0: int, n: int, alpha: float, batch_size: int, seed: int, gamma: float,
                   alpha_zeta: float | None) -> dict:
    """One JSON point: full CERTIFY, or IRS against the point's cache entry."""
    if cached is None:
        cert = certify(backend, image, sigma, n0, n, alpha, batch_size, point_seed(seed, image_id))
        return {"index": image_id, "label": label, "prediction": cert.prediction, "radius": cert.radius,
                "pA_lower": cert.pA_lower, "samples": cert.samples, "path": "full"}
    cert = certify_incremental(backend, image, cached, sigma=sigma, alpha=alpha, n_prime=n,
                               alpha_zeta=alpha_zeta, gamma=gamma, batch_size=batch_size)
    return {"index": image_id, "label": label, "prediction": cert.prediction, "radius": cert.radius,
            "pA_lower": cert.pA_lower, "samples": cert.samples, "path": cert.path, "zeta": cert.zeta}


def _irs_settings(cache: IrsCache | None, sigma: float, n: int, alpha: float, gamma: float,
                  alpha_zeta: float | None) -> dict | None:
    """The IRS part of the state header; refuses a cache that does not match this run."""
    if cache is None:
        return None
    if cache.sigma != sigma or cache.alpha != alpha:
        raise ArqcError(f"IRS cache was built with sigma={cache.sigma}, alpha={cache.alpha}; "
                        f"certify with the same sigma and alpha (got sigma={sigma}, alpha={alpha})")
    if n > cache.n:
        raise ArqcError(f"n = {n} exceeds the IRS cache's {cache.n} samples per point; use n <= {cache.n}")
    return {"cache_fingerprint": cache.fingerprint, "cache_n": cache.n, "cache_seed": cache.seed,
            "gamma": gamma, "alpha_zeta": alpha if alpha_zeta is None else alpha_zeta}


def _data_digest(images: np.ndarray, labels: list[int], ids: list[int]) -> str:
    """sha256 of the images, labels and ids (a state file belongs to one data set)."""
    h = hashlib.sha256(str(images.shape).encode() + np.ascontiguousarray(images).tobytes())
    h.update(json.dumps([labels, ids]).encode())
    return h.hexdigest()


def _resume(path: Path, header: dict, ids: list[int], prefix_digest) -> list[dict]:
    """Finished points from an existing state file (creating it, with the header, if absent).

    Refuses a state file of other arguments; drops a last line that was cut off mid-write. A state file of
    fewer images that are the first images of this run (``prefix_digest(k)`` is the data digest of the first
    k) is extended: a point depends only on the arguments, the model, its image, label and id.
    """
    if not path.exists() or path.stat().st_size == 0:
        path.write_text(json.dumps(header) + "\n", encoding="utf-8")
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):  # interrupted while writing a line: forget that line
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    try:
        lines = [json.loads(line) for line in complete.decode("utf-8").splitlines()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArqcError(f"state file {str(path)!r} is corrupt ({e}); delete it to start over") from e
    if not lines:
        path.write_text(json.dumps(header) + "\n", encoding="utf-8")
        return []
    old = lines[0]
    check_semantics(old.get("semantics"), f"state file {str(path)!r}")
    if _is_prefix(old.get("data"), header["data"], prefix_digest) and \
            first_difference(old, header, keys=("format", "version", "args", "backend")) is None:
        old = header  # more images than the state file's: continue it under this run's header
        text = "".join(json.dumps(line) + "\n" for line in [header, *lines[1:]])
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    key = first_difference(old, header, keys=("format", "version", "args", "backend", "data"))
    if key is not None:
        raise ArqcError(f"state file {str(path)!r} belongs to a run with other {key} "
                        f"({json.dumps(old.get(key))[:200]}); rerun with the same arguments or use "
                        "another state path")
    points = lines[1:]
    if len(points) > len(ids) or [p["index"] for p in points] != ids[: len(points)]:
        raise ArqcError(f"state file {str(path)!r} does not follow the image ids of this run; "
                        "delete it to start over")
    return points


def _is_prefix(old: dict | None, new: dict, prefix_digest) -> bool:
    """Whether a state file's data (``old``) is the first images of this run's (``new``), and fewer."""
    if not isinstance(old, dict) or not isinstance(old.get("num_images"), int):
        return False
    return 0 < old["num_images"] < new["num_images"] and prefix_digest(old["num_images"]) == old.get("sha256")


@dataclass
class CertifyResult:
    """A certified data set (DESIGN §3): the settings, the summary over the points, and one dict per point
    (index, label, prediction, radius, pA_lower, samples, path, seconds). :meth:`to_json` is the stable JSON of
    ``arqc certify --json``; :meth:`build` is the one place a result is made."""

    sigma: float
    n0: int
    n: int
    alpha: float
    seed: int
    num_images: int
    backend: str
    backend_fingerprint: str
    noise: str
    certified_accuracy: dict[str, float]  # radius formatted "0.25" -> fraction of points
    acr: float
    abstain_rate: float
    clean_accuracy: float
    time_per_point_s: float
    samples_per_point: float
    points: list[dict]
    irs: dict | None = None  # IRS runs: the cache's settings and how many points took each path
    model: str | None = None  # what the CLI certified (the model file, the data spec, every --skip-th image)
    data: str | None = None
    skip: int | None = None

    @classmethod
    def build(cls, args: dict, backend: str, fingerprint: str, points: list[dict],
              radii: Sequence[float] = DEFAULT_RADII) -> CertifyResult:
        """The result of ``points`` certified with ``args`` (sigma, n0, n, alpha, seed; irs: the IRS settings
        or None) on ``backend`` (its name and fingerprint)."""
        summary = summarize([(p["label"], p["prediction"], p["radius"]) for p in points], radii)
        irs = None
        if args.get("irs") is not None:
            paths = [p["path"] for p in points]
            irs = {**args["irs"], "paths": {"irs": paths.count("irs"), "full": paths.count("full")}}
        return cls(
            sigma=args["sigma"], n0=args["n0"], n=args["n"], alpha=args["alpha"], seed=args["seed"],
            num_images=len(points), backend=backend, backend_fingerprint=fingerprint, noise=NOISE_SCHEME,
            certified_accuracy={f"{r:.2f}": acc for r, acc in summary.certified_accuracy.items()},
            acr=summary.acr, abstain_rate=summary.abstain_rate, clean_accuracy=summary.clean_accuracy,
            time_per_point_s=float(np.mean([p["seconds"] for p in points])),
            samples_per_point=float(np.mean([p["samples"] for p in points])), points=points, irs=irs)

    def to_json(self) -> dict:
        """The JSON dict (fields that are None are left out, as arqc has always written it)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("irs", "model", "data", "skip")}



def format_table(result: CertifyResult) -> str:
    """Plain-text table: certified accuracy per radius, ACR, abstain rate; n, n0, α, σ and #images."""
    radii = list(result.certified_accuracy)
    width = max(7, *(len(r) + 1 for r in radii))
    lines = [
        "radius".ljust(20) + "".join(r.rjust(width) for r in radii),
        "certified accuracy".ljust(20)
        + "".join(f"{100 * result.certified_accuracy[r]:.1f}%".rjust(width) for r in radii),
        f"ACR {result.acr:.3f}   abstain rate {100 * result.abstain_rate:.1f}%   "
        f"clean smoothed accuracy {100 * result.clean_accuracy:.1f}%",
        f"sigma={result.sigma} n={result.n} n0={result.n0} alpha={result.alpha} "
        f"images={result.num_images} backend={result.backend} seed={result.seed}",
    ]
    if result.irs is not None:
        irs = result.irs
        lines.append(f"IRS: {irs['paths']['irs']} points by replayed noise (alpha_zeta={irs['alpha_zeta']}), "
                     f"{irs['paths']['full']} certified afresh (pA_lower >= gamma={irs['gamma']})")
    return "\n".join(lines)


def deployed_backend(onnx_bytes: bytes, runtime: str, reference: Backend | None = None,
                     compare_runtime: str | None = None, batch: int = 400) -> tuple[Backend, list[ComparingBackend]]:
    """The backend that certifies an ONNX model in ``runtime`` (the runtime it is deployed to; onnxruntime at
    ENABLE_ALL), wrapped to count per-sample disagreements with ``reference`` (the torch simulation) and with
    ``compare_runtime``; also returns those comparisons, for :func:`check_comparisons`."""
    backend: Backend = runtime_backend(runtime, onnx_bytes, batch_size=batch)
    comparisons = []
    if reference is not None:
        backend = ComparingBackend(backend, reference)
        comparisons.append(backend)
    if compare_runtime is not None:
        other = runtime_backend(compare_runtime, onnx_bytes, batch_size=batch)
        backend = ComparingBackend(backend, other, label=other.runtime)
        comparisons.append(backend)
    return backend, comparisons


def check_comparisons(comparisons: list[ComparingBackend], alpha: float, max_disagreement: float,
                      log: Log = quiet) -> dict:
    """{"verification": against the torch simulation, "runtime_comparison": against another runtime} (each
    None when not asked), logged with rates and Clopper–Pearson bounds; ArqcError above ``max_disagreement``."""
    out = {"verification": None, "runtime_comparison": None}
    for cb in comparisons:
        key = "verification" if isinstance(cb.reference, TorchBackend) else "runtime_comparison"
        out[key] = check_disagreement(cb, alpha, max_disagreement, log)
    return out


def check_disagreement(backend: ComparingBackend, alpha: float, max_disagreement: float, log: Log = quiet) -> dict:
    """How often the primary and reference models of ``backend`` disagreed on the same noisy samples, with
    the one-sided Clopper–Pearson upper bound at level α (logged in one line); ArqcError when the rate exceeds
    ``max_disagreement``."""
    k, total = backend.disagreements, backend.samples
    rate = k / total if total else 0.0
    report = {"runtime": backend.runtime, "reference": backend.label, "samples": total, "disagreements": k,
              "rate": rate, "upper_bound": upper_confidence_bound(k, total, alpha) if total else 1.0, "alpha": alpha,
              "max_disagreement": max_disagreement, "passed": rate <= max_disagreement}
    log(f"{backend.runtime} vs {backend.label}: {k} of {total} noisy samples disagree (rate {rate:.2e}, "
        f"{100 * (1 - alpha):g}% Clopper-Pearson upper bound {report['upper_bound']:.2e}; allowed {max_disagreement})")
    if not report["passed"]:
        raise ArqcError(f"the ONNX model in {backend.name} disagrees with the {backend.label} on {k} of {total} "
                        f"noisy samples (rate {rate:.4f} > --max-disagreement {max_disagreement}); nothing "
                        "written. Try --scales po2 (bit-exact across backends) or a higher precision")
    return report
