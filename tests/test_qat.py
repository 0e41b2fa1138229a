"""Noise-aware QAT (arqc/qat.py): its augmentation follows `arqc train`, unfolded BatchNorm training takes the
unfolded network's steps, and bad settings are refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from arqc.base import ArqcError
from arqc.passes.meta import KEY
from arqc.pipeline import prepare_model
from arqc.qat import finetune

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _tuned(channels: int, augmentation: str, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_Net(channels))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(24, channels, 8, 8, generator=gen), torch.arange(24) % 3
    finetune(gm, x, y, sigma=0.25, epochs=1, lr=0.1, batch_size=8, progress=False, augmentation=augmentation,
             device=device)
    return gm.state_dict()


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_auto_augments_colour_images_only():
    # digits (1 channel): auto = none, bit for bit; colour photos: auto = crops and flips
    assert _same(_tuned(1, "auto"), _tuned(1, "none"))
    assert _same(_tuned(3, "auto"), _tuned(3, "crop-flip"))
    assert not _same(_tuned(3, "auto"), _tuned(3, "none"))


class _ScaledNoise:
    """Stands in for ``torch`` inside arqc.qat: every ``randn`` is drawn as usual (so the generator, and with it
    every later batch order, stays the same) and then multiplied by ``scale``."""

    def __init__(self, scale: float):
        self.scale = scale

    def randn(self, *args, **kwargs):
        return self.scale * torch.randn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


def _noise_tuned(sigma: float, monkeypatch, scale: float | None = None) -> dict:
    """QAT of the 1-channel net at ``sigma`` (no augmentation: the generator feeds only order and noise), with
    the standard normal draws multiplied by ``scale`` when given."""
    with monkeypatch.context() as patch:
        if scale is not None:
            patch.setattr("arqc.qat.torch", _ScaledNoise(scale))
        torch.manual_seed(0)
        gm = torch.fx.symbolic_trace(_Net(1))
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(24, 1, 8, 8, generator=gen), torch.arange(24) % 3
        finetune(gm, x, y, sigma=sigma, epochs=2, lr=0.1, batch_size=8, progress=False, augmentation="none",
                 device="cpu")
    return gm.state_dict()


def test_qat_adds_noise_of_std_sigma(monkeypatch):
    noisy, clean = _noise_tuned(0.25, monkeypatch), _noise_tuned(0.0, monkeypatch)
    assert not any(torch.equal(noisy[k], clean[k]) for k in noisy)  # σ reaches the training images
    # σ = 0 is exactly training without noise: the same as noise that is zero by construction
    assert _same(clean, _noise_tuned(0.25, monkeypatch, scale=0.0))
    # σ = 0.25 adds 0.25 × N(0, 1): the same as σ = 1 with the standard normal draws scaled by 0.25 (exact in
    # floating point: 0.25 is a power of two)
    assert _same(noisy, _noise_tuned(1.0, monkeypatch, scale=0.25))
    assert not _same(noisy, _noise_tuned(0.5, monkeypatch))


def test_unknown_augmentation_is_refused():
    with pytest.raises(ArqcError, match="unknown augmentation 'rotate'"):
        _tuned(1, "rotate")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ArqcError, match="no CUDA GPU is available; use --device cpu"):
        _tuned(1, "none", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_qat_on_a_gpu_draws_the_same_batches_and_ends_on_the_cpu():
    # same batches, crops and noise (drawn on the CPU); only float rounding differs
    cpu, gpu = _tuned(3, "crop-flip", "cpu"), _tuned(3, "crop-flip", "cuda")
    assert all(v.device.type == "cpu" for v in gpu.values())
    assert all(torch.allclose(cpu[k], gpu[k], atol=1e-4) for k in cpu)


class _Recorder(torch.nn.Module):
    """A net that keeps every batch it is called on."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.net(x)


def _distilled(weight: float, sigma: float = 0.0, epochs: int = 60, augmentation: str = "none"
               ) -> tuple[_Recorder, _Recorder, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    student, teacher = _Recorder(_Net(3)), _Recorder(_Net(3))
    with torch.no_grad():  # a confident teacher: its votes are its argmax
        teacher.net.fc.weight.mul_(20)
        teacher.net.fc.bias.mul_(20)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(24, 3, 8, 8, generator=gen), torch.arange(24) % 3
    finetune(student, x, y, sigma=sigma, epochs=epochs, lr=0.1, batch_size=8, progress=False, augmentation=augmentation,
             device="cpu", teacher=teacher, distill=weight)
    return student, teacher, x, y


def test_distillation_teaches_the_teachers_votes_on_the_same_noisy_images():
    # the teacher (a random net) and the labels disagree on most images: the weight decides which is learned
    cross_entropy, _, x, y = _distilled(0.0)
    distilled, teacher, _, _ = _distilled(1.0)
    with torch.no_grad():
        votes = teacher.net(x).argmax(1)
        assert (votes == y).float().mean() < 0.6
        assert (cross_entropy.net(x).argmax(1) == y).float().mean() >= 0.9
        assert (distilled.net(x).argmax(1) == votes).float().mean() >= 0.9
    assert not teacher.net.training  # the teacher is evaluated, never trained
    # the teacher sees exactly the student's noisy, augmented batches
    student, teacher, _, _ = _distilled(0.5, sigma=0.25, epochs=1, augmentation="crop-flip")
    assert len(teacher.seen) == len(student.seen) == 3
    assert all(torch.equal(a, b) for a, b in zip(student.seen, teacher.seen, strict=True))


def test_distillation_needs_a_teacher_and_a_weight_in_range():
    gm = torch.fx.symbolic_trace(_Net(1))
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    for weight, teacher in [(0.5, None), (1.5, gm), (-0.1, gm)]:
        with pytest.raises(ArqcError, match="distillation needs a weight in"):
            finetune(gm, x, y, sigma=0.25, epochs=1, teacher=teacher, distill=weight, progress=False)


def test_a_scale_learning_rate_of_zero_is_refused_not_replaced_by_lr():
    gm = torch.fx.symbolic_trace(_Net(1))
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    for scale_lr in (0.0, -1e-3):
        with pytest.raises(ArqcError, match="scale_lr > 0"):
            finetune(gm, x, y, sigma=0.25, epochs=1, learned_scales=True, scale_lr=scale_lr, progress=False)


class _ConvBn(torch.nn.Module):
    """A conv whose BatchNorm capture folds (γ spread over two orders of magnitude, as in trained networks)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([0.02, 0.2, 1.0, 2.5]))
            self.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
            self.bn.running_mean.copy_(torch.tensor([0.5, -0.1, 0.2, 0.0]))
            self.bn.running_var.copy_(torch.tensor([0.3, 1.5, 0.8, 2.0]))

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _unfolded_oracle(net: _ConvBn, x, y, lr: float, batch_size: int) -> torch.Tensor:
    """Plain PyTorch: train the conv weight with its BatchNorm in place and frozen (eval mode, γ fixed; β, the
    linear layer and the conv weight trained), SGD with finetune's momentum, weight decay, cosine schedule and
    batch order; return the conv weight folded with the BatchNorm afterwards."""
    net.eval()
    net.bn.weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=1e-4)
    batches = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).split(batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / len(batches))))
    for idx in batches:
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    g = net.bn.weight / torch.sqrt(net.bn.running_var + net.bn.eps)
    return net.conv.weight.detach() * g.reshape(-1, 1, 1, 1)


def test_unfolded_bn_qat_takes_the_steps_of_the_unfolded_network():
    # the oracle trains the network with its BatchNorm still there; finetune(unfold_bn=True) trains the captured
    # network, whose BatchNorm capture folded into the conv, and must end on the same folded weights
    torch.manual_seed(0)
    net = _ConvBn()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(24, 3, 8, 8, generator=gen), torch.arange(24) % 3
    expected = _unfolded_oracle(copy.deepcopy(net), x, y, lr=0.5, batch_size=8)
    start = prepare_model(copy.deepcopy(net), input_shape=(3, 8, 8)).gm
    assert [n.meta[KEY].bn_scale is not None for n in start.graph.nodes if n.op == "call_module"] == [True, False]

    def tuned(unfold_bn: bool) -> torch.Tensor:
        gm = copy.deepcopy(start)
        finetune(gm, x, y, sigma=0.0, epochs=1, lr=0.5, batch_size=8, progress=False, augmentation="none",
                 device="cpu", unfold_bn=unfold_bn)
        return gm.get_submodule("conv").weight.detach()

    moved = (expected - start.get_submodule("conv").weight).abs().max()
    assert moved > 1e-2  # the steps are large enough to tell the two apart
    assert (tuned(True) - expected).abs().max() < 1e-3 * moved  # β's weight decay acts on the folded bias: ~1e-7
    assert (tuned(False) - expected).abs().max() > 0.1 * moved  # folded training takes other steps
