"""``arqc compile`` / ``arqc.compile``: quantize a prepared model at a fixed precision, or at the precision an ARQ
search finds under a BitOps budget, lower it to QDQ ONNX and (with certify settings) certify the exact bytes in
onnxruntime before anything is written. Returns the model and its report; writing files is the caller's."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from arqc.arq import Run
from arqc.base import ArqcError, Log, atomic_write, quiet
from arqc.certify_l2 import certify_onnx
from arqc.data import ImageSet, check_compatible
from arqc.passes.analysis import Profile, format_profile, profile
from arqc.passes.policy import Policy, policy_to_json
from arqc.pipeline import PreparedModel, quantize, to_onnx
from arqc.runtime.backends import TorchBackend
from arqc.settings import CertifySettings, SearchSettings


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


def compile_fixed(prep: PreparedModel, policy: Policy, calibration: ImageSet | None, *, calib_images: int = 512,
                  calib_sigma: float = 0.0, scales: str = "float", int4_weights: bool = False,
                  check: CertifySettings | None = None, test_images: ImageSet | None = None,
                  command: str | None = None, progress: bool = True, log: Log = quiet) -> CompileResult:
    """Quantize at ``policy`` (activation ranges from ``calib_images`` calibration images with noise
    ``calib_sigma``), lower, and with ``check`` certify the ONNX model on ``test_images``."""
    if check is not None:
        if test_images is None:
            raise ArqcError("--sigma needs --test-data SPEC: held-out test images to certify the ONNX model on")
        test_images = test_images.subset(num=check.num_images)
        check_compatible(test_images, prep.input_shape, prep.loaded.num_classes)
        if calibration is not None and test_images.spec == calibration.spec:
            log("note: --test-data is the calibration data; report certificates on held-out images", err=True)
    settings = prep.settings(scales=scales, calibration_data=calibration.spec if calibration is not None else None,
                             calibration_images=min(calib_images, len(calibration)) if calibration is not None else 0,
                             sigma=check.sigma if check is not None else None, command=command)
    sim = quantize(prep, policy, calibration, calib_images, scales, calib_sigma)
    model = to_onnx(sim, settings, int4_weights)
    prof = profile(sim)
    log(format_profile(prof))
    certified: dict = {}
    if check is not None:  # certify (and verify) the exact bytes before anything is written
        reference = TorchBackend(sim, batch_size=400) if check.verify else None
        certified = certify_onnx(model.SerializeToString(), reference, test_images, check, progress=progress,
                                 log=log)
    summary = {}
    if certified:
        cert = certified["certificate"]
        summary = {"certified_accuracy": cert.certified_accuracy, "acr": cert.acr}
        certified = {**certified, "certificate": cert.to_json()}
    report = {"method": "fixed", "policy": policy_to_json(policy), "settings": settings.to_json(),
              "bitops_ratio_fp32": prof.bitops_ratio_fp32, "profile": prof.to_json(), **summary, **certified}
    return CompileResult(model, report, prof)


def compile_searched(prep: PreparedModel, train: ImageSet, test: ImageSet, search: SearchSettings,
                     check: CertifySettings, *, calib_images: int = 256, calib_sigma: float | None = None,
                     scales: str = "float", finetune: ImageSet | None = None, workdir: str | Path,
                     resume: bool = False, progress: bool = True, log: Log = quiet) -> CompileResult:
    """``arqc compile --budget``: the whole ARQ pipeline (search → QAT → lower → fresh certificate of the ONNX
    model in onnxruntime on ``test``). The search runs on ``train`` (calibration images first, then the
    search images); its stages live in ``workdir`` so that ``resume`` continues an interrupted run.
    ``search`` gives the search's own options; its certification and calibration fields are taken from
    ``check``, ``calib_images``, ``calib_sigma`` and ``scales``."""
    check_compatible(test, prep.input_shape, prep.loaded.num_classes)
    if finetune is not None:
        if finetune.spec == test.spec:
            raise ArqcError("--finetune-data is the --test-data; fine-tune on training images the certificates "
                            "never use")
        check_compatible(finetune, prep.input_shape, prep.loaded.num_classes)
    settings = replace(search, sigma=check.sigma, n0=check.n0, n=check.n, alpha=check.alpha,
                       test_images=check.num_images, seed=check.seed, scales=scales, calib_images=calib_images,
                       calib_sigma=calib_sigma)
    run = Run(prep, train, test, settings, Path(workdir), resume, progress=progress, finetune=finetune)
    meta = prep.settings(scales=scales, calibration_data=train.spec, calibration_images=calib_images,
                         sigma=check.sigma, finetune_data=(finetune or train).spec)
    model, report = run.run(meta, verify=check.verify, max_disagreement=check.max_disagreement)
    return CompileResult(model, report, profile(prep.gm))


def check_calibration(calib_images: int, calib_sigma: float) -> None:
    """One-line errors for calibration settings out of range (before anything is loaded)."""
    if calib_images < 1:
        raise ArqcError(f"--calib-images must be at least 1, got {calib_images}")
    if calib_sigma < 0:
        raise ArqcError(f"--calib-sigma must be >= 0, got {calib_sigma}")
