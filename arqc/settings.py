"""The typed contracts between the user surface (CLI, Python API) and the driver, each built in one place:

- :class:`CompileSettings`: how a compiled model was made; stored as ``arqc.settings`` in its ONNX metadata
  (built by :meth:`arqc.pipeline.PreparedModel.settings`, read back by :meth:`CompileSettings.from_json`).
- :class:`CertifySettings`: how ``arqc compile --sigma`` certifies (and with ``verify`` checks) the lowered
  model; checked when built.
- :class:`SearchSettings`: everything an ARQ search run depends on (``arqc compile --budget``); its fields are
  the run's resume signature and go into the metadata. Checked when built.
The certify result (:class:`arqc.runtime.run.CertifyResult`) lives beside the code that builds it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from arqc.base import ArqcError

DEFAULT_N, DEFAULT_N0, DEFAULT_ALPHA = 100_000, 100, 0.001
METHODS = ("arq", "haq", "uniform", "random", "greedy")


def check_smoothing_args(sigma: float, n0: int, n: int, alpha: float) -> None:
    """One-line errors for σ, n0, n, α out of range (before anything is loaded)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ArqcError(f"--sigma must be a positive number (noise std in [0, 1] pixel units), got {sigma}")
    if n0 < 1 or n < 1:
        raise ArqcError(f"--n0 and --n must be at least 1, got n0={n0}, n={n}")
    if not 0 < alpha < 1:
        raise ArqcError(f"--alpha must lie strictly between 0 and 1 (e.g. 0.001), got {alpha}")


CALIBRATIONS = ("minmax", "percentile", "mse")  # the same as arqc.passes.quantize.CALIBRATIONS (a test checks)
QAT_SCALES = ("fixed", "lsq")
QAT_BN = ("folded", "unfolded")  # arqc/qat.py: train folded weights as such, or as the unfolded conv's
# the default calibration of arqc compile, by measurement (bench/calibration.py; examples/results/arq_cifar10.md)
DEFAULT_CALIBRATION = "mse"


def check_quant_choices(scales: str, calibration: str, qat_scales: str = "fixed") -> None:
    """One-line errors for --scales, --calibration and --qat-scales."""
    if calibration not in CALIBRATIONS:
        raise ArqcError(f"unknown --calibration '{calibration}'; choose one of {', '.join(CALIBRATIONS)}")
    if qat_scales not in QAT_SCALES:
        raise ArqcError(f"unknown --qat-scales '{qat_scales}'; choose one of {', '.join(QAT_SCALES)}")
    if qat_scales == "lsq" and scales == "po2":
        raise ArqcError("--qat-scales lsq learns float scales; use --scales float, or --qat-scales fixed with po2")


@dataclass(frozen=True)
class CompileSettings:
    """What ``arqc.settings`` in a compiled ONNX model records: where the model came from and how it was made.

    ``source`` and ``arch`` let ``arqc certify --method ibp`` rebuild the graph; ``base_fingerprint`` is the
    full-precision model's (IRS caches of it are accepted); ``purpose`` is "deploy" for ``arqc compile``,
    "certify" for the FP32 lowering ``arqc certify --backend ort`` runs, or names the harness that made it."""

    source: str | None
    arch: str | None
    input_shape: list[int]
    num_classes: int | None
    base_fingerprint: str | None = None
    purpose: str = "deploy"
    scales: str = "float"
    calibration: str = "minmax"  # how clipping ranges were chosen (passes/quantize.py: CALIBRATIONS)
    calibration_data: str | None = None
    calibration_images: int = 0
    sigma: float | None = None
    finetune_data: str | None = None
    training: dict | None = None  # QA-IBP: the training run (epsilon, epochs, history, ...)
    search: dict | None = None  # arqc compile --budget: the SearchSettings of the run
    command: str | None = None  # the command line that made the model, when it came from the CLI

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CompileSettings:
        """Settings read back from a model's metadata (keys an older arqc did not write are left at defaults)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("source", None)
        values.setdefault("arch", None)
        values.setdefault("num_classes", None)
        if "input_shape" not in values:
            raise ArqcError("the model's arqc.settings lack its input shape; recompile it with arqc")
        return cls(**values)


@dataclass(frozen=True)
class CertifySettings:
    """How ``arqc compile --sigma`` certifies the lowered model on held-out test images (DESIGN §3), and with
    ``verify`` how far the runtime may disagree with the torch simulation (and ``compare_runtime``) on the same
    noisy samples."""

    sigma: float
    verify: bool = False
    runtime: str = "onnxruntime"  # where the certificate is computed: the runtime the model is deployed to
    compare_runtime: str | None = None  # a second runtime whose per-sample agreement is measured and checked
    num_images: int = 100
    n: int = 10_000
    n0: int = DEFAULT_N0
    alpha: float = DEFAULT_ALPHA
    max_disagreement: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        check_smoothing_args(self.sigma, self.n0, self.n, self.alpha)
        if self.num_images < 1 or self.seed < 0:
            raise ArqcError(f"--num-images must be >= 1 and --seed >= 0, got {self.num_images} and {self.seed}")
        if not 0 <= self.max_disagreement <= 1:
            raise ArqcError(f"--max-disagreement must lie in [0, 1], got {self.max_disagreement}")
        if self.compare_runtime is not None and self.compare_runtime == self.runtime:
            raise ArqcError(f"--compare-runtime {self.compare_runtime} is the --runtime itself; name the other one")


@dataclass(frozen=True)
class SearchSettings:
    """Everything an ARQ search run depends on. ``sigma``, ``n0``, ``n``, ``alpha``, ``test_images``, ``seed``,
    ``scales``, ``calib_images`` and ``calib_sigma`` are the compile command's certification and calibration
    settings (:func:`arqc.compiler.compile_model` fills them in); the rest are the search's own options."""

    method: str = "arq"
    budget: float = 0.015625
    sigma: float = 0.25
    episodes: int = 60
    warmup: int = 20
    search_images: int = 100
    cache_n: int = 2000  # FP32 samples per search image (the IRS cache)
    search_n: int = 500  # n' of the quantized model per search image and episode
    # adaptive reward precision: the refine_top best distinct candidates of a certified search are scored again
    # on refine_images more training images (after the search images) and the search returns the best of them
    # by the reward over all search_images + refine_images (0: off)
    refine_images: int = 0
    refine_top: int = 5
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    lam: float = 0.0  # weight of clean smoothed accuracy in the ARQ reward
    finetune_epochs: int = 1
    finetune_augment: str = "auto"  # QAT augmentation (arqc.augment.AUGMENTS; auto: crops and flips for colour)
    # HAQ's short fine-tune of every candidate before its reward: epochs on the --data images outside the search
    # split (0: off, the CPU default; the reward then ranks the calibrated, not yet fine-tuned, candidates)
    episode_finetune_epochs: int = 0
    lr: float = 1e-3
    test_images: int = 500
    seed: int = 0
    scales: str = "float"
    calibration: str = DEFAULT_CALIBRATION  # clipping ranges of every candidate and of the result (CALIBRATIONS)
    qat_scales: str = "fixed"  # the final QAT: "fixed" (scales as calibrated) or "lsq" (learned step sizes)
    qat_distill: float = 0.0  # weight of distillation from the FP32 model in every QAT loss (0: cross-entropy only)
    qat_bn: str = "folded"  # QAT_BN: "unfolded" trains each weight as if its folded BatchNorm were still there
    qat_scale_lr: float | None = None  # learning rate of LSQ's scales in the final QAT (None: lr)
    min_bits: int = 2
    max_bits: int = 8
    keep_first_last: bool = True  # HAQ keeps the first and last layer at 8 bits
    demo: str = "greedy"  # arq/haq: the demonstration played in the last warm-up episode ("greedy" or "none")
    # Exploration after the warm-up. With a demonstration it searches around it: σ ≈ one bit's bin, decaying;
    # without one, HAQ's 0.5 decaying by 0.99 per episode.
    explore_sigma: float = 0.15
    explore_decay: float = 0.97
    calib_images: int = 256
    calib_sigma: float | None = None  # noise on calibration images; None: σ (what the base model sees)
    batch_size: int = 400
    device: str | None = None  # torch work (QAT, fine-tunes, FP32 sampling): cpu or cuda[:N]; None: cuda if any

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ArqcError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        check_quant_choices(self.scales, self.calibration, self.qat_scales)
        if not 0.0 <= self.qat_distill <= 1.0:
            raise ArqcError(f"--qat-distill is a weight between 0 and 1, got {self.qat_distill}")
        if self.qat_bn not in QAT_BN:
            raise ArqcError(f"unknown --qat-bn '{self.qat_bn}'; choose one of {', '.join(QAT_BN)}")
        for option, rate in (("--lr", self.lr), ("--qat-scale-lr", self.qat_scale_lr)):
            if rate is not None and rate <= 0:
                raise ArqcError(f"{option} is a learning rate and must be positive, got {rate}")
        if self.episodes < 1 or self.warmup < 0 or self.search_images < 1 or self.search_n < 1 or \
                self.cache_n < self.search_n or self.finetune_epochs < 0 or self.episode_finetune_epochs < 0 or \
                self.refine_images < 0 or self.refine_top < 1:
            raise ArqcError("need --episodes >= 1, --warmup >= 0, --search-images >= 1, --finetune-epochs >= 0, "
                            "--episode-finetune-epochs >= 0, --refine-images >= 0, --refine-top >= 1 and "
                            "--search-n <= --cache-n")
