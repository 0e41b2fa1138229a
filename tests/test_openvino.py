"""OpenVINO as a second runtime (runtime/backends.py: OpenVinoBackend; `arqc certify --backend openvino`,
`arqc compile --runtime openvino --compare-runtime onnxruntime`).

The oracle is the torch simulation (and onnxruntime): with po2 scales every value is exact in float32, so any
runtime that computes DESIGN §2's function gives bit-identical logits, whatever kernels it fuses; with float
scales the runtimes differ only where float rounding moves an activation across a rounding boundary. (The one
exception is the float normalization in front of the first quantizer, which OpenVINO computes with another
float32 formula: :func:`on_input_grid`.) Before the lowering read every add operand through a repeated Q → DQ
pair (passes/lower.py: add_operand), OpenVINO fused residual adds into the producing conv and skipped a
requantization: 99.2 % top-1 agreement at W8A8 po2 and 79.7 % at the 1.5625 % policy on ResNet-20, which the
po2 tests here catch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_error_line, run_cli
from onnx import TensorProto, helper, numpy_helper

from arqc.base import ArqcError
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower, read_metadata
from arqc.passes.meta import info, quantizable_nodes
from arqc.passes.policy import apply_policy, uniform
from arqc.passes.quantize import simulate
from arqc.runtime.backends import OpenVinoBackend, OrtBackend, TorchBackend, openvino_module, runtime_backend

pytest.importorskip("openvino", reason="OpenVINO is the optional extra arqc[openvino] (the README installs it)")

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
ARQ_POLICY = ROOT / "examples/results/arq_cifar10_runs/arq_1.5625/policy.json"  # the 1.5625 % arq row
SIGMA = 0.25


def policy_of(gm, name: str) -> dict:
    if name == "mixed":  # random per-layer bits in 2..8
        rng = np.random.default_rng(0)
        return {info(n).layer: (int(rng.integers(2, 9)), int(rng.integers(2, 9))) for n in quantizable_nodes(gm)}
    if name == "1.5625%":
        return {k: (v["w_bits"], v["a_bits"]) for k, v in json.loads(ARQ_POLICY.read_text())["policy"].items()}
    bits = int(name[1])
    return uniform(gm, bits, bits)


def lowered(gm, policy: str, calibration: torch.Tensor, scales: str):
    apply_policy(gm, policy_of(gm, policy))
    sim = simulate(gm, [calibration], scales=scales)
    return sim, lower(sim, {"scales": scales}).SerializeToString()


def logits(backend, x: torch.Tensor) -> np.ndarray:
    return backend.logits(x.numpy())


def on_input_grid(sim, x: torch.Tensor) -> torch.Tensor:
    """``x`` moved to the nearest inputs whose normalized values lie on the first layer's input grid.

    The one float step before the first quantizer is the model's normalization (x - mean) / std, and OpenVINO
    folds it into that QuantizeLinear (another float32 formula): a pixel within float32 rounding of a rounding
    boundary then gets the next code (measured: 2 of 300 noisy images at W8A8 po2, every other value
    bit-identical). On the grid no value is near a boundary, so what follows the input quantizer is compared
    exactly; the raw noisy inputs are compared too, with that allowance."""
    act = sim.get_submodule(quantizable_nodes(sim)[0].target).act
    mean, std = (sim.get_parameter(n) if n in dict(sim.named_parameters()) else sim.get_buffer(n)
                 for n in ("normalize.mean", "normalize.std"))
    v = (x.double() - mean.double()) / std.double()
    q = torch.clamp(torch.round(v / act.scale) + act.zero_point, act.qmin, act.qmax)
    return ((q - act.zero_point) * act.scale * std.double() + mean.double()).float()


@pytest.fixture(scope="module")
def resnet20(random_model):
    """ResNet-20 with random weights, random calibration images and noisy random inputs (no shared data needed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 3, 32, 32, generator=g)
    x = x + SIGMA * torch.randn(x.shape, generator=g)
    gm = analyze(capture(random_model("resnet20"), x[:1]))
    return gm, torch.rand(128, 3, 32, 32, generator=g), x


@pytest.fixture(scope="module")
def mobilenet(random_model):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(60, 3, 64, 64, generator=g)
    gm = analyze(capture(random_model("mobilenet_v2", (3, 64, 64)), x[:1]))
    return gm, torch.rand(64, 3, 64, 64, generator=g), x + SIGMA * torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("policy", ["W8A8", "W4A4", "mixed", "1.5625%"])
def test_po2_openvino_computes_the_simulated_function_bit_exactly(resnet20, policy):
    gm, calibration, noisy = resnet20
    sim, data = lowered(gm, policy, calibration, "po2")
    torch_backend, ov = TorchBackend(sim, device="cpu"), OpenVinoBackend(data, threads=1)
    x = on_input_grid(sim, noisy)
    ref, out = logits(torch_backend, x), logits(ov, x)
    assert np.abs(ref).max() > 0 and ref.std(0).mean() > 1e-3  # real, input-dependent logits
    assert np.array_equal(out, ref), f"max |openvino - torch| = {np.abs(out - ref).max()}"
    ref, out = logits(torch_backend, noisy), logits(ov, noisy)
    exact = float(np.all(out == ref, axis=1).mean())
    print(f"{policy} po2 noisy inputs: {100 * exact:.1f}% of images bit-identical, top-1 {agreement(out, ref)}")
    assert exact >= 0.97 and agreement(out, ref) >= 0.99


@pytest.mark.parametrize("policy", ["W8A8", "mixed"])
def test_po2_openvino_bit_exact_on_mobilenet_v2(mobilenet, policy):
    """Depthwise convs, ReLU6 clamps, signed projection outputs with odd zero points, residual adds."""
    gm, calibration, noisy = mobilenet
    sim, data = lowered(gm, policy, calibration, "po2")
    x = on_input_grid(sim, noisy)
    ref = logits(TorchBackend(sim, device="cpu"), x)
    assert np.array_equal(logits(OpenVinoBackend(data, threads=1), x), ref)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.fixture(scope="module")
def shipped_resnet20():
    """The shipped noise-trained σ = 0.25 ResNet-20: the model whose noisy samples certification queries."""
    from arqc.loading import load_model

    return load_model(str(ROOT / "examples/models/resnet20_cifar10_sigma025.pt"), "resnet20").model


@pytest.mark.parametrize("policy", ["W8A8", "W4A4", "1.5625%"])
def test_float_scales_three_runtimes_agree(shipped_resnet20, cifar_train, cifar_test, policy):
    """The same file on the lossless CIFAR-10 test images, clean and noisy (σ = 0.25), in OpenVINO, onnxruntime
    and the torch simulation: top-1 agreement >= 99 % for every pair on 500 images (bench/equivalence.py
    measures 99.5-100 % on 1,000). With float scales the runtimes round in their own float order (OpenVINO folds
    the normalization into the first QuantizeLinear and requantizes in fused post-ops), so a value within a
    float32 ulp of a rounding tie can take the next code (the next test covers the ties calibration made);
    po2 scales are exact in all three (above)."""
    clean = cifar_test.x[:500]
    g = torch.Generator().manual_seed(0)
    noisy = clean + SIGMA * torch.randn(clean.shape, generator=g)
    gm = analyze(capture(shipped_resnet20, clean[:1]))
    sim, data = lowered(gm, policy, cifar_train.x[:256], "float")
    runs = {"torch": TorchBackend(sim, device="cpu"), "onnxruntime": OrtBackend(data, intra_op_threads=1),
            "openvino": OpenVinoBackend(data, threads=1)}
    for name, x in (("clean", clean), ("noisy", noisy)):
        out = {k: logits(b, x) for k, b in runs.items()}
        pairs = {f"{a}/{b}": agreement(out[a], out[b]) for a, b in
                 (("openvino", "torch"), ("openvino", "onnxruntime"), ("onnxruntime", "torch"))}
        print(f"{policy} {name} (n={len(x)}): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in pairs.items()))
        assert min(pairs.values()) >= 0.99, (name, pairs)


def test_float_scales_off_ties_agree_on_a_model_with_close_logits(akamaster_resnet20, cifar_train, cifar_test):
    """akamaster's ResNet-20 (trained without noise: on noisy inputs its top logits are close) at uniform W4A4 with
    min/max calibration, 1,000 noisy test images: OpenVINO agreed with torch and onnxruntime on 95.6 % of them
    while the scales sat where calibration put them. Min/max maps a tensor's maximum to its last code, so values
    at half of it are ties in exact arithmetic, and all their elements rounded the other way in OpenVINO's fused
    float order. With the scales moved off ties (passes/quantize.py avoid_ties) all three agree on >= 99.5 %."""
    g = torch.Generator().manual_seed(0)
    noisy = cifar_test.x + SIGMA * torch.randn(cifar_test.x.shape, generator=g)
    gm = analyze(capture(akamaster_resnet20, noisy[:1]))
    apply_policy(gm, uniform(gm, 4, 4))
    sim = simulate(gm, [cifar_train.x[:128], cifar_train.x[128:256]], scales="float", clipping="minmax")
    assert any(m.act.method.endswith("off ties") for m in sim.modules() if getattr(m, "act", None) is not None)
    data = lower(sim, {"scales": "float"}).SerializeToString()
    out = {"torch": logits(TorchBackend(sim, device="cpu"), noisy),
           "onnxruntime": logits(OrtBackend(data, intra_op_threads=1), noisy),
           "openvino": logits(OpenVinoBackend(data, threads=1), noisy)}
    pairs = {f"{a}/{b}": agreement(out[a], out[b]) for a, b in
             (("openvino", "torch"), ("openvino", "onnxruntime"), ("onnxruntime", "torch"))}
    print("akamaster W4A4 min/max noisy (n=1000): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in pairs.items()))
    assert min(pairs.values()) >= 0.995, pairs


def test_input_quantizers_round_before_the_zero_point_in_every_runtime(resnet20):
    """ONNX's QuantizeLinear is round(x/s) + z; OpenVINO's CPU plugin rounds x/s + z in float32, so with a nonzero
    zero point a value just above a tie (k + 0.5 + 2^-19) lands on the tie z + k + 0.5 and rounds to even. The
    oracle is the spec's formula in numpy. arqc lowers a quantizer of float values with a nonzero container zero
    point as Div → Round → Mul → QuantizeLinear (passes/lower.py quantize_activation), the same function, and
    then OpenVINO, onnxruntime and the po2 simulation of a random ResNet-20 at W4A4 agree bit for bit on inputs
    whose normalized pixels are exactly such values."""
    import openvino as ov

    scale, zero = np.float32(2.0 ** -3), 136
    v = (np.arange(-8, 7) + 0.5 + 2.0 ** -19).astype(np.float32)  # exact in float32; none is a tie
    x = v * scale
    spec = np.clip(np.round(x / scale) + zero, 0, 255)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [len(x)])],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.uint8(zero), "z")])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]).SerializeToString()
    import onnxruntime as ort
    assert (ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] == spec).all()
    core = ov.Core()
    got = core.compile_model(core.read_model(data, b""), "CPU")(x)[0]
    assert (got != spec).any(), "OpenVINO now follows the spec here: the Round in front of it can go"

    gm, calibration, _ = resnet20
    apply_policy(gm, uniform(gm, 4, 4))
    sim = simulate(gm, [calibration], scales="po2")
    act = sim.get_submodule(quantizable_nodes(sim)[0].target).act
    assert act.zero_point + 128 != 0
    mean, std = (sim.get_buffer(n).double() for n in ("normalize.mean", "normalize.std"))
    g = torch.Generator().manual_seed(0)
    k = torch.randint(act.qmin - act.zero_point, act.qmax - act.zero_point, (100, 3, 32, 32), generator=g)
    inputs = (((k + 0.5 + 2.0 ** -19) * act.scale) * std + mean).float()  # normalized: just above a tie
    steps = ((inputs - mean.float()) / std.float()) / act.scale
    assert ((steps - k - 0.5 > 0) & (steps - k - 0.5 < 2.0 ** -17)).float().mean() > 0.5
    data = lower(sim, {"scales": "po2"}).SerializeToString()
    ref = logits(TorchBackend(sim, device="cpu"), inputs)
    assert np.array_equal(logits(OrtBackend(data, intra_op_threads=1), inputs), ref)
    assert np.array_equal(logits(OpenVinoBackend(data, threads=1), inputs), ref)


def test_backend_fingerprint_names_the_runtime(resnet20):
    gm, calibration, _ = resnet20
    _, data = lowered(gm, "W8A8", calibration, "po2")
    ov, ort_backend = runtime_backend("openvino", data, threads=1), runtime_backend("onnxruntime", data)
    assert ov.name == "openvino" and ov.runtime.startswith("openvino ") and "CPU plugin" in ov.runtime
    # the certificate holds for the file in this runtime: another runtime is another fingerprint
    assert ov.fingerprint() != ort_backend.fingerprint() and len(ov.fingerprint()) == 64
    assert runtime_backend("openvino", data, threads=1).fingerprint() == ov.fingerprint()
    inputs, outputs = ov.io_shapes()
    assert inputs == ort_backend.io_shapes()[0] == [[None, 3, 32, 32]] and outputs == [[None, 10]]
    with pytest.raises(ArqcError, match=r"OpenVINO cannot load the model \((?!Exception from)") as err:
        OpenVinoBackend(b"not an onnx model")  # the reason, not OpenVINO's "Exception from FILE:LINE" header
    assert "\n" not in str(err.value)
    with pytest.raises(ArqcError, match="unknown runtime 'tensorrt'"):
        runtime_backend("tensorrt", data)


def test_missing_openvino_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ArqcError, match=r"pip install 'arqc\[openvino\]'"):
        openvino_module()


# ------------------------------------------------------------------------------------------------------
# the CLI: certify in OpenVINO, compile --runtime openvino


def arqc(capsys, *args) -> tuple[int, str, str]:
    return run_cli([str(a) for a in args], capsys)


@pytest.fixture(scope="module")
def mnist_files(tmp_path_factory) -> dict:
    """A random mnist_cnn checkpoint and 3 images labelled with its clean class."""
    from arqc import archs
    from arqc.loading import save_checkpoint

    d = tmp_path_factory.mktemp("openvino")
    torch.manual_seed(0)
    net = archs.build("mnist_cnn").eval()
    save_checkpoint(d / "m.pt", net, "mnist_cnn", (1, 28, 28), 10)
    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    with torch.no_grad():
        y = net(torch.from_numpy(x[:, None] / 255).float()).argmax(1).numpy()
    np.savez(d / "d.npz", x=x, y=y)
    return {"model": d / "m.pt", "data": f"npz:{d / 'd.npz'}"}


CERT = ["--sigma", "0.25", "--n", "200", "--n0", "20", "--alpha", "0.01", "--num-images", "3"]


def test_compile_certifies_in_openvino_and_compares_runtimes(mnist_files, tmp_path, capsys):
    """compile --runtime openvino --verify --compare-runtime onnxruntime on a po2 W4A4 model: the certificate
    is OpenVINO's, recorded as such in the metadata, with no disagreement against the simulation or
    onnxruntime; `arqc certify` of the file gives the same certificate in both runtimes (the same function).
    Min/max calibration: with mse clipping OpenVINO's CPU plugin differs from the simulation on 1 of these 660
    samples, one more case of its sub-8-bit arithmetic (the OpenVINO issue, #19)."""
    out_model = tmp_path / "q.onnx"
    code, out, err = arqc(capsys, "compile", mnist_files["model"], "--bits", "4", "--scales", "po2",
                          "--calibration", "minmax", "--data",
                          mnist_files["data"], "-o", out_model, "--report", tmp_path / "r.json", "--test-data",
                          mnist_files["data"], "--runtime", "openvino", "--verify", "--compare-runtime",
                          "onnxruntime", *CERT)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["certificate"]["backend"] == "openvino" and report["runtime"].startswith("openvino ")
    for key, reference in (("disagreement", "torch simulation"), ("runtime_comparison", "onnxruntime")):
        v = report[key]
        assert v["reference"].startswith(reference) and v["runtime"].startswith("openvino")
        assert v["samples"] == 3 * 220 and v["disagreements"] == 0 and v["passed"], v
    assert "openvino" in out and "vs onnxruntime" in out
    meta = read_metadata(__import__("onnx").load(out_model))
    assert meta["arqc.certificate_l2"]["runtime"].startswith("openvino ")
    code, out, _ = arqc(capsys, "report", out_model)
    assert code == 0 and "randomized smoothing, openvino" in out and "computed on this file's bytes" in out

    results = {}
    for backend in ("openvino", "ort"):
        code, _, err = arqc(capsys, "certify", out_model, "--data", mnist_files["data"], *CERT, "--backend",
                            backend, "--json", tmp_path / f"{backend}.json")
        assert code == 0, err
        results[backend] = json.loads((tmp_path / f"{backend}.json").read_text())
    assert results["openvino"]["backend"] == "openvino" and results["ort"]["backend"] == "onnxruntime"
    strip = [{k: v for k, v in p.items() if k != "seconds"} for p in results["openvino"]["points"]]
    assert strip == [{k: v for k, v in p.items() if k != "seconds"} for p in results["ort"]["points"]]
    assert strip == [{k: v for k, v in p.items() if k != "seconds"} for p in report["certificate"]["points"]]


def test_compare_runtime_needs_another_runtime(mnist_files, tmp_path, capsys):
    code, _, err = arqc(capsys, "compile", mnist_files["model"], "--bits", "8", "--data", mnist_files["data"],
                        "-o", tmp_path / "q.onnx", "--test-data", mnist_files["data"], "--runtime", "openvino",
                        "--compare-runtime", "openvino", *CERT)
    assert_one_error_line(code, err, "--compare-runtime openvino is the --runtime itself; name the other one")
    assert list(tmp_path.iterdir()) == []
    code, _, err = arqc(capsys, "compile", mnist_files["model"], "--bits", "8", "--data", mnist_files["data"],
                        "-o", tmp_path / "q.onnx", "--runtime", "openvino")
    assert_one_error_line(code, err, "--runtime needs --sigma")
    assert list(tmp_path.iterdir()) == []
