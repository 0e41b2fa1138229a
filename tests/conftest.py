"""Shared fixtures: the real data beside the checkout (../shared/data), the akamaster ResNet-20, and
random-init models whose BatchNorm statistics are set as if trained, so that their outputs vary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from arqc import archs
from arqc.data import ImageSet, load_images

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AKAMASTER = "weights/akamaster-resnet-cifar10"
RESNET20_WEIGHTS = f"{AKAMASTER}/resnet20-12fca82f.th"
CIFAR_TEST = "cifar10/test_first1000_lossless.npz"
CIFAR_TRAIN = "cifar10/train_first2000_lossless.npz"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): on an
    oversubscribed CPU, torch's spinning worker threads made a ResNet-20 forward pass ~50× slower with two
    threads than with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def search_inputs(tmp_path_factory) -> Path:
    """A folder with a random-init MNIST CNN checkpoint (m.pt) and random labelled images (train.npz: 40,
    test.npz: 8): the smallest inputs an ARQ search runs end to end on."""
    import numpy as np

    from arqc.loading import save_checkpoint

    root = tmp_path_factory.mktemp("search_inputs")
    torch.manual_seed(0)
    save_checkpoint(root / "m.pt", archs.build("mnist_cnn"), "mnist_cnn", (1, 28, 28), 10)
    rng = np.random.default_rng(0)
    for name, count in (("train", 40), ("test", 8)):
        np.savez(root / f"{name}.npz", x=rng.integers(0, 256, (count, 28, 28), dtype=np.uint8),
                 y=np.arange(count) % 10)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data folder; tests that need it skip (with the reason) where it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (it lies beside the checkout in CI)")
    return SHARED_DATA


def _shared_file(shared_data: Path, relative: str) -> Path:
    path = shared_data / relative
    if not path.is_file():
        pytest.skip(f"{relative} is missing from {shared_data}")
    return path


@pytest.fixture(scope="session")
def resnet20_weights(shared_data) -> Path:
    """akamaster's ResNet-20 checkpoint: {'state_dict': {'module.…': …}, 'best_prec1': …}."""
    return _shared_file(shared_data, RESNET20_WEIGHTS)


@pytest.fixture(scope="session")
def akamaster_resnet20(resnet20_weights) -> nn.Module:
    """arqc's resnet20 with akamaster's weights, loaded strictly (``module.`` prefix removed)."""
    ckpt = torch.load(resnet20_weights, map_location="cpu", weights_only=True)
    model = archs.build("resnet20")
    model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}, strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def cifar_test(shared_data) -> ImageSet:
    """CIFAR-10 test images 0–999 (lossless)."""
    return load_images(f"npz:{_shared_file(shared_data, CIFAR_TEST)}")


@pytest.fixture(scope="session")
def cifar_train(shared_data) -> ImageSet:
    """CIFAR-10 training images 0–1999 (lossless), for calibration."""
    return load_images(f"npz:{_shared_file(shared_data, CIFAR_TRAIN)}")


def settle_batchnorm(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Give a random-init model trained-like BatchNorm layers: random affine parameters and running
    statistics measured on random images. Fresh torchvision models otherwise have near-identity BatchNorm
    (folding would be trivially right) and activations that vanish with depth (all outputs alike)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over what it sees
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, *input_shape, generator=g))
    return model.eval()


@pytest.fixture(scope="session")
def random_model():
    """``random_model(arch, input_shape=None, seed=0)``: a built-in arch with random weights and settled
    BatchNorm (see :func:`settle_batchnorm`)."""

    def make(arch: str, input_shape: tuple[int, ...] | None = None, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = archs.build(arch)
        return settle_batchnorm(model, input_shape or archs.get_arch(arch).input_shape, seed)

    return make
