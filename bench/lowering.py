"""Is arqc's deployed model fast in onnxruntime and OpenVINO? CPU throughput of its integer-only QDQ models against
the float model and against onnxruntime's own int8 quantization of the same network, with a kernel census and file
sizes.

ResNet-20 (akamaster CIFAR-10 weights; all models run at ORT_ENABLE_ALL on the CPU execution provider):
- float:    arqc's lowering of the network at 32 bits (no Q/DQ);
- ort-int8: onnxruntime.quantization.quantize_static of that float model (QDQ, per-channel int8 weights,
  uint8 activations, MinMax calibration on the same clean training images arqc calibrates on);
- arqc W8A8 (float scales, DESIGN §2) and arqc W8A8 po2 (power-of-two scales);
- arqc W4A4, and the 1.5625 % BitOps policy of examples/results/arq_cifar10.md (its arq row: 3-5 bit layers,
  first and last at 8), with sub-8-bit weights in int8 containers (the default) and in native INT4.
MobileNetV2 (random weights, 64×64 inputs): float against arqc W8A8.
Throughput is images/s over the clean test images (random images for MobileNetV2); each timed repeat runs
every model of a network once, round-robin, so that a busy machine slows all of them alike; the median repeat
is reported. The census counts the kernels onnxruntime runs after its optimizations (integer kernels, float
Conv/Gemm left); sizes are the serialized file against Σ params × w_bits.
Every file also runs in OpenVINO's CPU plugin (extra arqc[openvino]; --no-openvino skips it), in the same
round-robin, with a census of the convolutions and fully connected layers it runs in int8.
Targets: arqc W8A8 ≥ 1.3× float and ≥ 0.95× ort-int8; the 1.5625 % policy ≥ 0.9× arqc W8A8; no float Conv or
Gemm left; MobileNetV2 arqc W8A8 ≥ 1.2× float; in OpenVINO, arqc W8A8 ≥ 1.4× float and the 1.5625 % policy
≥ 0.9× arqc W8A8.

    python bench/lowering.py [--threads 1] [--batch 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from arqc import archs
from arqc.base import ArqcError
from arqc.data import load_images
from arqc.loading import load_model
from arqc.passes.analysis import analyze, profile
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.passes.policy import apply_policy, policy_from_json, uniform
from arqc.passes.quantize import simulate
from arqc.runtime.backends import OpenVinoBackend

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# the arq row's policy at 1.5625 % (only its bits per layer are read: the run's file records the old semantics)
ARQ_POLICY = ROOT / "examples/results/arq_cifar10_runs/arq_1.5625/policy.json"


class Images(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime.quantization."""

    def __init__(self, x: np.ndarray, batch: int = 64):
        self.batches = iter([{"input": x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def arqc_onnx(gm, policy: dict, calibration: torch.Tensor, scales: str = "float",
              int4_weights: bool = False) -> tuple[bytes, float]:
    """The lowered model's bytes and its theoretical size (Σ params × w_bits, in bytes)."""
    apply_policy(gm, policy)
    sim = simulate(gm, [calibration[i:i + 128] for i in range(0, len(calibration), 128)], scales=scales)
    data = lower(sim, {"scales": scales}, int4_weights=int4_weights).SerializeToString()
    return data, profile(sim).size_bits / 8


def ort_int8(float_onnx: bytes, calibration: np.ndarray) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(float_onnx)
        quantize_static(str(src), str(dst), Images(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return dst.read_bytes()


INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearConcat", "QLinearAveragePool",
               "QLinearGlobalAveragePool", "ConvInteger", "MatMulInteger")
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def session(model: bytes, threads: int) -> tuple[ort.InferenceSession, str, int]:
    """An ENABLE_ALL session, a census of the kernels it runs, and the number of float Conv/Gemm/MatMul left."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    integer = sum(ops.count(op) for op in INTEGER_OPS)
    floats = sum(ops.count(op) for op in FLOAT_OPS)
    census = (f"{integer} integer kernels, {floats} float Conv/Gemm/MatMul, {ops.count('DequantizeLinear')} "
              "DequantizeLinear")
    return s, census, floats


def openvino_session(model: bytes, threads: int, batch: int) -> tuple[OpenVinoBackend, str, int] | None:
    """The same file in OpenVINO's CPU plugin, and a census of the convolutions and fully connected layers it
    runs in int8 and in float (from its runtime graph); None when the extra arqc[openvino] is missing."""
    try:
        backend = OpenVinoBackend(model, batch_size=batch, threads=threads)
    except ArqcError:
        return None
    kinds = []
    for op in backend.compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        if "layerType" in rt and rt["layerType"].astype(str) in ("Convolution", "FullyConnected"):
            kinds.append("I8" in rt["primitiveType"].astype(str))
    floats = kinds.count(False)
    return backend, f"{kinds.count(True)} int8 conv/FC, {floats} float conv/FC", floats


def run_all(s, x: np.ndarray, batch: int) -> np.ndarray:
    if isinstance(s, OpenVinoBackend):  # built with batch_size=batch
        return s.logits(x)
    return np.concatenate([s.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def measure(models: dict[str, tuple[bytes, float | None]], x: np.ndarray, y: np.ndarray | None,
            args) -> dict[str, float]:
    """Median images/s of each model in onnxruntime and (keys "NAME | openvino") in OpenVINO, round-robin
    repeats; prints one line per model and runtime."""
    built = {}
    for name, (data, _) in models.items():
        built[name] = session(data, args.threads)
        if not args.no_openvino and (ov := openvino_session(data, args.threads, args.batch)) is not None:
            built[f"{name} | openvino"] = ov
    accuracy = {}
    for name, (s, _, _) in built.items():  # warm-up, and a sanity check of every model
        logits = run_all(s, x, args.batch)
        accuracy[name] = float((logits.argmax(1) == y).mean()) if y is not None else float("nan")
    rates: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.repeats):
        for name, (s, _, _) in built.items():
            start = time.perf_counter()
            run_all(s, x, args.batch)
            rates[name].append(len(x) / (time.perf_counter() - start))
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, (_, census, floats) in built.items():
        data, theory = models[name.split(" | ")[0]]
        size = f"file {len(data) / 1024:.0f} KiB" + (f" (theory {theory / 1024:.0f} KiB)" if theory else "")
        acc = f"clean accuracy {100 * accuracy[name]:.1f}%; " if y is not None else ""
        runtime = "OpenVINO   " if name.endswith(" | openvino") else "onnxruntime"
        print(f"  {name.split(' | ')[0]:<38} {runtime} {median[name]:>6.0f} images/s (spread "
              f"{min(rates[name]):.0f}-{max(rates[name]):.0f}; {acc}{census}; {size})")
        if floats and not name.startswith("float"):
            print(f"    NOTE: {floats} float Conv/Gemm/MatMul left in {name}")
    return median


def target(what: str, ratio: float, goal: float) -> None:
    print(f"{what}: {ratio:.2f}x (target >= {goal}x: {'met' if ratio >= goal else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calib", type=int, default=300, help="clean training images for calibration")
    parser.add_argument("--no-openvino", action="store_true", help="onnxruntime only (skip the OpenVINO columns)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    weights = args.data / "weights/akamaster-resnet-cifar10/resnet20-12fca82f.th"
    if weights.is_file():
        model, what = load_model(str(weights), "resnet20").model, "akamaster weights"
        calib = load_images(f"npz:{args.data / 'cifar10/train_first2000_lossless.npz'}").x[:args.calib]
        test = load_images(f"npz:{args.data / 'cifar10/test_first1000_lossless.npz'}")
        x, y = test.x.numpy(), test.y.numpy()
    else:
        torch.manual_seed(0)
        model, what = archs.build("resnet20"), "random weights (shared data not found)"
        calib, x, y = torch.rand(args.calib, 3, 32, 32), torch.rand(1000, 3, 32, 32).numpy(), None
    gm = analyze(capture(model, torch.zeros(1, 3, 32, 32)))
    arq = policy_from_json(json.loads(ARQ_POLICY.read_text())["policy"])
    float_onnx = arqc_onnx(gm, uniform(gm, 32, 32), calib[:1])
    models = {
        "float (arqc, 32 bits)": float_onnx,
        "ort-int8 (quantize_static QDQ)": (ort_int8(float_onnx[0], calib.numpy()), None),
        "arqc W8A8": arqc_onnx(gm, uniform(gm, 8, 8), calib),
        "arqc W8A8 po2": arqc_onnx(gm, uniform(gm, 8, 8), calib, "po2"),
        "arqc W4A4": arqc_onnx(gm, uniform(gm, 4, 4), calib),
        "arqc 1.5625% policy (int8 containers)": arqc_onnx(gm, arq, calib),
        "arqc 1.5625% policy (INT4 weights)": arqc_onnx(gm, arq, calib, int4_weights=True),
    }
    print(f"ResNet-20 ({what}), onnxruntime {ort.__version__} CPUExecutionProvider, ORT_ENABLE_ALL, "
          f"intra-op threads {args.threads}, batch {args.batch}, {len(x)} CIFAR-10 test images per repeat, "
          f"{args.repeats} repeats (median), calibration on {len(calib)} training images")
    median = measure(models, x, y, args)
    for arqc_name in ("arqc W8A8", "arqc W8A8 po2"):
        target(f"{arqc_name} / float", median[arqc_name] / median["float (arqc, 32 bits)"], 1.3)
        target(f"{arqc_name} / ort-int8", median[arqc_name] / median["ort-int8 (quantize_static QDQ)"], 0.95)
    for containers in ("int8 containers", "INT4 weights"):
        target(f"1.5625% policy ({containers}) / arqc W8A8",
               median[f"arqc 1.5625% policy ({containers})"] / median["arqc W8A8"], 0.9)
    print(f"arqc W4A4 / float: {median['arqc W4A4'] / median['float (arqc, 32 bits)']:.2f}x")
    if "arqc W8A8 | openvino" in median:
        ov = {name.split(" | ")[0]: rate for name, rate in median.items() if name.endswith(" | openvino")}
        target("OpenVINO: arqc W8A8 / float", ov["arqc W8A8"] / ov["float (arqc, 32 bits)"], 1.4)
        target("OpenVINO: 1.5625% policy (int8 containers) / arqc W8A8",
               ov["arqc 1.5625% policy (int8 containers)"] / ov["arqc W8A8"], 0.9)
        print(f"OpenVINO: arqc W8A8 / ort-int8 in OpenVINO: "
              f"{ov['arqc W8A8'] / ov['ort-int8 (quantize_static QDQ)']:.2f}x; OpenVINO / onnxruntime on arqc W8A8: "
              f"{ov['arqc W8A8'] / median['arqc W8A8']:.2f}x")

    torch.manual_seed(0)
    mobilenet = archs.build("mobilenet_v2").eval()
    mgm = analyze(capture(mobilenet, torch.zeros(1, 3, 64, 64)))
    g = torch.Generator().manual_seed(0)
    mcalib, mx = torch.rand(128, 3, 64, 64, generator=g), torch.rand(256, 3, 64, 64, generator=g).numpy()
    print(f"MobileNetV2 (random weights), 64x64 inputs, {len(mx)} random images per repeat, same settings")
    mmedian = measure({"float (arqc, 32 bits)": arqc_onnx(mgm, uniform(mgm, 32, 32), mcalib[:1]),
                       "arqc W8A8": arqc_onnx(mgm, uniform(mgm, 8, 8), mcalib)}, mx, None, args)
    target("MobileNetV2 arqc W8A8 / float", mmedian["arqc W8A8"] / mmedian["float (arqc, 32 bits)"], 1.2)


if __name__ == "__main__":
    main()
