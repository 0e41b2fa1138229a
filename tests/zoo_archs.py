"""Arch factories for tests: torchvision classifiers of four families at CIFAR size (10 classes, 32×32 inputs), as
``--arch zoo_archs:NAME`` (tests/ is on sys.path under pytest). Heads that torchvision initializes to zero (ViT's)
are drawn at random, so that the logits of a random-weight model are not all 0."""

from __future__ import annotations

import torch
import torchvision


def _random_heads(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def mobilenet_v3_small():
    return torchvision.models.mobilenet_v3_small(num_classes=10)


def efficientnet_b0():
    return torchvision.models.efficientnet_b0(num_classes=10)


def convnext_tiny():
    return torchvision.models.convnext_tiny(num_classes=10)


def vit_b_16():  # 2×2 patches of 16 pixels and the class token: 5 tokens
    return _random_heads(torchvision.models.vit_b_16(image_size=32, num_classes=10))
