"""runtime/layerwise.py: every rounding of a simulation compared with its lowering in onnxruntime, each quantizer
fed onnxruntime's values before it. On one torchvision model of each family with float ops, attention matmuls and
sub-8-bit requantization (tests/zoo_archs.py, 32×32, random weights), and ResNet-18:
- po2 scales make every integer layer exact in float32: no code of ResNet-18 or ConvNeXt may differ, and one after
  a float op (sigmoid, SiLU) only by one step, on a value that is a tie in exact arithmetic;
- float scales (moved off ties) may differ only on chance float32 near-ties, by one step.
A scale changed in the ONNX file (the oracle: which quantizer the test broke) must show up at that quantizer and
nowhere else."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torchvision
import zoo_archs
from onnx import numpy_helper

from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower, read_metadata
from arqc.passes.meta import info, quantizable_nodes
from arqc.passes.policy import apply_policy
from arqc.passes.quantize import requant_nodes, simulate
from arqc.runtime.layerwise import compare_layerwise

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"]


def _sim(family: str, scales: str):
    torch.manual_seed(0)
    model = (torchvision.models.resnet18(num_classes=10) if family == "resnet18" else getattr(zoo_archs, family)())
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(16, 3, 32, 32, generator=g), torch.rand(8, 3, 32, 32, generator=g)
    gm = analyze(capture(model.eval(), x[:1]))
    rng = np.random.default_rng(0)  # each layer 4 or 8 bits for weights and activations
    apply_policy(gm, {info(n).layer: (int(rng.choice([4, 8])), int(rng.choice([4, 8])))
                      for n in quantizable_nodes(gm)})
    return simulate(gm, [calib], scales=scales), x


@pytest.mark.parametrize("family", [*FAMILIES, "resnet18"])
def test_every_rounding_agrees_with_onnxruntime(family):
    for scales in ("po2", "float"):
        sim, x = _sim(family, scales)
        model = lower(sim, {})
        report = compare_layerwise(sim, model, x)
        keys = {n.target for n in requant_nodes(sim)}
        keys |= {info(n).layer for n in quantizable_nodes(sim) if not sim.get_submodule(n.target).grid_input
                 and info(n).a_bits < 32}
        assert keys <= set(report.roundings)  # every requant and layer input quantizer was compared
        assert set(report.roundings) == set(read_metadata(model)["arqc.codes"]) and not report.other_grids
        if family == "vit_b_16":  # the second operands of q·kᵀ and softmax·v
            assert any(key.endswith(".second") for key in report.roundings)
        assert report.elements > 100_000
        assert report.max_steps <= 1, report.worst()
        if scales == "float":  # scales moved off ties: only chance near-ties are left
            assert report.differing <= 1e-4 * report.elements, report.worst()
        elif family in ("resnet18", "convnext_tiny"):
            # every float op of these (layer norm, GELU, the pools) gives onnxruntime's and torch's values
            # on the same side of each po2 tie here; integer layers at po2 are exact in float32
            assert report.differing == 0, report.worst()
        else:
            # a float op puts a value that is a po2 tie in exact arithmetic on either side: onnxruntime's
            # Sigmoid(17) is 1 - 2^-23 where torch's is 1.0, so a SiLU output x·1 on a tie rounds the other way
            assert report.differing <= 1e-3 * report.elements, report.worst()
        assert report.logits_cosine >= 0.99999


def test_a_wrong_scale_in_the_file_shows_at_its_quantizer_only():
    sim, x = _sim("mobilenet_v3_small", "po2")
    model = lower(sim, {})
    codes = read_metadata(model)["arqc.codes"]
    broken_key = requant_nodes(sim)[len(requant_nodes(sim)) // 2].target
    reader = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == codes[broken_key])
    scale = next(t for t in model.graph.initializer if t.name == reader.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.03), scale.name))
    onnx.checker.check_model(model)
    report = compare_layerwise(sim, model, x)
    assert report.other_grids == [broken_key]
    broken = report.roundings[broken_key]
    assert broken.differing >= 0.05 * broken.elements and broken.max_steps >= 1
    assert report.worst(1)[0][0] == broken_key
    others = [r for key, r in report.roundings.items() if key != broken_key]
    # after it, onnxruntime and the simulation read the same (wrong) values: only near-ties may differ
    assert sum(r.differing for r in others) <= 1e-4 * sum(r.elements for r in others)
    assert max(r.max_steps for r in others) <= 1
