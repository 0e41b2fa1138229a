"""QA-IBP training: the schedule, the loss, gradients through the quantizers, and that it certifies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qnets import NetSpec, SmallNet, build_sim
from torch import nn

from arqc.base import ArqcError
from arqc.certify_linf import certify_ibp
from arqc.data import ImageSet, load_images
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.passes.meta import info, quantizable_nodes
from arqc.passes.policy import uniform
from arqc.qaibp import Schedule, qaibp_loss, train_qaibp
from arqc.runtime.backends import OrtBackend

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_warms_up_then_ramps_linearly():
    s = Schedule(epsilon=0.1, warmup=10, ramp=20, kappa_end=0.5)
    assert s.at(0) == s.at(9) == (0.0, 1.0)
    eps, kappa = s.at(19)  # half-way through the ramp
    assert eps == pytest.approx(0.05) and kappa == pytest.approx(0.75)
    assert s.at(29) == pytest.approx((0.1, 0.5)) and s.at(1000) == pytest.approx((0.1, 0.5))
    steps = [s.at(i)[0] for i in range(40)]
    assert steps == sorted(steps)


def test_loss_at_zero_epsilon_is_the_natural_loss_and_reaches_every_layer():
    sim = build_sim(NetSpec((1, 4, 4), seed=2), 2, bits=(3, 4, 8))
    x, y = torch.rand(16, 1, 4, 4), torch.randint(0, 3, (16,))
    natural = F.cross_entropy(sim(x), y)
    for kappa in (0.0, 0.5, 1.0):
        loss, _, _ = qaibp_loss(sim, x, y, 0.0, kappa)
        torch.testing.assert_close(loss, natural, atol=1e-5, rtol=1e-5)
    robust, _, margins = qaibp_loss(sim, x, y, 0.05, 0.0)  # the robust term alone
    assert robust > natural and (margins >= -1e9).all()
    robust.backward()  # straight-through quantizers pass the bound's gradient to every layer
    layers = [sim.get_submodule(n.target) for n in quantizable_nodes(sim)]
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 4, 4)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


@pytest.fixture(scope="module")
def mnist(shared_data) -> tuple[ImageSet, ImageSet]:
    spec = f"mnist:{shared_data / 'mnist'}"
    return load_images(f"{spec}:train").subset(num=2000), load_images(f"{spec}:test").subset(num=200)


def test_qaibp_certifies_what_natural_training_does_not(mnist):
    train, test = mnist
    results = {}
    for name, kappa_end in (("natural", 1.0), ("qa-ibp", 0.0)):
        torch.manual_seed(0)
        gm = analyze(capture(Tiny().eval(), torch.zeros(1, 1, 28, 28)))
        sim, history = train_qaibp(gm, train, 0.1, 3, uniform(gm, 4, 4), kappa_end=kappa_end, lr=3e-3,
                                   batch_size=100, device="cpu")
        results[name] = certify_ibp(sim, test, 0.1, device="cpu")
        assert len(history) == 3 and history[-1]["epsilon"] == pytest.approx(0.1)
        # recalibration kept the layers and their meta in step, so the lowered model is the simulation
        for node in quantizable_nodes(sim):
            assert info(node).act == sim.get_submodule(node.target).act
        onnx_pred = OrtBackend(lower(sim)).predict(test.x[:50].numpy())
        assert (onnx_pred == sim(test.x[:50]).argmax(1).numpy()).mean() >= 0.98
    assert results["natural"]["clean_accuracy"] > 0.7
    assert results["natural"]["verified_accuracy"] < 0.05
    assert results["qa-ibp"]["verified_accuracy"] > 0.2  # 0.265 measured


def test_train_refuses_bad_input():
    gm = analyze(capture(SmallNet(NetSpec((1, 2, 2))).eval(), torch.zeros(1, 1, 2, 2)))
    data = ImageSet(torch.rand(8, 1, 2, 2), torch.zeros(8, dtype=torch.long), torch.arange(8), "test", 3)
    with pytest.raises(ArqcError, match="epsilon"):
        train_qaibp(gm, data, 1.5, 1, uniform(gm, 4, 4))
    with pytest.raises(ArqcError, match="precision policy"):
        train_qaibp(gm, data, 0.1, 1)
    with pytest.raises(ArqcError, match="kappa_end"):
        train_qaibp(gm, data, 0.1, 1, uniform(gm, 4, 4), kappa_end=2.0)
    sim = build_sim(NetSpec((1, 2, 2)), 0)
    with pytest.raises(ArqcError, match="already quantized"):
        train_qaibp(sim, data, 0.1, 1, uniform(gm, 4, 4))
