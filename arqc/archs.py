"""Built-in architectures. Each takes images in [0, 1] and normalizes them with a layer inside the model,
so that smoothing noise is added in pixel space.

- ``resnet20/32/44/56``: the CIFAR-10 ResNets of He et al. as in akamaster/pytorch_resnet_cifar10 (option-A
  shortcuts: parameter-free stride-2 subsampling and zero channel padding). Parameter names match those
  checkpoints, so they load with ``strict=True`` once the ``module.`` prefix is removed.
- ``resnet18``, ``resnet50``, ``mobilenet_v2``: torchvision's ImageNet models with ImageNet normalization.
- ``mnist_cnn``: a small CNN for 28×28 grey images (4 conv + 2 linear layers).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from arqc.base import ArqcError

CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what the akamaster models use
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class Normalize(nn.Module):
    """(x - mean) / std per channel. The constants are non-persistent buffers: not part of state_dicts."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and pad the new channels with zeros."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        blocks = (depth - 2) // 6
        self.normalize = Normalize(CIFAR_MEAN, CIFAR_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._stage(16, blocks, 1)
        self.layer2 = self._stage(32, blocks, 2)
        self.layer3 = self._stage(64, blocks, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


class MnistCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize(MNIST_MEAN, MNIST_STD)
        self.conv1 = nn.Conv2d(1, 32, 3, 1, 1)
        self.conv2 = nn.Conv2d(32, 32, 4, 2, 1)
        self.conv3 = nn.Conv2d(32, 64, 3, 1, 1)
        self.conv4 = nn.Conv2d(64, 64, 4, 2, 1)
        self.fc1 = nn.Linear(64 * 7 * 7, 256)
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class TVResNet(torchvision.models.ResNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalize(x))


class TVMobileNetV2(torchvision.models.MobileNetV2):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalize(x))


@dataclass(frozen=True)
class Arch:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, int, int] | None  # C, H, W (None: not known, ask the user)
    num_classes: int | None


_BOTTLENECK, _BASIC = torchvision.models.resnet.Bottleneck, torchvision.models.resnet.BasicBlock

ARCHS: dict[str, Arch] = {a.name: a for a in [
    *(Arch(f"resnet{d}", lambda d=d: CifarResNet(d), (3, 32, 32), 10) for d in (20, 32, 44, 56)),
    Arch("resnet18", lambda: TVResNet(_BASIC, [2, 2, 2, 2]), (3, 224, 224), 1000),
    Arch("resnet50", lambda: TVResNet(_BOTTLENECK, [3, 4, 6, 3]), (3, 224, 224), 1000),
    Arch("mobilenet_v2", lambda: TVMobileNetV2(), (3, 224, 224), 1000),
    Arch("mnist_cnn", lambda: MnistCNN(), (1, 28, 28), 10),
]}


def get_arch(name: str) -> Arch:
    """A built-in arch by name, or ``package.module:factory`` (a callable returning an nn.Module)."""
    if name in ARCHS:
        return ARCHS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except Exception as err:  # importing runs the user's code: any exception is theirs
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ArqcError(f"cannot import arch factory '{name}': {reason}; give package.module:callable "
                            "importable from the current environment") from None
        return Arch(name, factory, None, None)
    raise ArqcError(f"unknown arch '{name}'; choose one of {', '.join(ARCHS)} or give package.module:factory")


def build(name: str) -> nn.Module:
    arch = get_arch(name)
    try:
        model = arch.factory()
    except Exception as err:  # a user factory's own failure
        if name in ARCHS:
            raise
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ArqcError(f"arch factory '{name}' failed: {type(err).__name__}: {reason}; "
                        "fix the factory so that it builds the model without arguments") from None
    if not isinstance(model, nn.Module):
        raise ArqcError(f"arch factory '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()
