"""The driver: load → capture → analyze → (policy) → simulate → lower, as functions the CLI composes."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch
import torch.fx

from arqc.data import ImageSet, check_compatible, load_images
from arqc.errors import ArqcError
from arqc.loading import LoadedModel, load_model
from passes.analysis import analyze
from passes.capture import capture
from passes.lower import lower
from passes.policy import Policy, apply_policy
from passes.quantize import simulate


@dataclass
class Prepared:
    loaded: LoadedModel
    gm: torch.fx.GraphModule  # canonical, analyzed graph (float)
    input_shape: tuple[int, ...]


def prepare(path: str | None, arch: str | None = None, trust_pickle: bool = False,
            input_shape: tuple[int, ...] | None = None, images: ImageSet | None = None) -> Prepared:
    """Load a model and capture its analyzed graph. The input shape comes from the arch or the
    export program, else ``input_shape``, else the data's image size."""
    loaded = load_model(path, arch, trust_pickle)
    shape = loaded.input_shape or input_shape or (tuple(images.x.shape[1:]) if images is not None else None)
    if shape is None:
        raise ArqcError("the model's input shape is unknown; pass --input-shape C,H,W (e.g. 3,32,32)")
    if images is not None:
        check_compatible(images, shape, loaded.num_classes)
    gm = analyze(capture(loaded.model, torch.zeros(1, *shape)))
    return Prepared(loaded, gm, tuple(shape))


def calibration_batches(images: ImageSet, num: int, sigma: float = 0.0, seed: int = 0,
                        batch_size: int = 128) -> list[torch.Tensor]:
    """The first ``num`` images in batches, for activation ranges; with ``sigma`` > 0, each with Gaussian noise
    N(0, σ²) in pixel space (fixed seed): the inputs a smoothed classifier's base model actually sees."""
    gen = torch.Generator().manual_seed(seed)
    sub = images.subset(num=num)
    return [x + sigma * torch.randn(x.shape, generator=gen) if sigma > 0 else x for x, _ in sub.batches(batch_size)]


def needs_calibration(policy: Policy) -> bool:
    return any(a < 32 for _, a in policy.values())


def quantize(prep: Prepared, policy: Policy, calibration: ImageSet | None, num_calibration: int = 512,
             scales: str = "float", calib_sigma: float = 0.0,
             ranges: dict[str, tuple[float, float]] | None = None) -> torch.fx.GraphModule:
    """The fake-quantized simulation of the prepared graph under ``policy``, its activation ranges calibrated
    on ``num_calibration`` training images (with noise N(0, calib_sigma²) when calib_sigma > 0), or taken from
    ``ranges`` (passes/quantize.py: observed_ranges) when given."""
    apply_policy(prep.gm, policy)
    if ranges is not None:
        batches = []
    elif calibration is None:
        if needs_calibration(policy):
            raise ArqcError("quantized activations need calibration images: pass --data SPEC with clean "
                            "training images (e.g. cifar10:DIR:train)")
        batches = [torch.zeros(1, *prep.input_shape)]  # weights-only: nothing to calibrate
    else:
        batches = calibration_batches(calibration, num_calibration, calib_sigma)
    method = "minmax" + (f", noise sigma={calib_sigma:g}" if calib_sigma > 0 else "") + \
        (", po2 scales" if scales == "po2" else "")
    return simulate(prep.gm, batches, scales=scales, method=method, ranges=ranges)


def to_onnx(sim: torch.fx.GraphModule, settings: dict, int4_weights: bool = False) -> onnx.ModelProto:
    return lower(sim, settings, int4_weights=int4_weights)


def load_data(spec: str | None) -> ImageSet | None:
    return None if spec is None else load_images(spec)
