"""The driver's steps: load → capture → analyze → (policy) → simulate → lower, as functions the API composes."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch
import torch.fx
from torch import nn

from arqc.base import ArqcError
from arqc.data import ImageSet, check_compatible, load_images
from arqc.loading import LoadedModel, load_model
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.passes.policy import Policy, apply_policy, check_bits, load_policy, uniform
from arqc.passes.quantize import Observed, simulate
from arqc.runtime.backends import TorchBackend
from arqc.settings import CompileSettings


@dataclass
class PreparedModel:
    """A loaded model and its captured, analyzed graph (float): what every command starts from."""

    loaded: LoadedModel
    gm: torch.fx.GraphModule  # canonical, analyzed graph (float)
    input_shape: tuple[int, ...]

    def __reduce__(self):
        """Pickled (for a Ray worker) as the loaded model and its input shape: unpickling captures and analyzes
        it again, since a pickled GraphModule keeps its code but not its nodes' meta."""
        return _prepared, (self.loaded, self.input_shape)

    def settings(self, **fields) -> CompileSettings:
        """The metadata settings of a model compiled from this one (``fields``: how it was compiled, and any
        field to record otherwise, e.g. ``source``)."""
        if "base_fingerprint" not in fields:  # hashing the weights is work: only when the caller gives none
            fields["base_fingerprint"] = model_identity(self.gm)
        return CompileSettings(**{"source": self.loaded.source, "arch": self.loaded.arch,
                                  "input_shape": list(self.input_shape), "num_classes": self.loaded.num_classes,
                                  **fields})


def model_identity(gm: torch.nn.Module) -> str:
    """The fingerprint of a captured full-precision graph (what IRS caches and compiled models record)."""
    return TorchBackend(gm, device="cpu").fingerprint()


def _prepared(loaded: LoadedModel, shape: tuple[int, ...]) -> PreparedModel:
    return PreparedModel(loaded, analyze(capture(loaded.model, torch.zeros(1, *shape))), tuple(shape))


def prepare_model(model: str | nn.Module | torch.export.ExportedProgram | None, arch: str | None = None,
                  trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None,
                  images: ImageSet | None = None) -> PreparedModel:
    """Load a model (a file, an nn.Module, a torch.export program, or ``arch`` with fresh weights) and capture
    its analyzed graph. The input shape comes from the arch or the export program, else ``input_shape``, else
    the data's image size."""
    if isinstance(model, nn.Module | torch.export.ExportedProgram):
        loaded = LoadedModel(model.eval() if isinstance(model, nn.Module) else model, arch, None, None,
                             f"python:{type(model).__name__}")
    else:
        loaded = load_model(model, arch, trust_pickle)
    shape = loaded.input_shape or input_shape or (tuple(images.x.shape[1:]) if images is not None else None)
    if shape is None:
        raise ArqcError("the model's input shape is unknown; pass --input-shape C,H,W (e.g. 3,32,32)")
    if images is not None:
        check_compatible(images, shape, loaded.num_classes)
    return _prepared(loaded, shape)


def resolve_policy(gm: torch.fx.GraphModule, bits: int | None = None, w_bits: int | None = None,
                   a_bits: int | None = None, policy: str | Policy | None = None, default: int = 32) -> Policy:
    """The policy the bit options ask for (uniform bits, or a policy file or dict); an unset ``w_bits`` or
    ``a_bits`` means ``default``."""
    if policy is not None and (bits or w_bits or a_bits):
        raise ArqcError("give either --policy or --bits/--w-bits/--a-bits, not both")
    if isinstance(policy, str):
        return load_policy(policy)
    if policy is not None:
        return dict(policy)
    if bits is not None and (w_bits is not None or a_bits is not None):
        raise ArqcError("give either --bits or --w-bits/--a-bits, not both")
    if bits is not None:
        w = a = check_bits(bits, "--bits")
    else:
        w = check_bits(w_bits if w_bits is not None else default, "--w-bits")
        a = check_bits(a_bits if a_bits is not None else default, "--a-bits")
    return uniform(gm, w, a)


def calibration_batches(images: ImageSet, num: int, sigma: float = 0.0, seed: int = 0,
                        batch_size: int = 128) -> list[torch.Tensor]:
    """The first ``num`` images in batches, for activation ranges; with ``sigma`` > 0, each with Gaussian noise
    N(0, σ²) in pixel space (fixed seed): the inputs a smoothed classifier's base model actually sees."""
    gen = torch.Generator().manual_seed(seed)
    sub = images.subset(num=num)
    return [x + sigma * torch.randn(x.shape, generator=gen) if sigma > 0 else x for x, _ in sub.batches(batch_size)]


def needs_calibration(policy: Policy) -> bool:
    return any(a < 32 for _, a in policy.values())


def quantize(prep: PreparedModel, policy: Policy, calibration: ImageSet | None, num_calibration: int = 512,
             scales: str = "float", calib_sigma: float = 0.0, ranges: dict[str, Observed] | None = None,
             clipping: str = "minmax") -> torch.fx.GraphModule:
    """The fake-quantized simulation of the prepared graph under ``policy``, its clipping ranges chosen by
    ``clipping`` (passes/quantize.py: CALIBRATIONS) from ``num_calibration`` training images (with noise
    N(0, calib_sigma²) when calib_sigma > 0), or from ``ranges`` (passes/quantize.py: observed_ranges)."""
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
    method = clipping + (f", noise sigma={calib_sigma:g}" if calib_sigma > 0 else "") + \
        (", po2 scales" if scales == "po2" else "")
    return simulate(prep.gm, batches, scales=scales, method=method, ranges=ranges, clipping=clipping)


def to_onnx(sim: torch.fx.GraphModule, settings: CompileSettings | None = None,
            int4_weights: bool = False) -> onnx.ModelProto:
    """The QDQ ONNX model of a simulated graph, with ``settings`` as its ``arqc.settings`` metadata."""
    return lower(sim, settings.to_json() if settings is not None else {}, int4_weights=int4_weights)


def load_data(spec: str | None) -> ImageSet | None:
    return None if spec is None else load_images(spec)
