"""Rebuilding the simulated graph of an arqc ONNX model from the file (for IBP and verification)."""

from __future__ import annotations

import random

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from arqc import archs
from arqc.base import ArqcError
from arqc.loading import save_checkpoint
from arqc.onnx_import import simulation_from_onnx
from arqc.passes.policy import uniform
from arqc.pipeline import prepare_model, quantize, to_onnx
from arqc.qat import finetune


@pytest.mark.parametrize("scales", ["float", "po2"])
def test_rebuilt_simulation_computes_the_same_function(tmp_path, scales):
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, archs.build("mnist_cnn"), "mnist_cnn", (1, 28, 28), 10)
    prep = prepare_model(str(ckpt))
    rng = random.Random(1)
    policy = {k: (rng.randint(2, 8), rng.randint(2, 8)) for k in uniform(prep.gm, 8, 8)}
    from arqc.data import ImageSet

    x = torch.rand(64, 1, 28, 28)
    images = ImageSet(x, torch.randint(0, 10, (64,)), torch.arange(64), "synthetic", 10)
    sim = quantize(prep, policy, images, 64, scales)
    # fine-tuning changes the weights: the rebuild must take them from the ONNX file, not the checkpoint
    finetune(sim, images.x, images.y, sigma=0.25, epochs=1, lr=0.05, batch_size=32, progress=False)
    path = tmp_path / "m.onnx"
    onnx.save(to_onnx(sim, prep.settings(source=str(ckpt), scales=scales)), path)
    rebuilt, meta = simulation_from_onnx(str(path))
    probe = x + 0.5 * torch.randn_like(x)
    with torch.no_grad():
        assert torch.equal(sim(probe), rebuilt(probe))
    assert meta["arqc.policy"]["conv1"] == {"w_bits": policy["conv1"][0], "a_bits": policy["conv1"][1]}


def test_foreign_onnx_is_refused(tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(ArqcError, match="not lowered by arqc"):
        simulation_from_onnx(str(path))
