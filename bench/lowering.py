"""Is arqc's W8A8 ONNX fast in onnxruntime? CPU throughput against the float model and against
onnxruntime's own int8 quantization of the same network.

Models (all run at ORT_ENABLE_ALL on the CPU execution provider):
- float:   arqc's lowering of the network at 32 bits (no Q/DQ);
- ort-int8: onnxruntime.quantization.quantize_static of that float model (QDQ, per-channel int8 weights,
  uint8 activations, MinMax calibration on the same clean training images arqc calibrates on);
- arqc W8A8 (float scales, DESIGN §2) and arqc W8A8 po2 (power-of-two scales);
- arqc W4A4 (no target: the sub-8-bit path, as most search policies use it; its activations are clamped to
  the 4-bit grid after QuantizeLinear, in the integer domain).
Throughput is images/s over the clean test images; each timed repeat runs every model once, round-robin,
so that a busy machine slows all of them alike; the median repeat is reported.
Targets: arqc W8A8 ≥ 1.3× float and ≥ 0.95× ort-int8.

    python bench/lowering.py [--threads 1] [--batch 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
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
from arqc.data import load_images
from arqc.loading import load_model
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.passes.policy import apply_policy, uniform
from arqc.passes.quantize import simulate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class Images(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime.quantization."""

    def __init__(self, x: np.ndarray, batch: int = 64):
        self.batches = iter([{"input": x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def arqc_onnx(gm, bits: int, calibration: torch.Tensor, scales: str) -> bytes:
    apply_policy(gm, uniform(gm, bits, bits))
    sim = simulate(gm, [calibration[i:i + 128] for i in range(0, len(calibration), 128)], scales=scales)
    return lower(sim, {"scales": scales}).SerializeToString()


def ort_int8(float_onnx: bytes, calibration: np.ndarray) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(float_onnx)
        quantize_static(str(src), str(dst), Images(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return dst.read_bytes()


INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "ConvInteger", "MatMulInteger")


def session(model: bytes, threads: int) -> tuple[ort.InferenceSession, str]:
    """An ENABLE_ALL session, and a census of the kernels it runs (integer ops and float convolutions)."""
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
    census = (f"{integer} integer kernels, {ops.count('FusedConv') + ops.count('Conv')} float convs, "
              f"{ops.count('DequantizeLinear')} DequantizeLinear")
    return s, census


def run_all(s: ort.InferenceSession, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([s.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calib", type=int, default=300, help="clean training images for calibration")
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
    float_onnx = arqc_onnx(gm, 32, calib[:1], "float")
    models = {
        "float (arqc, 32 bits)": float_onnx,
        "ort-int8 (quantize_static QDQ)": ort_int8(float_onnx, calib.numpy()),
        "arqc W8A8": arqc_onnx(gm, 8, calib, "float"),
        "arqc W8A8 po2": arqc_onnx(gm, 8, calib, "po2"),
        "arqc W4A4": arqc_onnx(gm, 4, calib, "float"),
    }
    built = {name: session(m, args.threads) for name, m in models.items()}
    sessions = {name: s for name, (s, _) in built.items()}
    print(f"ResNet-20 ({what}), onnxruntime {ort.__version__} CPUExecutionProvider, ORT_ENABLE_ALL, "
          f"intra-op threads {args.threads}, batch {args.batch}, {len(x)} CIFAR-10 test images per repeat, "
          f"{args.repeats} repeats (median), calibration on {len(calib)} training images")
    accuracy = {}
    for name, s in sessions.items():  # warm-up, and a sanity check of every model
        logits = run_all(s, x, args.batch)
        accuracy[name] = float((logits.argmax(1) == y).mean()) if y is not None else float("nan")
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            run_all(s, x, args.batch)
            rates[name].append(len(x) / (time.perf_counter() - start))
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name in sessions:
        spread = f"{min(rates[name]):.0f}-{max(rates[name]):.0f}"
        print(f"  {name:<31} {median[name]:>6.0f} images/s (spread {spread}; "
              f"clean accuracy {100 * accuracy[name]:.1f}%; {built[name][1]})")
    for arqc_name in ("arqc W8A8", "arqc W8A8 po2"):
        for base, target in (("float (arqc, 32 bits)", 1.3), ("ort-int8 (quantize_static QDQ)", 0.95)):
            ratio = median[arqc_name] / median[base]
            verdict = "met" if ratio >= target else "NOT met"
            print(f"{arqc_name} / {base}: {ratio:.2f}x (target >= {target}x: {verdict})")
    print(f"arqc W4A4 / float (arqc, 32 bits): {median['arqc W4A4'] / median['float (arqc, 32 bits)']:.2f}x")


if __name__ == "__main__":
    main()
