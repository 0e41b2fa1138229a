"""``arqc compile`` / ``arqc.compile``: quantize a prepared model at a fixed precision, or at the precision an ARQ
search finds under a BitOps budget, lower it to QDQ ONNX and (with certify settings) certify the exact bytes in
onnxruntime before anything is written. Returns the model and its report; writing files is the caller's."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch

from arqc.arq import Run, l2_certificate
from arqc.base import ArqcError, Log, atomic_write, quiet
from arqc.certify_l2 import certify_onnx
from arqc.certify_linf import certify_ibp, format_linf_report
from arqc.data import ImageSet, check_compatible
from arqc.passes.analysis import Profile, format_profile, profile
from arqc.passes.lower import attach, certified_bytes
from arqc.passes.meta import SEMANTICS
from arqc.passes.policy import Policy, policy_to_json
from arqc.pipeline import PreparedModel, quantize, to_onnx
from arqc.runtime.backends import TorchBackend
from arqc.runtime.layerwise import LAYERWISE_IMAGES, check_layers
from arqc.settings import DEFAULT_CALIBRATION, CertifySettings, SearchSettings

if TYPE_CHECKING:
    from arqc.runtime.cluster import RayPool


@dataclass
class CompileResult:
    """A compiled model: the ONNX model (its metadata carries the settings and, after a search, the report),
    the compile report (the JSON of ``--report``) and the per-layer profile at the compiled precision."""

    model: onnx.ModelProto
    report: dict
    profile: Profile

    def save(self, path: str | Path) -> None:
        """Write the ONNX model (atomically: a temporary file renamed into place)."""
        atomic_write(path, lambda f: f.write(self.model.SerializeToString()))

    def size_line(self) -> str:
        """The file's real size next to the theoretical one (Σ params × w_bits), and the weight containers."""
        size = self.report["file_size"]
        return (f"{size['bytes'] / 1024:.1f} KiB (weights at their bits: {size['theoretical_bytes'] / 1024:.1f} KiB; "
                f"sub-8-bit weights in {size['weight_containers']} containers)")


def file_size(model: onnx.ModelProto, prof: Profile, int4_weights: bool) -> dict:
    """What the report says of the file's size: its bytes (with the certificates' metadata), Σ params × w_bits
    / 8, and the containers of sub-8-bit weights (int8 by default: onnxruntime runs INT4 weights through float
    convolutions, bench/lowering.py)."""
    return {"bytes": model.ByteSize(), "theoretical_bytes": prof.size_bits / 8,
            "weight_containers": "INT4" if int4_weights else "int8"}


def compile_fixed(prep: PreparedModel, policy: Policy, calibration: ImageSet | None, *, calib_images: int = 512,
                  calib_sigma: float = 0.0, scales: str = "float", clipping: str = DEFAULT_CALIBRATION,
                  int4_weights: bool = False,
                  check: CertifySettings | None = None, test_images: ImageSet | None = None,
                  epsilon: float | None = None, command: str | None = None, progress: bool = True,
                  log: Log = quiet, pool: RayPool | None = None) -> CompileResult:
    """Quantize at ``policy`` (clipping ranges by ``clipping`` from ``calib_images`` calibration images with
    noise ``calib_sigma``), lower, and on ``test_images`` certify the ONNX model: in onnxruntime with randomized
    smoothing (L2) with ``check``, with interval bounds at L∞ radius ``epsilon`` when given. The certificates go
    into the report and the model's metadata. With ``pool`` the L2 certificate runs on a Ray cluster."""
    if check is not None or epsilon is not None:
        if test_images is None:
            what = "--sigma" if check is not None else "--epsilon"
            raise ArqcError(f"{what} needs --test-data SPEC: held-out test images to certify the ONNX model on")
        test_images = test_images.subset(num=check.num_images) if check is not None else test_images
        check_compatible(test_images, prep.input_shape, prep.loaded.num_classes)
        if calibration is not None and test_images.spec == calibration.spec:
            log("note: --test-data is the calibration data; report certificates on held-out images", err=True)
    settings = prep.settings(scales=scales, calibration=clipping,
                             calibration_data=calibration.spec if calibration is not None else None,
                             calibration_images=min(calib_images, len(calibration)) if calibration is not None else 0,
                             sigma=check.sigma if check is not None else None, command=command)
    sim = quantize(prep, policy, calibration, calib_images, scales, calib_sigma, clipping=clipping)
    model = to_onnx(sim, settings, int4_weights)
    prof = profile(sim)
    log(format_profile(prof))
    report = {"semantics": SEMANTICS, "method": "fixed", "policy": policy_to_json(policy),
              "settings": settings.to_json(), "bitops_ratio_fp32": prof.bitops_ratio_fp32,
              "profile": prof.to_json()}
    certificates = {}
    data = model.SerializeToString()  # the bytes every certificate is computed on
    if check is not None:  # certify (and verify) the exact bytes before anything is written
        if check.verify:
            report["layerwise"] = check_layers(sim, model, test_images.x[:LAYERWISE_IMAGES], log)
        reference = TorchBackend(sim, batch_size=400) if check.verify else None
        certified = certify_onnx(data, reference, test_images, check, progress=progress, log=log, pool=pool)
        cert = certified["certificate"]
        report |= {"certified_accuracy": cert.certified_accuracy, "acr": cert.acr, **certified,
                   "certificate": cert.to_json()}
        certificates["arqc.certificate_l2"] = l2_certificate(cert, certified["runtime"], data)
    if epsilon is not None:
        report["linf"] = certificates["arqc.certificate_linf"] = linf_certificate(sim, data, test_images, epsilon,
                                                                                  log)
    attach(model, certificates)
    report["file_size"] = file_size(model, prof, int4_weights)
    return CompileResult(model, report, prof)


def linf_certificate(sim: torch.fx.GraphModule, model: bytes, images: ImageSet, epsilon: float,
                     log: Log = quiet) -> dict:
    """The L∞ certificate of the compiled model at ``epsilon`` on ``images``: sound interval bounds on the
    simulation (the function the ONNX model computes, DESIGN §4), clean accuracy judged by onnxruntime; what the
    metadata carries (no per-point records or timings)."""
    report = certify_ibp(sim, images, epsilon, onnx_model=model, device="cpu")
    log(format_linf_report(report))
    timing = ("points", "seconds", "time_per_input_s")
    return {"kind": "L-inf, interval bounds", **{k: v for k, v in report.items() if k not in timing},
            "model_sha256": hashlib.sha256(model).hexdigest()}


def compile_searched(prep: PreparedModel, train: ImageSet, test: ImageSet, search: SearchSettings,
                     check: CertifySettings, *, calib_images: int = 256, calib_sigma: float | None = None,
                     scales: str = "float", clipping: str = DEFAULT_CALIBRATION, finetune: ImageSet | None = None,
                     epsilon: float | None = None,
                     workdir: str | Path, resume: bool = False, progress: bool = True, log: Log = quiet,
                     pool: RayPool | None = None) -> CompileResult:
    """``arqc compile --budget``: the whole ARQ pipeline (search → QAT → lower → fresh certificate of the ONNX
    model in onnxruntime on ``test``, and at L∞ radius ``epsilon`` when given). The search runs on ``train``
    (calibration images first, then the search images); its stages live in ``workdir`` so that ``resume``
    continues an interrupted run. ``search`` gives the search's own options; its certification and calibration
    fields are taken from ``check``, ``calib_images``, ``calib_sigma``, ``scales`` and ``clipping`` (the
    calibration method). With ``pool`` the FP32
    IRS cache, the candidates' rewards and the final certificates run on a Ray cluster (the same result)."""
    check_compatible(test, prep.input_shape, prep.loaded.num_classes)
    if finetune is not None:
        if finetune.spec == test.spec:
            raise ArqcError("--finetune-data is the --test-data; fine-tune on training images the certificates "
                            "never use")
        check_compatible(finetune, prep.input_shape, prep.loaded.num_classes)
    settings = replace(search, sigma=check.sigma, n0=check.n0, n=check.n, alpha=check.alpha,
                       test_images=check.num_images, seed=check.seed, scales=scales, calib_images=calib_images,
                       calib_sigma=calib_sigma, calibration=clipping)
    run = Run(prep, train, test, settings, Path(workdir), resume, progress=progress, finetune=finetune, pool=pool)
    meta = prep.settings(scales=scales, calibration=clipping, calibration_data=train.spec,
                         calibration_images=calib_images,
                         sigma=check.sigma, finetune_data=(finetune or train).spec)
    model, report, sim = run.run(meta, check)
    if epsilon is not None:
        report["linf"] = linf_certificate(sim, certified_bytes(model), run.test_set, epsilon, log)
        attach(model, {"arqc.certificate_linf": report["linf"], "arqc.report": report})
    prof = profile(prep.gm)
    report["file_size"] = file_size(model, prof, False)
    return CompileResult(model, report, prof)


def check_calibration(calib_images: int, calib_sigma: float) -> None:
    """One-line errors for calibration settings out of range (before anything is loaded)."""
    if calib_images < 1:
        raise ArqcError(f"--calib-images must be at least 1, got {calib_images}")
    if calib_sigma < 0:
        raise ArqcError(f"--calib-sigma must be >= 0, got {calib_sigma}")
