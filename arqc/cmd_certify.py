"""``arqc certify``: randomized-smoothing L2 certificates (DESIGN §3) of a model on a labelled image set,
and the ONNX-versus-simulation check behind ``arqc compile --sigma --verify``.

Models and backends
- ``.pt``/``.pth``/``.th``/``.pt2`` files load as in ``arqc compile`` (``--arch``, ``--trust-pickle``) and are
  captured to arqc's graph (BatchNorm folded). ``--backend torch`` (the default) runs that graph in PyTorch;
  ``--backend ort`` first lowers it at FP32 with arqc's own lowering (every layer at 32 bits, the path
  ``arqc compile`` takes) and runs the ONNX model in onnxruntime.
- ``.onnx`` files run in onnxruntime (``--ort-opt``, default ``all``: the level a deployment uses). They must
  take float32 [B, C, H, W] pixels in [0, 1] and normalize inside, as arqc's lowered models do.
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
import math
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import onnx
import torch
from tqdm import tqdm

from arqc.cmd_ibp import certify_ibp_cli, ibp_options
from arqc.errors import ArqcError
from runtime.backends import OPT_LEVELS, Backend, ComparingBackend, OrtBackend, TorchBackend
from runtime.irs import build_cache, load_cache
from runtime.irs_cache import IrsCache, image_digest
from runtime.metrics import DEFAULT_RADII, summarize
from runtime.noise import NOISE_SCHEME
from runtime.run import certify_dataset, check_disagreement, format_table
from runtime.smoothing import ABSTAIN, upper_confidence_bound

DEFAULT_N, DEFAULT_N0, DEFAULT_ALPHA = 100_000, 100, 0.001


@dataclass
class LoadedBackend:
    """A backend ready to certify, with what identifies the model behind it."""

    backend: Backend
    input_shape: tuple  # C, H, W (an ONNX dim may be None: dynamic)
    num_classes: int | None
    root: str  # fingerprint of the full-precision model this one comes from (itself when unknown)
    root_known: bool  # whether ``root`` is recorded (arqc model) rather than assumed


def check_smoothing_args(sigma: float, n0: int, n: int, alpha: float) -> None:
    """One-line errors for σ, n0, n, α out of range (before anything is loaded)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ArqcError(f"--sigma must be a positive number (noise std in [0, 1] pixel units), got {sigma}")
    if n0 < 1 or n < 1:
        raise ArqcError(f"--n0 and --n must be at least 1, got n0={n0}, n={n}")
    if not 0 < alpha < 1:
        raise ArqcError(f"--alpha must lie strictly between 0 and 1 (e.g. 0.001), got {alpha}")


def model_identity(gm: torch.nn.Module) -> str:
    """The fingerprint of a captured full-precision graph (what IRS caches and compiled models record)."""
    return TorchBackend(gm, device="cpu").fingerprint()


def load_backend(model: str, backend: str | None, arch: str | None, trust_pickle: bool, input_shape,
                 batch: int, ort_opt: str, threads: int | None) -> LoadedBackend:
    """The backend that runs MODEL: torch for checkpoints (or ORT on their FP32 lowering), ORT for .onnx."""
    if model.endswith(".onnx"):
        if backend == "torch":
            raise ArqcError(f"{model} is an ONNX model and runs in onnxruntime; drop --backend torch "
                            "(or certify the .pt checkpoint it came from)")
        if not Path(model).is_file():
            raise ArqcError(f"model file {model} does not exist; check the path")
        ort_backend = OrtBackend(model, batch_size=batch, opt_level=ort_opt, intra_op_threads=threads)
        shape, classes = _onnx_io(ort_backend)
        base = _onnx_settings(model).get("base_fingerprint")
        own = ort_backend.fingerprint()
        return LoadedBackend(ort_backend, shape, classes, base or own, base is not None)
    from arqc.pipeline import prepare, quantize, to_onnx
    from passes.policy import uniform

    prep = prepare(model, arch, trust_pickle, input_shape)
    root = model_identity(prep.gm)
    if backend == "ort":
        sim = quantize(prep, uniform(prep.gm, 32, 32), None)
        settings = {"source": prep.loaded.source, "arch": prep.loaded.arch, "base_fingerprint": root,
                    "input_shape": list(prep.input_shape), "num_classes": prep.loaded.num_classes,
                    "purpose": "certify"}
        run = OrtBackend(to_onnx(sim, settings), batch_size=batch, opt_level=ort_opt,
                         intra_op_threads=threads)
    else:
        if threads is not None:
            torch.set_num_threads(threads)
        run = TorchBackend(prep.gm, batch_size=batch)
    return LoadedBackend(run, prep.input_shape, prep.loaded.num_classes, root, True)


def _onnx_io(backend: OrtBackend) -> tuple[tuple, int | None]:
    """(C, H, W) of the input (None for a dynamic dim) and the number of classes (None when dynamic)."""
    inputs, outputs = backend.session.get_inputs(), backend.session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise ArqcError(f"the ONNX model takes {len(inputs)} input(s) of shape {inputs[0].shape}; arqc "
                        "certifies classifiers with one image input [B, C, H, W]")
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape[1:])
    last = outputs[0].shape[-1] if outputs[0].shape else None
    return shape, last if isinstance(last, int) and last > 0 else None


def _onnx_settings(path: str) -> dict:
    """The compile settings arqc recorded in an ONNX file's metadata ({} for other files)."""
    from passes.lower import read_metadata

    settings = read_metadata(onnx.load(path, load_external_data=False)).get("arqc.settings", {})
    return settings if isinstance(settings, dict) else {}


def _cache_header(path: str) -> dict:
    """The JSON header of an IRS cache file (the rest is checked by runtime.irs_cache.load_cache)."""
    if not Path(path).is_file():
        raise ArqcError(f"IRS cache {path} does not exist; build it with `arqc certify FP32_MODEL ... "
                        "--save-irs-cache PATH`")
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["header"]))
    except (OSError, ValueError, KeyError) as err:
        raise ArqcError(f"cannot read IRS cache {path} ({err}); rebuild it") from None


def open_irs_cache(path: str, loaded: LoadedBackend, model: str, sigma: float, images) -> IrsCache:
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
        click.echo(f"note: {model} records no origin; cannot check that it derives from the model IRS cache "
                   f"{path} was built for (IRS stays sound, but an unrelated model abstains)", err=True)
    ids = [int(i) for i in images.ids]
    cache = load_cache(path, fingerprint=fingerprint, sigma=sigma, n=int(header.get("n", 0)), ids=ids)
    for image, image_id in zip(images.x.numpy(), ids, strict=True):
        if image_digest(image) != cache.point(image_id).image_sha256:
            raise ArqcError(f"image {image_id} of '{images.spec}' differs from the one IRS cache {path} was "
                            "built on; use the same data spec")
    return cache


def state_path_for(json_path: str | None, state: str | None) -> Path | None:
    if state is not None:
        return Path(state)
    return None if json_path is None else Path(json_path + ".state")


def _id_ranges(ids: list[int]) -> str:
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def path_lines(result: dict) -> list[str]:
    """Which path (``irs``: replayed cached noise, ``full``: fresh samples) each image id took."""
    lines = []
    for path in ("irs", "full"):
        ids = [p["index"] for p in result["points"] if p["path"] == path]
        if ids:
            lines.append(f"path {path} ({len(ids)} points): ids {_id_ranges(ids)}")
    return lines


def certify_with_cache(backend: Backend, root: str, x: np.ndarray, y: list[int], ids: list[int], *,
                       sigma: float, n0: int, n: int, alpha: float, batch: int,
                       seed: int) -> tuple[dict, IrsCache]:
    """CERTIFY every point keeping f's class on each estimation sample: the result (the same dict as
    certify_dataset's) and the IRS cache (its fingerprint: ``root``, the full-precision model's)."""
    points, cached = [], []
    for i in tqdm(range(len(ids)), desc="certify + IRS cache"):
        start = time.perf_counter()
        one = build_cache(backend, x[i : i + 1], np.array(y[i : i + 1]), ids[i : i + 1], sigma=sigma, n0=n0,
                          n=n, alpha=alpha, batch_size=batch, seed=seed).points[0]
        cached.append(one)
        prediction = one.top_class if one.pA_lower > 0.5 else ABSTAIN
        points.append({"index": ids[i], "label": y[i], "prediction": prediction, "radius": one.radius,
                       "pA_lower": one.pA_lower, "samples": n0 + n, "path": "full",
                       "seconds": time.perf_counter() - start})
    summary = summarize([(p["label"], p["prediction"], p["radius"]) for p in points], DEFAULT_RADII)
    result = {
        "sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed, "num_images": len(points),
        "backend": backend.name, "backend_fingerprint": backend.fingerprint(), "noise": NOISE_SCHEME,
        "certified_accuracy": {f"{r:.2f}": acc for r, acc in summary.certified_accuracy.items()},
        "acr": summary.acr, "abstain_rate": summary.abstain_rate, "clean_accuracy": summary.clean_accuracy,
        "time_per_point_s": float(np.mean([p["seconds"] for p in points])),
        "samples_per_point": float(n0 + n), "points": points,
    }
    return result, IrsCache(fingerprint=root, sigma=sigma, n=n, n0=n0, alpha=alpha, seed=seed, points=cached)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Labelled test images the model never saw, e.g. cifar10:DIR:test "
              "or npz:FILE (see arqc.data).")
@click.option("--sigma", type=float, help="Noise std σ in [0, 1] pixel units (--method rs).")
@click.option("--n", "n", type=int, help=f"Estimation samples per image [default: {DEFAULT_N}; with "
              "--irs-cache: the cache's n].")
@click.option("--n0", type=int, help=f"Selection samples per image [default: {DEFAULT_N0}; with --irs-cache: "
              "the cache's, unused].")
@click.option("--alpha", type=float, help=f"Failure probability α [default: {DEFAULT_ALPHA}; with "
              "--irs-cache: the cache's].")
@click.option("--num-images", type=int, help="Certify at most this many images [default: all].")
@click.option("--skip", type=int, default=1, show_default=True, help="Certify every K-th image.")
@click.option("--batch", type=int, default=400, show_default=True, help="Noisy samples per forward pass.")
@click.option("--seed", type=int, help="Run seed: a point's noise depends on it and the image id only "
              "[default: 0; with --irs-cache: the cache's, unused].")
@click.option("--backend", type=click.Choice(["torch", "ort"]),
              help="torch (default for checkpoints) or ort (onnxruntime; checkpoints are lowered at FP32).")
@click.option("--ort-opt", type=click.Choice(list(OPT_LEVELS)), default="all", show_default=True,
              help="onnxruntime graph optimization level.")
@click.option("--threads", type=int, help="CPU threads (torch, or onnxruntime's intra-op pool).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--state", "state", type=click.Path(dir_okay=False),
              help="State file for resuming [default: JSON.state beside --json, removed once the JSON is "
              "written]. A named one is kept: a later run with a larger --num-images extends it.")
@click.option("--irs-cache", type=click.Path(dir_okay=False),
              help="Certify MODEL incrementally against this cache of its full-precision model.")
@click.option("--save-irs-cache", type=click.Path(dir_okay=False),
              help="Also write an IRS cache of MODEL (certify the full-precision model with it).")
@click.option("--input-shape", help="C,H,W when the arch does not say (e.g. 3,32,32).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow a fully pickled nn.Module (runs code from the file).")
@click.option("--arch", help="Architecture for state_dict files: a built-in name or package.module:factory.")
@ibp_options
def certify(model, data, sigma, n, n0, alpha, num_images, skip, batch, seed, backend, ort_opt, threads,
            json_path, state, irs_cache, save_irs_cache, input_shape, trust_pickle, arch, method, epsilon,
            complete, timeout, bits, w_bits, a_bits, policy_path, calib_data):
    """Certify the smoothed MODEL (Cohen et al.'s CERTIFY) on --data at noise level --sigma.

    Prints a progress bar and a table of certified accuracy per radius, ACR, clean smoothed accuracy and
    abstain rate, with n, n0, alpha, sigma and the number of images. A rerun of an interrupted command with
    --json (or --state) continues where it stopped.
    """
    from arqc.cli import parse_shape, write_json
    from arqc.data import check_compatible, load_images

    if method == "ibp":
        if sigma is not None or irs_cache or save_irs_cache:
            raise ArqcError("--sigma and IRS caches belong to --method rs; --method ibp takes --epsilon")
        return certify_ibp_cli(model, data=data, epsilon=epsilon, complete=complete, timeout=timeout,
                               num_images=num_images, skip=skip, json_path=json_path, arch=arch,
                               trust_pickle=trust_pickle, input_shape=parse_shape(input_shape), bits=bits,
                               w_bits=w_bits, a_bits=a_bits, policy_path=policy_path, calib_data=calib_data)
    if sigma is None:
        raise ArqcError("--method rs needs --sigma (the noise level of the smoothed classifier)")
    if epsilon or complete or bits or w_bits or a_bits or policy_path or calib_data:
        raise ArqcError("--epsilon, --complete, --bits/--policy and --calib-data belong to --method ibp")
    cache_header = _cache_header(irs_cache) if irs_cache else {}
    n = n if n is not None else cache_header.get("n", DEFAULT_N)
    n0 = n0 if n0 is not None else cache_header.get("n0", DEFAULT_N0)
    alpha = alpha if alpha is not None else cache_header.get("alpha", DEFAULT_ALPHA)
    seed = seed if seed is not None else cache_header.get("seed", 0)
    check_smoothing_args(sigma, n0, n, alpha)
    for name, value, low in (("--num-images", num_images, 1), ("--skip", skip, 1), ("--batch", batch, 1),
                             ("--seed", seed, 0), ("--threads", threads, 1)):
        if value is not None and value < low:
            raise ArqcError(f"{name} must be at least {low}, got {value}")
    if irs_cache and save_irs_cache:
        raise ArqcError("give --irs-cache (certify against a cache) or --save-irs-cache (build one), "
                        "not both")
    if save_irs_cache and state:
        raise ArqcError("--save-irs-cache runs are not resumable; drop --state")
    state_path = None if save_irs_cache else state_path_for(json_path, state)

    images = load_images(data).subset(num=num_images, skip=skip)
    loaded = load_backend(model, backend, arch, trust_pickle, parse_shape(input_shape), batch, ort_opt,
                          threads)
    check_compatible(images, loaded.input_shape, loaded.num_classes)
    cache = open_irs_cache(irs_cache, loaded, model, sigma, images) if irs_cache else None
    x, y, ids = images.x.numpy(), [int(v) for v in images.y], [int(i) for i in images.ids]

    click.echo(f"certifying {len(ids)} images of {data} with {model} on {loaded.backend.name}: sigma={sigma} "
               f"n={n} n0={n0} alpha={alpha} seed={seed}" + (f" (IRS against {irs_cache})" if cache else ""))
    if save_irs_cache:
        result, new_cache = certify_with_cache(loaded.backend, loaded.root, x, y, ids, sigma=sigma, n0=n0,
                                               n=n, alpha=alpha, batch=batch, seed=seed)
    else:
        result = _resumable(loaded.backend, x, y, ids, state_path, dict(
            sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch, seed=seed, irs_cache=cache))
    result.update({"model": model, "data": data, "skip": skip})
    click.echo(format_table(result))
    if cache is not None:
        click.echo("\n".join(path_lines(result)))
    if save_irs_cache:
        new_cache.save(save_irs_cache)
        click.echo(f"wrote IRS cache {save_irs_cache} ({len(ids)} points, n={n})")
    if json_path:
        write_json(json_path, result)
        click.echo(f"wrote {json_path}")
    if state_path is not None and json_path and state is None:  # a --state the user named is kept
        state_path.unlink(missing_ok=True)


def _resumable(backend: Backend, x, y, ids, state_path: Path | None, args: dict) -> dict:
    """certify_dataset with a state file; a state file this run created is removed if the input is refused."""
    created = state_path is not None and not state_path.exists()
    done = 0 if created or state_path is None else max(len(state_path.read_bytes().splitlines()) - 1, 0)
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = certify_dataset(backend, x, y, ids, state_path=state_path, **args)
        if done:
            click.echo(f"resumed from {state_path}: {min(done, len(ids))} of {len(ids)} points were done")
        return result
    except ArqcError:
        if created and state_path is not None:
            state_path.unlink(missing_ok=True)
        raise
    except KeyboardInterrupt:
        if state_path is not None and state_path.exists():
            done = max(len(state_path.read_bytes().splitlines()) - 1, 0)
            click.echo(f"\n{done} of {len(ids)} points are saved in {state_path}; rerun the same command to "
                       "continue", err=True)
        raise


# --- arqc compile --sigma [--verify] ------------------------------------------------------------------------


def certify_onnx(onnx_bytes: bytes, reference: Backend | None, images, *, sigma: float, n0: int, n: int,
                 alpha: float, batch: int, seed: int, max_disagreement: float | None) -> dict:
    """The ONNX model's certificate in onnxruntime at ENABLE_ALL (the deployment level) on ``images``; with
    a ``reference`` (the torch simulation) also the rate at which the two disagree on the same noisy
    samples, refused (ArqcError) above ``max_disagreement``.
    Returns {"certificate": ..., "disagreement": ... or None}."""
    backend: Backend = OrtBackend(onnx_bytes, batch_size=batch, opt_level="all")
    if reference is not None:
        backend = ComparingBackend(backend, reference)
    x, y, ids = images.x.numpy(), [int(v) for v in images.y], [int(i) for i in images.ids]
    click.echo(f"certifying the ONNX model in onnxruntime (ENABLE_ALL) on {len(ids)} images of "
               f"{images.spec}: sigma={sigma} n={n} n0={n0} alpha={alpha} seed={seed}")
    certificate = certify_dataset(backend, x, y, ids, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch,
                                  seed=seed)
    certificate["data"] = images.spec
    click.echo(format_table(certificate))
    if reference is None:
        return {"certificate": certificate, "disagreement": None}
    k, total = backend.disagreements, backend.samples
    click.echo(f"torch simulation vs onnxruntime: {k} of {total} noisy samples disagree (rate "
               f"{k / max(total, 1):.2e}, {100 * (1 - alpha):g}% Clopper-Pearson upper bound "
               f"{upper_confidence_bound(k, total, alpha):.2e}; allowed {max_disagreement})")
    return {"certificate": certificate, "disagreement": check_disagreement(backend, alpha, max_disagreement)}


@dataclass(frozen=True)
class VerifyArgs:
    """What ``arqc compile --sigma [--verify]`` certifies the lowered model with."""

    sigma: float
    verify: bool
    test_data: str
    num_images: int
    n: int
    n0: int
    alpha: float
    max_disagreement: float
    seed: int


COMPILE_DEFAULTS = {"num_images": 100, "n": 10_000, "n0": DEFAULT_N0, "alpha": DEFAULT_ALPHA,
                    "max_disagreement": 0.01, "seed": 0}


def verify_options(f):
    """The ``arqc compile`` options that certify (and verify) the lowered model."""
    d = COMPILE_DEFAULTS
    for decorator in reversed([
        click.option("--sigma", type=float, help="Certify the ONNX model in onnxruntime at noise level σ."),
        click.option("--verify", is_flag=True, help="Also compare the ONNX model with the torch simulation "
                     "on the same noisy samples; refuse (write nothing) above --max-disagreement."),
        click.option("--test-data", help="Held-out test images for --sigma (never the calibration images)."),
        click.option("--num-images", type=int, help=f"Test images to certify [default: {d['num_images']}]."),
        click.option("--n", "n", type=int, help=f"Estimation samples per image [default: {d['n']}]."),
        click.option("--n0", type=int, help=f"Selection samples per image [default: {d['n0']}]."),
        click.option("--alpha", type=float, help=f"Failure probability [default: {d['alpha']}]."),
        click.option("--max-disagreement", type=float,
                     help="Largest allowed ONNX/torch disagreement rate "
                     f"[default: {d['max_disagreement']}]."),
        click.option("--seed", type=int, help=f"Noise seed of the certification [default: {d['seed']}]."),
    ]):
        f = decorator(f)
    return f


def verify_args(sigma: float | None, verify: bool, test_data: str | None, **given) -> VerifyArgs | None:
    """Checked settings of ``compile --sigma`` (None without --sigma); ``given``: the other options above
    (None when unset)."""
    if sigma is None:
        named = (("verify", verify or None), ("test_data", test_data), *given.items())
        extra = [name for name, value in named if value is not None]
        if extra:
            raise ArqcError(f"--{extra[0].replace('_', '-')} needs --sigma (the noise level to certify at)")
        return None
    if test_data is None:
        raise ArqcError("--sigma needs --test-data SPEC: held-out test images to certify the ONNX model on")
    values = {k: default if given.get(k) is None else given[k] for k, default in COMPILE_DEFAULTS.items()}
    args = VerifyArgs(sigma=sigma, verify=verify, test_data=test_data, **values)
    check_smoothing_args(args.sigma, args.n0, args.n, args.alpha)
    if args.num_images < 1 or args.seed < 0:
        raise ArqcError(f"--num-images must be >= 1 and --seed >= 0, got {args.num_images} and {args.seed}")
    if not 0 <= args.max_disagreement <= 1:
        raise ArqcError(f"--max-disagreement must lie in [0, 1], got {args.max_disagreement}")
    return args
