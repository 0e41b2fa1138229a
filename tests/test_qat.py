"""Noise-aware QAT (arqc/qat.py): its augmentation follows `arqc train`, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from arqc.base import ArqcError
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
