"""Analysis (passes/analysis.py): MACs, params, BitOps and size, against hand counts and published figures."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from arqc import archs
from arqc.cli import main
from arqc.passes.analysis import analyze, format_profile, profile
from arqc.passes.capture import capture
from arqc.passes.meta import info
from arqc.passes.policy import apply_policy, uniform

pytestmark = pytest.mark.usefixtures("one_thread")


def analyzed(model: nn.Module, shape: tuple[int, ...]) -> torch.fx.GraphModule:
    return analyze(capture(model.eval(), torch.zeros(1, *shape)))


class Tiny(nn.Module):
    """Counted by hand below."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=1, padding=1)  # 3x10x10 -> 8x10x10
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)  # -> 8x5x5, depthwise
        self.pw = nn.Conv2d(8, 16, 1)  # -> 16x5x5
        self.fc = nn.Linear(16 * 5 * 5, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.pw(self.dw(x)))
        return self.fc(torch.flatten(x, 1))


TINY_MACS = {"conv": 8 * 10 * 10 * 3 * 3 * 3, "dw": 8 * 5 * 5 * 1 * 3 * 3, "pw": 16 * 5 * 5 * 8,
             "fc": 400 * 10}
# the BatchNorm folds into conv's existing bias; dw has neither bias nor BatchNorm
TINY_PARAMS = {"conv": 8 * 3 * 9 + 8, "dw": 8 * 9, "pw": 16 * 8 + 16, "fc": 400 * 10 + 10}


def test_hand_counted_tiny_model():
    gm = analyzed(Tiny(), (3, 10, 10))
    p = profile(gm)
    assert [r.name for r in p.layers] == ["conv", "dw", "pw", "fc"]
    assert {r.name: r.macs for r in p.layers} == TINY_MACS
    assert {r.name: r.params for r in p.layers} == TINY_PARAMS
    assert p.total_macs == sum(TINY_MACS.values()) == 21600 + 1800 + 3200 + 4000
    assert p.total_params == sum(TINY_PARAMS.values())
    shapes = {r.name: (r.in_shape, r.out_shape) for r in p.layers}
    assert shapes["dw"] == ((1, 8, 10, 10), (1, 8, 5, 5)) and shapes["fc"] == ((1, 400), (1, 10))
    assert p.total_bitops == p.fp32_bitops == p.total_macs * 32 * 32 and p.bitops_ratio_fp32 == 1.0


def test_bitops_and_size_follow_the_policy():
    gm = analyzed(Tiny(), (3, 10, 10))
    policy = {"conv": (8, 8), "dw": (4, 2), "pw": (3, 5), "fc": (32, 32)}
    apply_policy(gm, policy)
    p = profile(gm)
    assert p.total_bitops == sum(TINY_MACS[n] * w * a for n, (w, a) in policy.items())
    assert p.bitops_ratio_fp32 == p.total_bitops / (p.total_macs * 1024)
    assert p.size_bits == sum(TINY_PARAMS[n] * w for n, (w, _) in policy.items())
    rows = {r.name: r for r in p.layers}
    assert (rows["pw"].w_bits, rows["pw"].a_bits, rows["pw"].bitops) == (3, 5, TINY_MACS["pw"] * 15)
    assert sum(r.share for r in p.layers) == pytest.approx(1.0)
    j = p.to_json()
    assert j["size_bytes"] == p.size_bits / 8
    assert j["size_ratio_fp32"] == pytest.approx(p.size_bits / (32 * p.total_params))


def test_unnamed_layers_stay_float():
    gm = analyzed(Tiny(), (3, 10, 10))
    apply_policy(gm, {"dw": (4, 4)})
    assert {r.name: (r.w_bits, r.a_bits) for r in profile(gm).layers} == {
        "conv": (32, 32), "dw": (4, 4), "pw": (32, 32), "fc": (32, 32)}


def test_nonnegativity():
    gm = analyzed(Tiny(), (3, 10, 10))
    producer = {info(n).layer: info(n.args[0]) for n in gm.graph.nodes if info(n).layer}
    assert not producer["conv"].nonneg  # the image input is signed once noise is added
    assert producer["dw"].nonneg and producer["fc"].nonneg  # after ReLU (and flatten of a ReLU)
    assert not producer["pw"].nonneg  # a conv's output without ReLU


# Published MAC counts. Ours count conv and linear multiply-accumulates only (BatchNorm is folded, ReLU,
# pooling and additions are not MACs), so they sit slightly below figures that count those too.
PUBLISHED = [
    # ResNet-20: He et al. list 0.27M params; the widely quoted 40.81M MACs (e.g. akamaster's README, ptflops)
    # include BatchNorm, ReLU and pooling. Conv + linear MACs are 40.55M: 0.64% below, so allow 1%.
    ("resnet20", 40.81e6, 0.01, 269_034),
    ("resnet18", 1.82e9, 0.01, 11_684_712),  # torchvision: 1.81 GFLOPS (MACs); 11.69M params incl. BN
    ("resnet50", 4.1e9, 0.01, 25_530_472),  # torchvision: 4.09 GFLOPS (MACs); 25.56M params incl. BN
    ("mobilenet_v2", 0.30e9, 0.02, 3_487_816),  # Sandler et al.: 300M multiply-adds; 3.4M params
]


@pytest.mark.parametrize("arch, macs, tolerance, params", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_macs_match_published_figures(arch, macs, tolerance, params):
    spec = archs.get_arch(arch)
    p = profile(analyzed(archs.build(arch), spec.input_shape))
    assert abs(p.total_macs - macs) / macs <= tolerance, f"{arch}: {p.total_macs:,} MACs vs {macs:,.0f}"
    # parameters after BatchNorm folding: the conv/linear weights plus one bias per BN-folded channel
    assert p.total_params == params


def test_resnet20_exact_counts():
    p = profile(analyzed(archs.build("resnet20"), (3, 32, 32)))
    assert p.total_macs == 40_551_040
    assert len(p.layers) == 20 and p.layers[0].name == "conv1" and p.layers[-1].name == "linear"
    assert p.layers[0].macs == 16 * 32 * 32 * 3 * 9 and p.layers[-1].macs == 64 * 10


def test_uniform_w4a4_is_one_sixty_fourth_of_fp32():
    gm = analyzed(archs.build("resnet20"), (3, 32, 32))
    apply_policy(gm, uniform(gm, 4, 4))
    p = profile(gm)
    assert p.bitops_ratio_fp32 == 1 / 64  # 1.5625%
    assert p.size_bits == p.total_params * 4
    assert "1.56% of FP32" in format_profile(p)


def test_analyze_json_has_stable_keys(tmp_path, capsys):
    out = tmp_path / "profile.json"
    main(["analyze", "--arch", "resnet20", "--w-bits", "4", "--a-bits", "8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "layer1.0.conv1" in printed and "40.55M" in printed
    data = json.loads(out.read_text())
    assert {"total_macs", "total_params", "total_bitops", "bitops_ratio_fp32", "layers"} <= set(data)
    assert data["total_macs"] == 40_551_040 and data["total_params"] == 269_034
    assert data["total_bitops"] == 40_551_040 * 4 * 8 and data["bitops_ratio_fp32"] == 32 / 1024
    assert len(data["layers"]) == 20
    for layer in data["layers"]:
        assert {"name", "op", "macs", "params", "w_bits", "a_bits", "bitops"} <= set(layer)
        assert (layer["w_bits"], layer["a_bits"]) == (4, 8)
        assert layer["bitops"] == layer["macs"] * 32
        assert layer["op"] in ("conv2d", "linear")
    assert sum(layer["macs"] for layer in data["layers"]) == data["total_macs"]
    assert data["layers"][0]["name"] == "conv1"
