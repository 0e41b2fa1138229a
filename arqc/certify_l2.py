"""Randomized-smoothing L2 certificates (DESIGN §3) of a model on a labelled image set (``arqc certify``,
``arqc.certify``), and the certification of a compiled ONNX model behind ``arqc compile --sigma [--verify]``.

Models and backends
- ``.pt``/``.pth``/``.th``/``.pt2`` files load as in ``arqc compile`` (``--arch``, ``--trust-pickle``) and are
  captured to arqc's graph (BatchNorm folded). ``--backend torch`` (the default) runs that graph in PyTorch;
  ``--backend ort`` first lowers it at FP32 with arqc's own lowering (every layer at 32 bits, the path
  ``arqc compile`` takes) and runs the ONNX model in onnxruntime.
- ``.onnx`` files run in onnxruntime (``--ort-opt``, default ``all``: the level a deployment uses) or, with
  ``--backend openvino``, in OpenVINO's CPU plugin: a certificate holds for the file as the runtime that
  computed it runs it, so certify in the runtime you deploy to. They must take float32 [B, C, H, W] pixels in
  [0, 1] and normalize inside, as arqc's lowered models do.
- Noise is added to the [0, 1] pixels, before the model's normalization (Cohen et al.); σ and the radii are
  in those units. A point's noise depends only on ``--seed`` and the image id, so every backend sees the
  same samples.

Resuming
- With ``--json OUT`` a run keeps the state file ``OUT.state`` (or the ``--state PATH`` given): its first line
  records the arguments, the model's fingerprint and a digest of the images; every finished point is appended
  as one line. Rerunning the same command continues after the last finished point; a rerun with other
  arguments, another model or other images is refused (delete the state file to start over). ``OUT.state`` is
  removed once the JSON is written; a ``--state PATH`` you name is kept, and a later run on more images whose
  first images are the earlier ones (a larger ``--num-images``) extends it instead of starting over.
  ``--save-irs-cache`` runs are not resumable.

Incremental randomized smoothing (IRS)
- ``--save-irs-cache C`` certifies the full-precision f as usual and also writes what IRS needs (f's class on
  every estimation sample, per point) to C.
- ``--irs-cache C`` certifies a modified f' (e.g. ``arqc compile`` output of f) against C: n' = ``--n``
  samples of f' per point (default: the cache's n); σ and α must be the cache's. A cache is refused when f'
  is an arqc model that records another origin than the cache's f, and for other images, σ or n' > n; when
  f' records no origin (a foreign ONNX file, a fine-tuned checkpoint) a note says the link is unchecked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch

from arqc.base import ArqcError, Log, quiet
from arqc.data import ImageSet, check_compatible
from arqc.passes.lower import read_metadata
from arqc.passes.policy import uniform
from arqc.pipeline import model_identity, prepare_model, quantize, to_onnx
from arqc.runtime.backends import Backend, OpenVinoBackend, OrtBackend, TorchBackend, runtime_backend
from arqc.runtime.irs import cache_points, load_cache
from arqc.runtime.irs_cache import IrsCache, image_digest
from arqc.runtime.run import CertifyResult, certify_dataset, check_comparisons, deployed_backend, format_table
from arqc.runtime.smoothing import ABSTAIN
from arqc.settings import DEFAULT_ALPHA, DEFAULT_N, DEFAULT_N0, CertifySettings, check_smoothing_args

if TYPE_CHECKING:
    from arqc.runtime.cluster import RayPool


@dataclass
class LoadedBackend:
    """A backend ready to certify, with what identifies the model behind it."""

    backend: Backend
    input_shape: tuple  # C, H, W (an ONNX dim may be None: dynamic)
    num_classes: int | None
    root: str  # fingerprint of the full-precision model this one comes from (itself when unknown)
    root_known: bool  # whether ``root`` is recorded (arqc model) rather than assumed


def load_backend(model: str | torch.nn.Module, backend: str | None = None, arch: str | None = None,
                 trust_pickle: bool = False, input_shape=None, batch: int = 400, ort_opt: str = "all",
                 threads: int | None = None) -> LoadedBackend:
    """The backend that runs MODEL: torch for checkpoints (or onnxruntime/OpenVINO on their FP32 lowering),
    onnxruntime (``backend`` "ort", the default) or OpenVINO (``backend`` "openvino") for .onnx."""
    runtime = "openvino" if backend == "openvino" else "onnxruntime"
    if isinstance(model, str) and model.endswith(".onnx"):
        if backend == "torch":
            raise ArqcError(f"{model} is an ONNX model and runs in onnxruntime or OpenVINO; drop --backend torch "
                            "(or certify the .pt checkpoint it came from)")
        if not Path(model).is_file():
            raise ArqcError(f"model file {model} does not exist; check the path")
        run = runtime_backend(runtime, model, batch_size=batch, threads=threads, ort_opt=ort_opt)
        shape, classes = _onnx_io(run)
        base = _onnx_settings(model).get("base_fingerprint")
        own = run.fingerprint()
        return LoadedBackend(run, shape, classes, base or own, base is not None)
    prep = prepare_model(model, arch, trust_pickle, input_shape)
    root = model_identity(prep.gm)
    if backend in ("ort", "openvino"):
        sim = quantize(prep, uniform(prep.gm, 32, 32), None)
        run = runtime_backend(runtime, to_onnx(sim, prep.settings(purpose="certify")), batch_size=batch,
                              threads=threads, ort_opt=ort_opt)
    else:
        if threads is not None:
            torch.set_num_threads(threads)
        run = TorchBackend(prep.gm, batch_size=batch)
    return LoadedBackend(run, prep.input_shape, prep.loaded.num_classes, root, True)


def _onnx_io(backend: OrtBackend | OpenVinoBackend) -> tuple[tuple, int | None]:
    """(C, H, W) of the input (None for a dynamic dim) and the number of classes (None when dynamic)."""
    inputs, outputs = backend.io_shapes()
    if len(inputs) != 1 or len(inputs[0]) != 4:
        raise ArqcError(f"the ONNX model takes {len(inputs)} input(s) of shape {inputs[0]}; arqc "
                        "certifies classifiers with one image input [B, C, H, W]")
    last = outputs[0][-1] if outputs[0] else None
    return tuple(inputs[0][1:]), last


def _onnx_settings(path: str) -> dict:
    """The compile settings arqc recorded in an ONNX file's metadata ({} for other files)."""
    settings = read_metadata(onnx.load(path, load_external_data=False), path).get("arqc.settings", {})
    return settings if isinstance(settings, dict) else {}


def _cache_header(path: str) -> dict:
    """The JSON header of an IRS cache file (the rest is checked by arqc.runtime.irs_cache.load_cache)."""
    if not Path(path).is_file():
        raise ArqcError(f"IRS cache {path} does not exist; build it with `arqc certify FP32_MODEL ... "
                        "--save-irs-cache PATH`")
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["header"]))
    except (OSError, ValueError, KeyError) as err:
        raise ArqcError(f"cannot read IRS cache {path} ({err}); rebuild it") from None


def open_irs_cache(path: str, loaded: LoadedBackend, model: str, sigma: float, images: ImageSet,
                   log: Log = quiet) -> IrsCache:
    """Load the cache for certifying ``loaded`` on ``images``, refusing one of another model, σ or images."""
    header = _cache_header(path)
    fingerprint = header.get("fingerprint")
    own = loaded.backend.fingerprint()
    if fingerprint not in (loaded.root, own):
        if loaded.root_known:
            raise ArqcError(f"IRS cache {path} was built for another model (fingerprint "
                            f"{str(fingerprint)[:12]}) than the one {model} derives from "
                            f"({loaded.root[:12]}); build the cache from the full-precision model this one "
                            "was made from")
        log(f"note: {model} records no origin; cannot check that it derives from the model IRS cache "
            f"{path} was built for (IRS stays sound, but an unrelated model abstains)", err=True)
    ids = [int(i) for i in images.ids]
    cache = load_cache(path, fingerprint=fingerprint, sigma=sigma, n=int(header.get("n", 0)), ids=ids)
    for image, image_id in zip(images.x.numpy(), ids, strict=True):
        if image_digest(image) != cache.point(image_id).image_sha256:
            raise ArqcError(f"image {image_id} of '{images.spec}' differs from the one IRS cache {path} was "
                            "built on; use the same data spec")
    return cache


def _id_ranges(ids: list[int]) -> str:
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def path_lines(result: CertifyResult) -> list[str]:
    """Which path (``irs``: replayed cached noise, ``full``: fresh samples) each image id took."""
    lines = []
    for path in ("irs", "full"):
        ids = [p["index"] for p in result.points if p["path"] == path]
        if ids:
            lines.append(f"path {path} ({len(ids)} points): ids {_id_ranges(ids)}")
    return lines


def certify_with_cache(backend: Backend, root: str, x: np.ndarray, y: list[int], ids: list[int], *,
                       sigma: float, n0: int, n: int, alpha: float, batch: int, seed: int,
                       progress: bool = True, pool: RayPool | None = None) -> tuple[CertifyResult, IrsCache]:
    """CERTIFY every point keeping f's class on each estimation sample (with ``pool``: on a Ray cluster): the
    result and the IRS cache (its fingerprint: ``root``, the full-precision model's)."""
    points, cached = [], []
    for one, seconds in cache_points(backend, x, y, ids, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch,
                                     seed=seed, progress=progress, pool=pool):
        cached.append(one)
        prediction = one.top_class if one.pA_lower > 0.5 else ABSTAIN
        points.append({"index": one.image_id, "label": one.label, "prediction": prediction, "radius": one.radius,
                       "pA_lower": one.pA_lower, "samples": n0 + n, "path": "full", "seconds": seconds})
    args = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed}
    result = CertifyResult.build(args, backend.name, backend.fingerprint(), points)
    return result, IrsCache(fingerprint=root, sigma=sigma, n=n, n0=n0, alpha=alpha, seed=seed, points=cached)


def resolve_args(*, sigma: float, n: int | None, n0: int | None, alpha: float | None, seed: int | None,
                 batch: int, threads: int | None, irs_cache: str | None, save_irs_cache: str | None,
                 resumable: bool) -> tuple[int, int, float, int]:
    """(n, n0, α, seed) of a certify run, defaulting to the IRS cache's or DESIGN's; one-line errors for
    settings out of range, before anything is loaded."""
    cache_header = _cache_header(irs_cache) if irs_cache else {}
    n = n if n is not None else cache_header.get("n", DEFAULT_N)
    n0 = n0 if n0 is not None else cache_header.get("n0", DEFAULT_N0)
    alpha = alpha if alpha is not None else cache_header.get("alpha", DEFAULT_ALPHA)
    seed = seed if seed is not None else cache_header.get("seed", 0)
    check_smoothing_args(sigma, n0, n, alpha)
    for name, value, low in (("--batch", batch, 1), ("--seed", seed, 0), ("--threads", threads, 1)):
        if value is not None and value < low:
            raise ArqcError(f"{name} must be at least {low}, got {value}")
    if irs_cache and save_irs_cache:
        raise ArqcError("give --irs-cache (certify against a cache) or --save-irs-cache (build one), "
                        "not both")
    if save_irs_cache and resumable:
        raise ArqcError("--save-irs-cache runs are not resumable; drop --state")
    return n, n0, alpha, seed


def certify_images(model: str | torch.nn.Module, images: ImageSet, *, sigma: float, n: int, n0: int,
                   alpha: float, seed: int, batch: int = 400, backend: str | None = None, arch: str | None = None,
                   trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None, ort_opt: str = "all",
                   threads: int | None = None, state_path: Path | None = None, irs_cache: str | None = None,
                   save_irs_cache: str | None = None, progress: bool = True, log: Log = quiet,
                   pool: RayPool | None = None) -> CertifyResult:
    """CERTIFY (Cohen et al.) every image of ``images`` with the smoothed ``model`` at noise σ (arguments as
    :func:`resolve_args` gives them): a fresh certificate, IRS against the cache file ``irs_cache``, or a fresh
    certificate that also writes the cache ``save_irs_cache``. With ``state_path`` the run resumes; with
    ``pool`` the points run on a Ray cluster (the same result)."""
    loaded = load_backend(model, backend, arch, trust_pickle, input_shape, batch, ort_opt, threads)
    check_compatible(images, loaded.input_shape, loaded.num_classes)
    name = model if isinstance(model, str) else type(model).__name__
    cache = open_irs_cache(irs_cache, loaded, name, sigma, images, log) if irs_cache else None
    x, y, ids = images.x.numpy(), [int(v) for v in images.y], [int(i) for i in images.ids]
    log(f"certifying {len(ids)} images of {images.spec} with {name} on {loaded.backend.name}: sigma={sigma} "
        f"n={n} n0={n0} alpha={alpha} seed={seed}" + (f" (IRS against {irs_cache})" if cache else "")
        + (f", on {pool.workers} Ray workers" if pool is not None else ""))
    if save_irs_cache:
        result, new_cache = certify_with_cache(loaded.backend, loaded.root, x, y, ids, sigma=sigma, n0=n0, n=n,
                                               alpha=alpha, batch=batch, seed=seed, progress=progress, pool=pool)
        new_cache.save(save_irs_cache)
        log(f"wrote IRS cache {save_irs_cache} ({len(ids)} points, n={n})")
        return result
    return _resumable(loaded.backend, x, y, ids, state_path, dict(
        sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch, seed=seed, irs_cache=cache, progress=progress,
        pool=pool), log)


def _resumable(backend: Backend, x, y, ids, state_path: Path | None, args: dict, log: Log) -> CertifyResult:
    """certify_dataset with a state file; a state file this run created is removed if the input is refused."""
    created = state_path is not None and not state_path.exists()
    done = 0 if created or state_path is None else max(len(state_path.read_bytes().splitlines()) - 1, 0)
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = certify_dataset(backend, x, y, ids, state_path=state_path, **args)
        if done:
            log(f"resumed from {state_path}: {min(done, len(ids))} of {len(ids)} points were done")
        return result
    except ArqcError:
        if created and state_path is not None:
            state_path.unlink(missing_ok=True)
        raise
    except KeyboardInterrupt:
        if state_path is not None and state_path.exists():
            done = max(len(state_path.read_bytes().splitlines()) - 1, 0)
            log(f"\n{done} of {len(ids)} points are saved in {state_path}; rerun the same command to "
                "continue", err=True)
        raise


def certify_onnx(onnx_bytes: bytes, reference: Backend | None, images: ImageSet, check: CertifySettings, *,
                 batch: int = 400, progress: bool = True, log: Log = quiet, pool: RayPool | None = None) -> dict:
    """The ONNX model's certificate in ``check.runtime`` (onnxruntime at ENABLE_ALL, the deployment level, or
    OpenVINO) on ``images``; with a ``reference`` (the torch simulation), and with ``check.compare_runtime``,
    also the rates at which they disagree on the same noisy samples, refused (ArqcError) above
    ``check.max_disagreement``.
    Returns {"certificate": CertifyResult, "runtime": str, "disagreement": dict or None,
    "runtime_comparison": dict or None}."""
    backend, comparisons = deployed_backend(onnx_bytes, check.runtime, reference, check.compare_runtime, batch)
    c = check
    x, y, ids = images.x.numpy(), [int(v) for v in images.y], [int(i) for i in images.ids]
    log(f"certifying the ONNX model in {backend.runtime} on {len(ids)} images of "
        f"{images.spec}: sigma={c.sigma} n={c.n} n0={c.n0} alpha={c.alpha} seed={c.seed}")
    certificate = certify_dataset(backend, x, y, ids, sigma=c.sigma, n0=c.n0, n=c.n, alpha=c.alpha,
                                  batch_size=batch, seed=c.seed, progress=progress, pool=pool)
    certificate.data = images.spec
    log(format_table(certificate))
    checked = check_comparisons(comparisons, c.alpha, c.max_disagreement, log)
    return {"certificate": certificate, "runtime": backend.runtime, "disagreement": checked["verification"],
            "runtime_comparison": checked["runtime_comparison"]}
