"""The public Python API; the ``arqc`` command line is a thin layer over these four functions.

    import arqc
    profile = arqc.analyze(model, input_shape=(3, 32, 32), bits=4)
    result = arqc.compile(model, (x_train, y_train), bits=8, certify=arqc.CertifySettings(sigma=0.25),
                          test_images=(x_test, y_test))
    result.save("model.onnx")
    certificate = arqc.certify("model.onnx", (x_test, y_test), sigma=0.25, n=10_000)

``model`` is an nn.Module, a torch.export program, or a model file (a state_dict with ``arch``, an arqc
checkpoint, a ``.pt2``; ``certify`` also takes ``.onnx``). Images are a data spec (``cifar10:DIR:test``), an
:class:`~arqc.data.ImageSet`, a pair (x, y) of tensors with pixels in [0, 1], or a torch Dataset of
(image, label) pairs. The functions print nothing unless given ``log`` (e.g. ``print``); errors in the input
raise :class:`~arqc.base.ArqcError` with a one-line message.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from arqc.base import ArqcError, Log, quiet
from arqc.certify_l2 import certify_images, resolve_args
from arqc.compiler import CompileResult, check_calibration, compile_fixed, compile_searched
from arqc.data import ImageSet, as_images, check_compatible, load_images, rebase_spec
from arqc.passes.analysis import Profile
from arqc.passes.analysis import profile as profile_of
from arqc.passes.policy import Policy, apply_policy
from arqc.pipeline import PreparedModel, prepare_model, resolve_policy
from arqc.reports import report_from_onnx
from arqc.runtime.cluster import RayPool, pool_for
from arqc.runtime.run import CertifyResult
from arqc.settings import DEFAULT_CALIBRATION, CertifySettings, SearchSettings, check_quant_choices

Model = str | nn.Module | torch.export.ExportedProgram
Images = str | ImageSet | tuple | torch.utils.data.Dataset


def analyze(model: Model | None = None, *, arch: str | None = None, input_shape: tuple[int, ...] | None = None,
            bits: int | None = None, w_bits: int | None = None, a_bits: int | None = None,
            policy: str | Policy | None = None, trust_pickle: bool = False) -> Profile:
    """Per-layer shapes, MACs, params and BitOps of ``model`` (or of ``arch`` with fresh weights) at the given
    precision (default: FP32)."""
    prep = prepare_model(model, arch, trust_pickle, input_shape)
    apply_policy(prep.gm, resolve_policy(prep.gm, bits, w_bits, a_bits, policy, default=32))
    return profile_of(prep.gm)


def compile(model: Model, images: Images | None = None, *, arch: str | None = None,  # noqa: A001
            input_shape: tuple[int, ...] | None = None, trust_pickle: bool = False, bits: int | None = None,
            w_bits: int | None = None, a_bits: int | None = None, policy: str | Policy | None = None,
            budget: float | None = None, search: SearchSettings | None = None,
            certify: CertifySettings | None = None, test_images: Images | None = None,
            epsilon: float | None = None, calib_images: int = 512, calib_sigma: float | None = None,
            scales: str = "float", calibration: str = DEFAULT_CALIBRATION, int4_weights: bool = False,
            finetune_images: Images | None = None,
            workdir: str | Path | None = None,
            resume: bool = False, command: str | None = None, progress: bool = False,
            log: Log = quiet, ray: str | RayPool | None = None, ray_workers: int | None = None,
            chunk: int | None = None) -> CompileResult:
    """Quantize ``model`` and lower it to a QDQ ONNX model (``result.save(path)`` writes it).

    At a fixed precision (``bits``, ``w_bits``/``a_bits`` or ``policy``), or, with ``budget`` (a share of FP32
    BitOps, e.g. 0.015625), at the precision an ARQ search finds (``search``: the search's options; it needs
    ``certify`` and ``test_images`` and keeps its stages in ``workdir``). ``images`` are clean training images
    for calibration (and for the search); clipping ranges are chosen by ``calibration`` (minmax,
    percentile or mse) on them with noise ``calib_sigma``, by default ``certify.sigma``. With ``certify``,
    the ONNX model is certified in ``certify.runtime`` (onnxruntime or openvino) on ``test_images`` (and, with
    ``certify.verify``, compared with the torch simulation, with ``certify.compare_runtime`` with a second
    runtime) before it is returned;
    with ``epsilon``, it is also certified with sound interval bounds at that L∞ radius on ``test_images``. The
    certificates go into the report and into the model's metadata. With ``ray`` (an address: "auto", "local",
    HOST:PORT, or an open :class:`~arqc.runtime.cluster.RayPool`) the randomized-smoothing work runs on a Ray
    cluster (``ray_workers`` actors, ``chunk`` points per task): the same result as a local run."""
    calib_sigma = (certify.sigma if certify is not None else 0.0) if calib_sigma is None else calib_sigma
    check_calibration(calib_images, calib_sigma)
    check_quant_choices(scales, calibration)
    train = as_images(images) if images is not None else None
    test = as_images(test_images) if test_images is not None else None
    prep = prepare_model(model, arch, trust_pickle, input_shape, train)
    train, test = recorded_images(prep, train, test, search=budget is not None, certify=certify is not None, log=log)
    if budget is None:
        if search is not None or resume or workdir is not None:
            raise ArqcError("--resume, --workdir and --html belong to a search: add --budget")
        if bits is None and w_bits is None and a_bits is None and policy is None:
            raise ArqcError("say which precision to compile to: --bits B, --w-bits/--a-bits, or --policy FILE")
        chosen = resolve_policy(prep.gm, bits, w_bits, a_bits, policy, default=32)
        with pool_for(ray if certify is not None else None, ray_workers, chunk) as pool:
            return compile_fixed(prep, chosen, train, calib_images=calib_images, calib_sigma=calib_sigma,
                                 scales=scales, clipping=calibration, int4_weights=int4_weights, check=certify,
                                 test_images=test,
                                 epsilon=epsilon, command=command, progress=progress, log=log, pool=pool)
    if bits is not None or w_bits is not None or a_bits is not None or policy is not None:
        raise ArqcError("--budget searches the precision: drop --bits/--w-bits/--a-bits/--policy")
    if certify is None or test is None:
        raise ArqcError("--budget needs --sigma S and --test-data SPEC (the search certifies at σ; the result "
                        "is certified afresh on held-out test images)")
    if workdir is None:
        raise ArqcError("a search keeps its stages in a work directory: give workdir")
    search = replace(search or SearchSettings(), budget=budget)
    with pool_for(ray, ray_workers, chunk) as pool:
        return compile_searched(prep, train, test, search, certify, calib_images=calib_images,
                                calib_sigma=calib_sigma, scales=scales, clipping=calibration,
                                finetune=as_images(finetune_images) if finetune_images is not None else None,
                                epsilon=epsilon, workdir=workdir, resume=resume, progress=progress, log=log,
                                pool=pool)


def recorded_images(prep: PreparedModel, train: ImageSet | None, test: ImageSet | None, *, search: bool,
                    certify: bool, log: Log = quiet) -> tuple[ImageSet | None, ImageSet | None]:
    """The training and test images, taken where they are not given (test images only to ``certify``) from the
    data specs an arqc checkpoint records, saying so; a search without training images, or ``certify`` without
    test images, is refused in one line naming the options to add when the model records none."""
    wanted = {"train": train is None, "test": certify and test is None}
    source = prep.loaded.source
    recorded = {role: rebase_spec(spec, Path(source).parent) for role, spec in prep.loaded.data_specs.items()}
    missing = [role for role, needed in (("train", search), ("test", certify))
               if needed and wanted[role] and role not in recorded]
    if missing:
        options = {"train": "--data TRAIN_SPEC (calibration and search images)",
                   "test": "--test-data TEST_SPEC (held-out images to certify on)"}
        raise ArqcError(f"{source} records no {' or '.join(missing)} images; add "
                        + " and ".join(options[role] for role in missing)
                        + " (checkpoints from `arqc train --test-data` record both)")
    taken = {}
    for role, want in wanted.items():
        if want and role in recorded:
            log(f"{'training' if role == 'train' else 'test'} images: {recorded[role]} (recorded in {source})")
            taken[role] = load_images(recorded[role])
    if "train" in taken:
        check_compatible(taken["train"], prep.input_shape, prep.loaded.num_classes)
    return taken.get("train", train), taken.get("test", test)


def certify(model: Model, images: Images, *, sigma: float, n: int | None = None, n0: int | None = None,
            alpha: float | None = None, seed: int | None = None, num_images: int | None = None, skip: int = 1,
            batch: int = 400, backend: str | None = None, arch: str | None = None, trust_pickle: bool = False,
            input_shape: tuple[int, ...] | None = None, ort_opt: str = "all", threads: int | None = None,
            state_path: str | Path | None = None, irs_cache: str | None = None, save_irs_cache: str | None = None,
            progress: bool = False, log: Log = quiet, ray: str | RayPool | None = None,
            ray_workers: int | None = None, chunk: int | None = None) -> CertifyResult:
    """Certify the smoothed ``model`` (Cohen et al.'s CERTIFY, DESIGN §3) on every ``skip``-th of ``images``
    (at most ``num_images``) at noise σ: n estimation and n0 selection samples per image, failure probability
    α (defaults: 100,000 / 100 / 0.001, or an IRS cache's). ``.onnx`` files run in onnxruntime, or in OpenVINO
    with ``backend="openvino"``; other models in torch, or with ``backend="ort"``/``"openvino"`` lowered at FP32
    to that runtime. With ``state_path`` the run resumes (a local run and a ``ray`` run continue each other).
    With ``ray`` (as for :func:`compile`) the points run in chunks on a Ray cluster: the same points."""
    n, n0, alpha, seed = resolve_args(sigma=sigma, n=n, n0=n0, alpha=alpha, seed=seed, batch=batch, threads=threads,
                                      irs_cache=irs_cache, save_irs_cache=save_irs_cache,
                                      resumable=state_path is not None)
    for name, value in (("--num-images", num_images), ("--skip", skip)):
        if value is not None and value < 1:
            raise ArqcError(f"{name} must be at least 1, got {value}")
    chosen = as_images(images).subset(num=num_images, skip=skip)
    with pool_for(ray, ray_workers, chunk) as pool:
        return certify_images(model, chosen, sigma=sigma, n=n, n0=n0, alpha=alpha, seed=seed, batch=batch,
                              backend=backend, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape,
                              ort_opt=ort_opt, threads=threads, state_path=Path(state_path) if state_path else None,
                              irs_cache=irs_cache, save_irs_cache=save_irs_cache, progress=progress, log=log,
                              pool=pool)


def report(model: str) -> dict:
    """The compile report stored in an ONNX model that ``arqc compile --budget`` wrote (its metadata)."""
    return report_from_onnx(model)
