"""How exactly onnxruntime and OpenVINO compute what arqc's torch simulation computes: the agreement table.

For each model × policy (W8A8, W4A4, random mixed bits, and for ResNet-20 the 1.5625 % BitOps policy of
examples/results/arq_cifar10.md) × scales, the simulated (fake-quantized) torch model (calibrated by
``--calibration`` on training images with N(0, σ²) noise, as ``arqc compile --sigma`` calibrates, unless
``--calib-sigma`` says otherwise) and its QDQ ONNX lowering run on the same inputs: noisy
ones (clean test image + N(0, σ²) in pixel space) and, for ResNet-20, the clean test images; onnxruntime (CPU) runs at
ORT_DISABLE_ALL and at ORT_ENABLE_ALL (fused integer kernels), OpenVINO (CPU plugin, extra arqc[openvino]) the
same file. Columns: top-1 agreement with torch, the median and max of the relative logit difference
|runtime − torch| / max_k |torch_k| (per image) over all logits, and the share of bit-identical images; then
OpenVINO's top-1 agreement with onnxruntime at ENABLE_ALL.

    python bench/equivalence.py                  # ResNet-20 (akamaster and shipped σ = 0.25) and MobileNetV2
    python bench/equivalence.py --models resnet20,resnet20_sigma025 --mbv2-size 64

ResNet-20 uses akamaster's CIFAR-10 weights (trained on clean images: on noisy inputs its top logits are close,
the hardest case for agreement) and the shipped noise-trained examples/models/resnet20_cifar10_sigma025.pt (the
inputs certification queries), with CIFAR-10 images from ../shared/data; MobileNetV2 has random weights
(BatchNorm statistics measured on the calibration images) and sees the same CIFAR images resized.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from arqc import archs
from arqc.base import ArqcError
from arqc.data import load_images
from arqc.loading import load_model
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.passes.meta import info, quantizable_nodes
from arqc.passes.policy import apply_policy, policy_from_json, uniform
from arqc.passes.quantize import simulate
from arqc.runtime.backends import OpenVinoBackend
from arqc.settings import CALIBRATIONS, DEFAULT_CALIBRATION

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ARQ_POLICY = Path(__file__).resolve().parents[1] / "examples/results/arq_cifar10_runs/arq_1.5625/policy.json"
SHIPPED = Path(__file__).resolve().parents[1] / "examples/models/resnet20_cifar10_sigma025.pt"
LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def mixed_policy(gm: torch.fx.GraphModule, seed: int = 0) -> dict[str, tuple[int, int]]:
    """Random per-layer (w_bits, a_bits) in 2..8."""
    rng = np.random.default_rng(seed)
    return {info(n).layer: (int(rng.integers(2, 9)), int(rng.integers(2, 9))) for n in quantizable_nodes(gm)}


def ort_logits(onnx_bytes: bytes, x: np.ndarray, level: str, threads: int, batch: int = 250) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def openvino_logits(onnx_bytes: bytes, x: np.ndarray, threads: int) -> np.ndarray | None:
    """OpenVINO's CPU plugin on the same file (None when the extra arqc[openvino] is not installed)."""
    try:
        return OpenVinoBackend(onnx_bytes, batch_size=250, threads=threads).logits(x)
    except ArqcError:
        return None


def torch_logits(model, x: torch.Tensor, batch: int = 250) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def compare(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    """Top-1 agreement, median and max relative logit difference."""
    rel = np.abs(out - ref) / np.abs(ref).max(axis=1, keepdims=True)
    return float((out.argmax(1) == ref.argmax(1)).mean()), float(np.median(rel)), float(rel.max())


def settle_batchnorm(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Random BatchNorm affine parameters and running statistics measured on ``images`` (see tests)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def setups(args) -> list[tuple[str, torch.nn.Module, torch.Tensor, dict[str, torch.Tensor]]]:
    """(label, model, calibration images, {"noisy": inputs[, "clean": inputs]}) per model."""
    train = load_images(f"npz:{args.data / 'cifar10/train_first2000_lossless.npz'}").x[:args.calib]
    test = load_images(f"npz:{args.data / 'cifar10/test_first1000_lossless.npz'}").x
    g = torch.Generator().manual_seed(0)
    out = []
    if "resnet20" in args.models.split(","):
        weights = args.data / "weights/akamaster-resnet-cifar10/resnet20-12fca82f.th"
        model = load_model(str(weights), "resnet20").model
        x = test[:args.n] + args.sigma * torch.randn(test[:args.n].shape, generator=g)
        out.append(("ResNet-20 (akamaster) 32x32", model, train, {"noisy": x, "clean": test[:args.n]}))
    if "resnet20_sigma025" in args.models.split(","):  # the shipped noise-trained model: what certification runs
        model = load_model(str(SHIPPED), "resnet20").model
        x = test[:args.n] + args.sigma * torch.randn(test[:args.n].shape, generator=g)
        out.append(("ResNet-20 (shipped, sigma 0.25)", model, train, {"noisy": x, "clean": test[:args.n]}))
    if "mobilenet_v2" in args.models.split(","):
        size = args.mbv2_size
        calib = F.interpolate(train, size=(size, size), mode="bilinear", align_corners=False)
        clean = F.interpolate(test[:args.mbv2_n], size=(size, size), mode="bilinear", align_corners=False)
        torch.manual_seed(0)
        model = settle_batchnorm(archs.build("mobilenet_v2"), calib[:64])
        x = clean + args.sigma * torch.randn(clean.shape, generator=g)
        out.append((f"MobileNetV2 (random) {size}x{size}", model, calib, {"noisy": x}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--n", type=int, default=1000, help="noisy inputs for ResNet-20")
    parser.add_argument("--mbv2-n", type=int, default=1000, help="noisy inputs for MobileNetV2")
    parser.add_argument("--mbv2-size", type=int, default=224, help="MobileNetV2 input resolution")
    parser.add_argument("--calib", type=int, default=256, help="calibration images (clean training images)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--calibration", choices=CALIBRATIONS, default=DEFAULT_CALIBRATION,
                        help="how clipping ranges are chosen (arqc compile's default unless given)")
    parser.add_argument("--calib-sigma", type=float, default=None,
                        help="noise on the calibration images (default: --sigma, as arqc compile --sigma does)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--models", default="resnet20,resnet20_sigma025,mobilenet_v2",
                        help="comma-separated: resnet20 (akamaster), resnet20_sigma025 (shipped), mobilenet_v2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calib_sigma = args.sigma if args.calib_sigma is None else args.calib_sigma
    print(f"onnxruntime {ort.__version__} CPU, torch {torch.__version__}, sigma={args.sigma} (pixel space), "
          f"calibration: {args.calibration} on {args.calib} CIFAR-10 training images with noise sigma={calib_sigma:g}, "
          f"threads={args.threads}")
    print("rel = |runtime - torch| / max_k |torch_k| per image, over all logits; agree = top-1 agreement with the "
          "torch simulation; exact = images whose logits are bit-identical to it")
    head = (f"{'model':<31} {'policy':<7} {'scales':<6} {'inputs':<6} {'runtime':<13} {'n':>5} {'agree':>8} "
            f"{'median rel':>11} {'max rel':>9} {'exact':>7}")
    print(head)
    print("-" * len(head))
    for label, model, calib, inputs in setups(args):
        gm = analyze(capture(model, inputs["noisy"][:1]))
        calib = calib + calib_sigma * torch.randn(calib.shape, generator=torch.Generator().manual_seed(1))
        policies = {"W8A8": uniform(gm, 8, 8), "W4A4": uniform(gm, 4, 4), "mixed": mixed_policy(gm)}
        if label.startswith("ResNet-20"):  # the 1.5625 % BitOps policy of examples/results (its bits only)
            saved = json.loads(ARQ_POLICY.read_text())["policy"]
            policies["1.56%"] = policy_from_json(saved)
        for pname, policy in policies.items():
            apply_policy(gm, policy)
            for scales in ("float", "po2"):
                start = time.perf_counter()
                sim = simulate(gm, [calib[i:i + 128] for i in range(0, len(calib), 128)], scales=scales,
                               clipping=args.calibration)
                onnx_bytes = lower(sim, {}).SerializeToString()
                for kind, x in inputs.items():
                    ref = torch_logits(sim, x)
                    runs = {f"ORT {level}": ort_logits(onnx_bytes, x.numpy(), level, args.threads) for level in LEVELS}
                    runs["OpenVINO"] = openvino_logits(onnx_bytes, x.numpy(), args.threads)
                    for runtime, out in runs.items():
                        if out is None:
                            print(f"{label:<31} {pname:<7} {scales:<6} {kind:<6} {runtime:<13} (not installed)")
                            continue
                        agree, med, mx = compare(ref, out)
                        exact = float(np.all(out == ref, axis=1).mean())
                        print(f"{label:<31} {pname:<7} {scales:<6} {kind:<6} {runtime:<13} {len(x):>5} "
                              f"{100 * agree:>7.1f}% {med:>11.1e} {mx:>9.1e} {100 * exact:>6.1f}%", flush=True)
                    if runs["OpenVINO"] is not None:
                        agree = float((runs["OpenVINO"].argmax(1) == runs["ORT all"].argmax(1)).mean())
                        print(f"{'':<31} OpenVINO vs ORT all ({kind}): top-1 agreement {100 * agree:.1f}%")
                print(f"{'':<31} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
