"""Noise-aware QAT (arqc/qat.py): its augmentation follows `arqc train`, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from arqc.errors import ArqcError
from arqc.qat import finetune

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _tuned(channels: int, augmentation: str) -> dict:
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_Net(channels))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(24, channels, 8, 8, generator=gen), torch.arange(24) % 3
    finetune(gm, x, y, sigma=0.25, epochs=1, lr=0.1, batch_size=8, progress=False, augmentation=augmentation)
    return gm.state_dict()


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_auto_augments_colour_images_only():
    # digits (1 channel): auto = none, bit for bit; colour photos: auto = crops and flips
    assert _same(_tuned(1, "auto"), _tuned(1, "none"))
    assert _same(_tuned(3, "auto"), _tuned(3, "crop-flip"))
    assert not _same(_tuned(3, "auto"), _tuned(3, "none"))


def test_unknown_augmentation_is_refused():
    with pytest.raises(ArqcError, match="unknown augmentation 'rotate'"):
        _tuned(1, "rotate")
