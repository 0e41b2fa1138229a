"""Backends (torch, onnxruntime) and the seeded noise they share."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch

from arqc.base import ArqcError
from arqc.runtime.backends import Backend, OrtBackend, TorchBackend, make_backend
from arqc.runtime.noise import NOISE_BLOCK, Phase, noisy_batches, point_seed
from arqc.runtime.smoothing import certify, sample_predictions

SHAPE = (3, 6, 6)


def tiny_convnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)
    ).eval()


def export(module: torch.nn.Module, batch: int | None = None) -> bytes:
    """ONNX bytes of a module; dynamic batch dimension unless ``batch`` fixes it."""
    buffer = io.BytesIO()
    dynamic = None if batch else {"x": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.zeros(batch or 1, *SHAPE), buffer, dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes=dynamic)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_convnet()


@pytest.fixture(scope="module")
def onnx_model(model) -> bytes:
    return export(model)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, SHAPE).astype(np.float32)


# --- noise ----------------------------------------------------------------------------------------


def stream(x, num, batch_size, seed, phase=Phase.ESTIMATION, sigma=0.5):
    return np.concatenate(list(noisy_batches(x, sigma, num, batch_size, seed, phase)))


def test_noise_is_reproducible_and_independent_of_batch_size(image):
    a = stream(image, 250, 7, seed=5)
    assert a.shape == (250, *SHAPE) and a.dtype == np.float32
    assert np.array_equal(a, stream(image, 250, 1000, seed=5))
    assert np.array_equal(a, stream(image, 250, NOISE_BLOCK, seed=5))
    assert np.array_equal(a[:130], stream(image, 130, 64, seed=5))  # prefix: what IRS replays


def test_noise_differs_across_seeds_phases_and_blocks(image):
    a = stream(image, 200, 200, seed=5)
    assert not np.array_equal(a, stream(image, 200, 200, seed=6))
    assert not np.array_equal(a, stream(image, 200, 200, seed=5, phase=Phase.SELECTION))
    assert not np.array_equal(a[:NOISE_BLOCK], a[NOISE_BLOCK:])
    eps = (a - image).ravel()
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 0.5) < 0.01  # N(0, σ²) with σ = 0.5


def test_point_seeds_depend_on_run_seed_and_image_id_only():
    assert point_seed(3, 17) == point_seed(3, 17)
    assert len({point_seed(s, i) for s in range(4) for i in range(50)}) == 200
    with pytest.raises(ArqcError):
        point_seed(-1, 0)


# --- torch backend --------------------------------------------------------------------------------


def test_torch_backend_chunks_and_predicts(model, image):
    x = stream(image, 10, 10, seed=1)
    whole = TorchBackend(model, batch_size=100, device="cpu")
    chunked = TorchBackend(model, batch_size=3, device="cpu")
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(whole.logits(x), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chunked.logits(x), expected, rtol=1e-6, atol=1e-6)
    assert chunked.predict(x).dtype == np.int64
    assert np.array_equal(chunked.predict(x), expected.argmax(1))
    with pytest.raises(ArqcError):
        whole.logits(x[0])  # not a batch


def test_torch_fingerprint_identifies_the_weights(model):
    a = TorchBackend(model, device="cpu").fingerprint()
    assert a == TorchBackend(tiny_convnet(0), device="cpu").fingerprint()
    assert a != TorchBackend(tiny_convnet(1), device="cpu").fingerprint()
    tweaked = tiny_convnet(0)
    with torch.no_grad():
        tweaked[3].bias[0] += 1e-6
    assert a != TorchBackend(tweaked, device="cpu").fingerprint()
    assert len(a) == 64 and int(a, 16) >= 0


def test_same_seed_same_counts_other_seed_other_predictions(model, image):
    backend = TorchBackend(model, batch_size=64, device="cpu")
    a = certify(backend, image, 0.5, 20, 300, 0.001, 100, seed=42)
    b = certify(backend, image, 0.5, 20, 300, 0.001, 37, seed=42)
    assert np.array_equal(a.counts, b.counts)
    assert (a.nA, a.radius, a.prediction) == (b.nA, b.radius, b.prediction)
    p42 = sample_predictions(backend, image, 0.5, 300, 100, 42, Phase.ESTIMATION)
    p43 = sample_predictions(backend, image, 0.5, 300, 100, 43, Phase.ESTIMATION)
    assert len(np.unique(p42)) > 1  # the noise is strong enough to change predictions...
    assert not np.array_equal(p42, p43)  # ...so another seed gives other predictions


# --- onnxruntime backend --------------------------------------------------------------------------


def test_torch_and_ort_see_the_same_samples_and_agree(model, onnx_model, image):
    torch_backend = TorchBackend(model, batch_size=64, device="cpu")
    ort_backend = OrtBackend(onnx_model, batch_size=50)
    x = stream(image, 300, 300, seed=9)
    np.testing.assert_allclose(ort_backend.logits(x), torch_backend.logits(x), rtol=1e-4, atol=1e-5)
    t = certify(torch_backend, image, 0.5, 20, 300, 0.01, 128, seed=9)
    o = certify(ort_backend, image, 0.5, 20, 300, 0.01, 128, seed=9)
    assert len(t.counts) > 1
    assert np.array_equal(t.counts, o.counts) and (t.radius, t.prediction) == (o.radius, o.prediction)


@pytest.mark.parametrize("opt_level", ["disable", "basic", "extended", "all"])
def test_ort_opt_levels_agree(onnx_model, image, opt_level):
    x = stream(image, 40, 40, seed=2)
    reference = OrtBackend(onnx_model, opt_level="disable").logits(x)
    backend = OrtBackend(onnx_model, batch_size=16, opt_level=opt_level, intra_op_threads=1)
    np.testing.assert_allclose(backend.logits(x), reference, rtol=1e-5, atol=1e-6)


def test_ort_fixed_batch_dimension_and_inputs(model, onnx_model, image, tmp_path):
    x = stream(image, 10, 10, seed=3)
    fixed = OrtBackend(export(model, batch=4))
    assert fixed.batch_size == 4
    np.testing.assert_allclose(fixed.logits(x), OrtBackend(onnx_model).logits(x), rtol=1e-5, atol=1e-6)
    path = tmp_path / "m.onnx"
    path.write_bytes(onnx_model)
    from_path = OrtBackend(str(path), optimized_model_path=str(tmp_path / "opt.onnx"))
    assert (tmp_path / "opt.onnx").is_file()
    digest = hashlib.sha256(onnx_model).hexdigest()
    assert from_path.fingerprint() == digest == OrtBackend(onnx_model).fingerprint()
    proto = onnx.load_from_string(onnx_model)
    assert OrtBackend(proto).fingerprint() == hashlib.sha256(proto.SerializeToString()).hexdigest()
    assert OrtBackend(export(tiny_convnet(1))).fingerprint() != from_path.fingerprint()


def test_ort_errors(onnx_model, tmp_path):
    with pytest.raises(ArqcError, match="opt_level"):
        OrtBackend(onnx_model, opt_level="max")
    with pytest.raises(ArqcError, match="not found"):
        OrtBackend(str(tmp_path / "missing.onnx"))
    with pytest.raises(ArqcError, match="cannot load"):
        OrtBackend(b"not an onnx model")
    with pytest.raises(ArqcError):
        OrtBackend(onnx_model, batch_size=0)


def test_make_backend_and_a_new_backend_is_one_class(model, onnx_model, image):
    assert isinstance(make_backend(model, device="cpu"), TorchBackend)
    assert isinstance(make_backend(onnx_model, batch_size=8), OrtBackend)
    with pytest.raises(ArqcError):
        make_backend("model.pt")

    class NumpyBackend(Backend):
        name = "numpy-constant"

        def _run(self, x):
            return np.tile(np.array([[0.0, 1.0, 0.0]], np.float32), (len(x), 1))

        def fingerprint(self):
            return "0" * 64

    cert = certify(NumpyBackend(batch_size=8), image, 0.25, 5, 100, 0.001, 30, seed=0)
    assert cert.prediction == 1 and cert.nA == 100


def test_torch_backend_leaves_the_callers_module_on_its_device():
    """A backend on another device runs a copy: the caller may still run its module on the CPU (the ARQ
    driver calibrates and ranks on the CPU with the model whose FP32 samples a GPU backend draws). "meta"
    stands in for a GPU here: a device that is not the module's."""
    module = tiny_convnet()
    same = TorchBackend(module, device="cpu")
    assert same.module is module
    other = TorchBackend(module, device="meta")
    assert other.module is not module
    assert all(p.device.type == "cpu" for p in module.parameters())
    assert all(p.device.type == "meta" for p in other.module.parameters())
