"""Lowering (passes/lower.py): the QDQ ONNX model computes what the torch simulation computes.

onnxruntime (CPU) runs every model at ORT_DISABLE_ALL (the QDQ graph as written) and at ORT_ENABLE_ALL
(QDQ fused into integer kernels), on noisy inputs: clean image + N(0, 0.25²) in pixel space.
- po2 scales: every value is exact in float32, so ORT and torch are bit-identical.
- float scales (DESIGN §2): summation order moves rare activations across a rounding boundary; most logits
  are identical up to float rounding, a few images differ by a quantization step somewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import nn

from arqc.base import ArqcError
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import METADATA_KEYS, lower, read_metadata
from arqc.passes.meta import info, quantizable_nodes
from arqc.passes.policy import apply_policy, current_policy, uniform
from arqc.passes.quantize import QuantLayer, simulate

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA = 0.25
N_RESNET20 = 1000
N_MOBILENET = 100  # MobileNetV2 at 64x64: its torch simulation is the slow part of this file
LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
POLICIES = ("W8A8", "W4A4", "mixed")
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm"}


@dataclass
class Case:
    name: str
    gm: torch.fx.GraphModule  # analyzed float graph
    calibration: list[torch.Tensor]
    x: torch.Tensor  # noisy inputs
    trained: bool  # real weights (decides what float-scale agreement to expect)
    results: dict = field(default_factory=dict)


def make_policy(gm: torch.fx.GraphModule, name: str) -> dict[str, tuple[int, int]]:
    if name == "mixed":  # random per-layer bits in 2..8
        rng = np.random.default_rng(0)
        return {info(n).layer: (int(rng.integers(2, 9)), int(rng.integers(2, 9)))
                for n in quantizable_nodes(gm)}
    bits = int(name[1])
    return uniform(gm, bits, bits)


def session(model: onnx.ModelProto | bytes, level: str, optimized_path=None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # no warning about saving an NCHWc-optimized model
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def ort_logits(model, x: torch.Tensor, level: str) -> np.ndarray:
    return session(model, level).run(None, {"input": x.numpy()})[0]


def torch_logits(sim, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([sim(x[i:i + 250]) for i in range(0, len(x), 250)]).numpy()


def compare(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    """Top-1 agreement, median and max of |out − ref| / max_k |ref_k| (per image) over all logits."""
    rel = np.abs(out - ref) / np.abs(ref).max(axis=1, keepdims=True)
    return float((out.argmax(1) == ref.argmax(1)).mean()), float(np.median(rel)), float(rel.max())


def compiled(case: Case, policy: str, scales: str):
    """(simulation, ONNX model, torch logits, {level: ORT logits}), computed once per module."""
    key = (policy, scales)
    if key not in case.results:
        apply_policy(case.gm, make_policy(case.gm, policy))
        sim = simulate(case.gm, case.calibration, scales=scales)
        model = lower(sim, {"scales": scales, "test": case.name})
        ref = torch_logits(sim, case.x)
        data = model.SerializeToString()
        case.results[key] = (sim, model, ref, {level: ort_logits(data, case.x, level) for level in LEVELS})
    return case.results[key]


def _optional(request, fixture: str):
    try:
        return request.getfixturevalue(fixture)
    except pytest.skip.Exception:  # shared data absent: fall back to random weights and images
        return None


@pytest.fixture(scope="module")
def resnet20_case(request, random_model) -> Case:
    model = _optional(request, "akamaster_resnet20")
    train, test = _optional(request, "cifar_train"), _optional(request, "cifar_test")
    g = torch.Generator().manual_seed(0)
    if train is None or test is None:
        clean = torch.rand(N_RESNET20, 3, 32, 32, generator=g)
        calibration = torch.rand(256, 3, 32, 32, generator=g)
    else:
        clean, calibration = test.x[:N_RESNET20], train.x[:256]
    trained = model is not None and train is not None
    if model is None:
        model = random_model("resnet20")
    x = clean + SIGMA * torch.randn(clean.shape, generator=g)
    gm = analyze(capture(model, x[:1]))
    return Case("resnet20", gm, [calibration[:128], calibration[128:]], x, trained)


@pytest.fixture(scope="module")
def mobilenet_case(random_model) -> Case:
    g = torch.Generator().manual_seed(1)
    model = random_model("mobilenet_v2", (3, 64, 64))
    x = torch.rand(N_MOBILENET, 3, 64, 64, generator=g)
    x = x + SIGMA * torch.randn(x.shape, generator=g)
    gm = analyze(capture(model, x[:1]))
    return Case("mobilenet_v2", gm, [torch.rand(64, 3, 64, 64, generator=g)], x, trained=False)


@pytest.fixture(scope="module", params=["resnet20", "mobilenet_v2"])
def case(request) -> Case:
    names = {"resnet20": "resnet20_case", "mobilenet_v2": "mobilenet_case"}
    return request.getfixturevalue(names[request.param])


# ------------------------------------------------------------------------------------------------------
# ORT computes the simulated function


@pytest.mark.parametrize("policy", POLICIES)
def test_po2_scales_are_bit_exact(case, policy):
    _, _, ref, outs = compiled(case, policy, "po2")
    assert np.abs(ref).max() > 0 and ref.std(0).mean() > 1e-3  # real, input-dependent logits
    for level, out in outs.items():
        diff = np.abs(out - ref).max()
        print(f"{case.name} {policy} po2 {level}: n={len(ref)} max |diff| = {diff}")
        assert diff == 0, f"{level}: max |ort - torch| = {diff}"


@pytest.mark.parametrize("policy", POLICIES)
def test_float_scales_agree(case, policy):
    _, _, ref, outs = compiled(case, policy, "float")
    for level, out in outs.items():
        agree, median, worst = compare(ref, out)
        exact = float((np.abs(out - ref).max(1) <= 1e-5 * np.abs(ref).max(1)).mean())
        print(f"{case.name} {policy} float {level}: n={len(ref)} agreement {100 * agree:.1f}%, "
              f"relative logit diff median {median:.1e} max {worst:.1e}; {100 * exact:.0f}% of images exact")
        if case.trained:  # measured: agreement 99.6-100%, median 1e-8..1e-7, max 0.03-0.23
            assert agree >= 0.99
            assert median <= 1e-5  # identical up to float rounding; a wrong scale or zero point moves all
            assert worst <= 0.5  # a flipped activation moves a logit by about one step of a later layer
        elif level == "disable":
            # random weights put logits close together and amplify a flipped activation (torch against
            # itself with another convolution algorithm agrees no better), so top-1 agreement says little;
            # most images must still come out identical up to float rounding
            assert median <= 1e-5 and exact >= 0.5
        else:
            # fused integer kernels requantize with one combined multiplier: more boundary flips, which
            # random MobileNetV2 amplifies (measured 89.5% agreement, median 2.5e-3 at W8A8)
            assert agree >= 0.8


# ------------------------------------------------------------------------------------------------------
# What the ONNX file holds


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _layer_inputs(model: onnx.ModelProto, layer_node: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == layer_node and n.op_type in ("Conv", "Gemm"))


def test_checker_and_metadata(resnet20_case):
    sim, model, _, _ = compiled(resnet20_case, "mixed", "float")
    onnx.checker.check_model(model, full_check=True)
    meta = read_metadata(model)
    assert set(METADATA_KEYS) <= set(meta)
    assert meta["arqc.settings"] == {"scales": "float", "test": "resnet20"}
    policy = current_policy(sim)
    assert {k: (v["w_bits"], v["a_bits"]) for k, v in meta["arqc.policy"].items()} == policy
    assert len(set(policy.values())) > 5  # the mixed policy really is mixed
    for node in quantizable_nodes(sim):
        layer = info(node).layer
        assert meta["arqc.calibration"][layer] == vars(info(node).act)
        assert meta["arqc.layers"][layer] == node.name


def test_weights_are_integers_in_the_b_bit_range(resnet20_case):
    sim, model, _, _ = compiled(resnet20_case, "mixed", "float")
    inits = _initializers(model)
    for node in quantizable_nodes(sim):
        m: QuantLayer = sim.get_submodule(node.target)
        qmax = 2 ** (m.w_bits - 1) - 1
        w = inits[f"{node.name}_weight_int{m.w_bits}"]
        assert w.dtype == np.int8 and w.shape == tuple(m.weight.shape)
        assert -qmax <= w.min() and w.max() <= qmax and w.max() == qmax  # symmetric max scaling
        scale = inits[f"{node.name}_weight_scale"]
        assert np.array_equal(scale, m.weight_scale().flatten().numpy())
        assert np.array_equal(w * scale.reshape((-1,) + (1,) * (w.ndim - 1)),
                              m.effective_weight().detach().numpy())
        bias = inits[f"{node.name}_bias_int32"]
        assert bias.dtype == np.int32


def test_sub_8_bit_activations_are_clipped_to_their_grid(resnet20_case):
    sim, model, _, _ = compiled(resnet20_case, "mixed", "float")
    producers, inits = _producers(model), _initializers(model)
    seen = set()
    for node in quantizable_nodes(sim):
        act = info(node).act
        dq = producers[_layer_inputs(model, node.name).input[0]]
        assert dq.op_type == "DequantizeLinear"
        between = producers[dq.input[0]]  # QuantizeLinear, or the integer Clip behind it below 8 bits
        q = producers[between.input[0]] if between.op_type == "Clip" else between
        assert q.op_type == "QuantizeLinear"
        scale, zero = float(inits[q.input[1]]), inits[q.input[2]]
        assert scale == np.float32(act.scale)
        assert zero.dtype == (np.int8 if act.signed else np.uint8) and int(zero) == act.zero_point
        assert act.signed == (not info(node.args[0]).nonneg)
        if act.bits == 8:  # QuantizeLinear saturates at 8 bits by itself
            assert between is q
            continue
        assert between.op_type == "Clip", node.name
        lo, hi = inits[between.input[1]], inits[between.input[2]]
        assert lo.dtype == hi.dtype == zero.dtype  # in the integer domain, on the b-bit grid
        assert (int(lo), int(hi)) == (act.qmin, act.qmax)
        assert act.qmax - act.qmin == 2**act.bits - 1
        seen.add(act.bits)
    assert seen >= {2, 3, 4}


@pytest.mark.parametrize("policy", POLICIES)
def test_enable_all_runs_integer_kernels(resnet20_case, policy, tmp_path):
    _, model, _, _ = compiled(resnet20_case, policy, "float")
    path = tmp_path / "optimized.onnx"
    session(model, "all", path)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    integer = [op for op in ops if op in INTEGER_OPS]
    print(f"{policy} ORT_ENABLE_ALL: {len(integer)} integer kernels ({sorted(set(integer))}); "
          f"{ops.count('FusedConv') + ops.count('Conv')} float convolutions")
    # conv layers whose output feeds the next quantizer directly (conv → relu → Q) fuse to QLinearConv at
    # every bit width (below 8 bits the clamp to the b-bit grid sits after Q, in the integer domain);
    # ResNet-20 has 9 of them, and the classifier becomes QGemm
    assert ops.count("QLinearConv") >= 9 and len(integer) >= 10


def test_int4_weight_containers(resnet20_case):
    for scales in ("po2", "float"):
        sim, model8, ref, outs8 = compiled(resnet20_case, "mixed", scales)
        model4 = lower(sim, {}, int4_weights=True)
        onnx.checker.check_model(model4, full_check=True)
        types = {t.name: t.data_type for t in model4.graph.initializer}
        for node in quantizable_nodes(sim):
            w_bits = sim.get_submodule(node.target).w_bits
            if w_bits <= 4:  # 2..4-bit weights share the native INT4 container
                assert types[f"{node.name}_weight_int4"] == TensorProto.INT4
            else:
                assert types[f"{node.name}_weight_int{w_bits}"] == TensorProto.INT8
        assert model4.ByteSize() < model8.ByteSize()
        x = resnet20_case.x[:200]
        for level in LEVELS:
            out4 = ort_logits(model4, x, level)
            assert np.array_equal(out4, outs8[level][:200]), level
            if scales == "po2":
                assert np.array_equal(out4, ref[:200])


class AllOps(nn.Module):
    """Every registry op that the archs above do not use, lowered and checked bit-exactly at po2 scales."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.fc = nn.Linear(16 * 2 * 2, 5)

    def forward(self, x):
        x = F.relu6(self.conv(x * 2.0 - 0.5))
        a = F.max_pool2d(x, 3, stride=2, padding=1)
        b = F.avg_pool2d(self.dw(x), 1) - 0.25
        x = torch.cat([a, torch.clamp(b, -1.0, 3.0)], 1)
        x = F.pad(x[:, :, ::2, 1::2], (1, 1, 0, 2), value=0.0) / 2.0  # 2x2 -> 4x4
        x = F.adaptive_avg_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


def test_uneven_adaptive_pool_is_a_user_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2)).eval()
    gm = analyze(capture(model, torch.zeros(1, 3, 3, 3)))
    with pytest.raises(ArqcError, match="cannot lower node .*3x3 -> 2x2"):
        lower(simulate(gm, [torch.zeros(1, 3, 3, 3)]), {})


@pytest.mark.parametrize("bits", [8, 3])
def test_every_op_lowers_exactly(bits):
    torch.manual_seed(0)
    model = AllOps().eval()
    x = torch.rand(64, 3, 8, 8) + SIGMA * torch.randn(64, 3, 8, 8)
    gm = analyze(capture(model, x[:1]))
    assert {info(n).kind for n in gm.graph.nodes} >= {"mul", "sub", "div", "clamp", "max_pool2d",
                                                      "avg_pool2d", "cat", "slice", "pad",
                                                      "adaptive_avg_pool2d", "flatten"}
    apply_policy(gm, uniform(gm, bits, bits))
    sim = simulate(gm, [torch.rand(32, 3, 8, 8)], scales="po2")
    onnx_model = lower(sim, {})
    ref = torch_logits(sim, x)
    with torch.no_grad():
        assert np.abs(ref - model(x).numpy()).max() < (0.5 if bits == 8 else 5)  # a quantized AllOps
    for level in LEVELS:
        assert np.array_equal(ort_logits(onnx_model, x, level), ref), level
