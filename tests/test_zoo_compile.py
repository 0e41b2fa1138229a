"""`arqc compile --budget 3%` on one torchvision model of each family that needs the float ops, the attention
matmuls and the rewrites of #16 (mobilenet_v3_small, efficientnet_b0, convnext_tiny, vit_b_16 at 32×32, random
weights, random CIFAR-sized images): a short search (3 episodes, no greedy demonstration: its sensitivity proxy
runs 14 probes of 64 images per layer, minutes for ViT's 74 layers) whose policy meets the budget, lowered to ONNX
and certified in onnxruntime, at po2 scales. Oracles: the budget arithmetic from the report's own per-layer MACs,
the ONNX file's certificate metadata, and onnxruntime's output on the file compared with the torch simulation
rebuilt from it.
The full sweep over all 80 torchvision classifiers is bench/zoo.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zoo_archs
from cli_helpers import run_cli

from arqc.loading import save_checkpoint
from arqc.onnx_import import simulation_from_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"]


@pytest.fixture(scope="module")
def cifar_sized(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_sized")
    rng = np.random.default_rng(0)
    for name, count in (("train", 40), ("test", 8)):
        np.savez(root / f"{name}.npz", x=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(count) % 10)
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_with_a_budget_and_certify_in_onnxruntime(family, cifar_sized, tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", getattr(zoo_archs, family)(), f"zoo_archs:{family}", (3, 32, 32), 10)
    argv = ["compile", str(tmp_path / "m.pt"), "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json"),
            "--data", f"npz:{cifar_sized / 'train.npz'}", "--test-data", f"npz:{cifar_sized / 'test.npz'}",
            "--sigma", "0.25", "--budget", "3%", "--calib-images", "16", "--episodes", "3", "--warmup", "1",
            "--search-images", "6", "--cache-n", "40", "--search-n", "20", "--n0", "10", "--n", "40",
            "--num-images", "4", "--finetune-epochs", "0", "--demo", "none", "--scales", "po2",
            "--workdir", str(tmp_path / "work")]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    layers = report["layers"]
    spent = sum(row["macs"] * row["w_bits"] * row["a_bits"] for row in layers)
    assert spent <= 0.03 * sum(row["macs"] for row in layers) * 32 * 32
    kinds = {row["op"] for row in layers}
    if family == "vit_b_16":  # attention: q·kᵀ and softmax·v are layers of the search
        assert "matmul" in kinds and sum(row["op"] == "matmul" for row in layers) == 24
    model = onnx.load(tmp_path / "q.onnx")
    certificate = json.loads({p.key: p.value for p in model.metadata_props}["arqc.certificate_l2"])
    assert certificate["runtime"].startswith("onnxruntime") and certificate["num_images"] == 4
    # the deployed file computes what the search's simulation computes: at po2 scales every integer layer is exact in
    # float32, so only the float ops (GELU, layer norm, softmax, SiLU) differ, by ulps (at float scales a random
    # network's rounding flips can grow with depth: bench/zoo.py measures both)
    sim, _ = simulation_from_onnx(str(tmp_path / "q.onnx"))
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = sim(x).numpy()
    logits = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-3 * np.abs(ref).max() + 1e-6)
