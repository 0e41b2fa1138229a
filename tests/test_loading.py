"""Loading model files (arqc/loading.py, arqc/archs.py): every accepted format, and refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from arqc import archs
from arqc.base import ArqcError, atomic_write
from arqc.loading import load_model, save_checkpoint
from arqc.passes.capture import capture

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def outputs(model, x=X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture
def resnet20():
    torch.manual_seed(0)
    return archs.build("resnet20")


FACTORY_MODULE = """
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def make():
    torch.manual_seed(3)
    return Small()


def broken():
    raise RuntimeError("no weights here")


def not_a_module():
    return 42
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A user module ``user_models_<id>`` on sys.path with factories make, broken and not_a_module."""
    name = f"user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


# ------------------------------------------------------------------------------------------------------
# The akamaster checkpoint


def test_akamaster_resnet20_loads_strictly_and_scores_91_5(resnet20_weights, cifar_test):
    ckpt = torch.load(resnet20_weights, map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in ckpt["state_dict"])  # the format this test is about
    loaded = load_model(str(resnet20_weights), "resnet20")
    assert loaded.arch == "resnet20" and loaded.input_shape == (3, 32, 32) and loaded.num_classes == 10
    got = loaded.model.state_dict()
    extra = set(got) - {k.removeprefix("module.") for k in ckpt["state_dict"]}
    assert all(k.endswith("num_batches_tracked") for k in extra)  # the old checkpoint lacks only those
    assert all(torch.equal(got[k.removeprefix("module.")], v) for k, v in ckpt["state_dict"].items())
    assert sum(p.numel() for p in loaded.model.parameters()) == 269_722  # as the data README says
    correct = 0
    with torch.no_grad():
        for x, y in cifar_test.batches(250):
            correct += int((loaded.model(x).argmax(1) == y).sum())
    assert len(cifar_test) == 1000
    assert correct == pytest.approx(915, abs=5), f"{correct / 10:.1f}% (expected ≈91.5%)"


def test_akamaster_weights_do_not_fit_another_depth(shared_data):
    path = shared_data / "weights/akamaster-resnet-cifar10/resnet32-d509ac18.th"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    with pytest.raises(ArqcError, match=r"do not fit arch 'resnet20'.*unexpected keys.*--arch"):
        load_model(str(path), "resnet20")
    assert load_model(str(path), "resnet32").arch == "resnet32"


# ------------------------------------------------------------------------------------------------------
# state_dicts


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("wrap", [False, True])
def test_state_dict_with_arch(tmp_path, resnet20, prefix, wrap):
    state = {prefix + k: v for k, v in resnet20.state_dict().items()}
    path = tmp_path / "w.pt"
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
    loaded = load_model(str(path), "resnet20")
    assert isinstance(loaded.model, archs.CifarResNet) and not loaded.model.training
    assert torch.equal(outputs(loaded.model), outputs(resnet20))


def test_state_dict_needs_arch(tmp_path, resnet20):
    torch.save(resnet20.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ArqcError, match="--arch"):
        load_model(str(tmp_path / "w.pt"))


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_state_dict_loading_is_strict(tmp_path, resnet20, change):
    state = resnet20.state_dict()
    if change == "missing":
        del state["linear.bias"]
    elif change == "unexpected":
        state["linear.extra"] = torch.zeros(1)
    else:
        state["linear.weight"] = torch.zeros(5, 64)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ArqcError, match="do not fit arch 'resnet20'"):
        load_model(str(tmp_path / "w.pt"), "resnet20")


def test_non_tensor_dict_is_not_a_state_dict(tmp_path):
    torch.save({"lr": 0.1, "name": "x"}, tmp_path / "w.pt")
    with pytest.raises(ArqcError, match="neither a state_dict"):
        load_model(str(tmp_path / "w.pt"), "resnet20")


# ------------------------------------------------------------------------------------------------------
# torch.export programs


@pytest.mark.parametrize("batch", ["dynamic", 4])
def test_export_program(tmp_path, batch):
    torch.manual_seed(0)
    model = archs.build("mnist_cnn")
    dynamic = ({0: torch.export.Dim("batch")},) if batch == "dynamic" else None
    program = torch.export.export(model, (torch.rand(4, 1, 28, 28),), dynamic_shapes=dynamic)
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = load_model(str(tmp_path / "m.pt2"))
    assert isinstance(loaded.model, torch.export.ExportedProgram)
    assert loaded.input_shape == (1, 28, 28) and loaded.num_classes == 10 and loaded.arch is None
    # a program exported at a static batch size must still compile (capture runs on batch 1)
    gm = capture(loaded.model, torch.zeros(1, 1, 28, 28))
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(outputs(gm, x), outputs(model, x), rtol=1e-4, atol=1e-5)


def test_damaged_export_program(tmp_path):
    model = archs.build("mnist_cnn")
    torch.export.save(torch.export.export(model, (torch.rand(1, 1, 28, 28),)), tmp_path / "m.pt2")
    data = (tmp_path / "m.pt2").read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArqcError, match="not a valid torch.export program"):
        load_model(str(tmp_path / "cut.pt2"))


@pytest.mark.parametrize("name, data", [("cut.pt2", None), ("garbage.pt2", b"garbage"), ("cut.onnx", b"\x08\x07ab")])
def test_damaged_files_print_one_line(tmp_path, name, data):
    """The whole stderr of the command is arqc's one line: torch.export logs its own traceback (13 lines) before
    raising unless arqc silences it. A separate process, so that every log handler writes where it really would."""
    if data is None:
        program = torch.export.export(archs.build("mnist_cnn"), (torch.rand(1, 1, 28, 28),))
        torch.export.save(program, tmp_path / "m.pt2")
        data = (tmp_path / "m.pt2").read_bytes()[:2000]
    (tmp_path / name).write_bytes(data)
    run = subprocess.run([sys.executable, "-m", "arqc.cli", "analyze", str(tmp_path / name), "--json",
                          str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith("arqc: error: ") and not (tmp_path / "out.json").exists()
    expected = "is an ONNX model; this command takes a PyTorch model" if name.endswith(".onnx") else "not a valid"
    assert expected in run.stderr


# ------------------------------------------------------------------------------------------------------
# arqc checkpoints


def test_checkpoint_round_trip(tmp_path, resnet20):
    card = {"data": "cifar10", "sigma": 0.25}
    save_checkpoint(tmp_path / "c.pt", resnet20, "resnet20", (3, 32, 32), 10, card)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # readable without executing code
    assert raw["format"] == "arqc-checkpoint" and raw["arch"] == "resnet20"
    loaded = load_model(str(tmp_path / "c.pt"))  # no --arch needed
    assert (loaded.arch, loaded.input_shape, loaded.num_classes, loaded.card) == ("resnet20", (3, 32, 32), 10,
                                                                                 card)
    assert torch.equal(outputs(loaded.model), outputs(resnet20))
    assert load_model(str(tmp_path / "c.pt"), "resnet20").arch == "resnet20"
    with pytest.raises(ArqcError, match="checkpoint of 'resnet20', not 'resnet32'"):
        load_model(str(tmp_path / "c.pt"), "resnet32")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


# ------------------------------------------------------------------------------------------------------
# Pickled modules


def test_pickled_module_needs_trust(tmp_path, resnet20):
    torch.save(resnet20, tmp_path / "full.pt")
    with pytest.raises(ArqcError, match="pickled Python objects.*--trust-pickle"):
        load_model(str(tmp_path / "full.pt"), "resnet20")
    loaded = load_model(str(tmp_path / "full.pt"), "resnet20", trust_pickle=True)
    assert isinstance(loaded.model, archs.CifarResNet) and loaded.input_shape == (3, 32, 32)
    assert torch.equal(outputs(loaded.model), outputs(resnet20))
    no_arch = load_model(str(tmp_path / "full.pt"), trust_pickle=True)
    assert no_arch.input_shape is None and no_arch.num_classes is None  # the CLI asks for --input-shape


def test_trusted_pickle_of_unimportable_class(tmp_path, factory_module):
    import importlib

    model = importlib.import_module(factory_module).make()
    torch.save(model, tmp_path / "full.pt")
    sys.modules.pop(factory_module)
    sys.path.remove(str(tmp_path))
    with pytest.raises(ArqcError, match="cannot unpickle"):
        load_model(str(tmp_path / "full.pt"), trust_pickle=True)


# ------------------------------------------------------------------------------------------------------
# Architectures


def test_user_factory_arch(tmp_path, factory_module):
    arch = f"{factory_module}:make"
    fresh = load_model(None, arch)
    assert type(fresh.model).__name__ == "Small" and fresh.input_shape is None
    torch.manual_seed(9)
    other = type(fresh.model)()
    torch.save(other.state_dict(), tmp_path / "w.pt")
    loaded = load_model(str(tmp_path / "w.pt"), arch)
    assert torch.equal(outputs(loaded.model), outputs(other))
    assert not torch.equal(outputs(fresh.model), outputs(other))


@pytest.mark.parametrize("spec, message", [
    ("resnet99", "unknown arch 'resnet99'"),
    ("no_such_package_xyz.models:make", "cannot import arch factory"),
    ("{mod}:missing", "cannot import arch factory"),
    ("{mod}:broken", "arch factory .* failed: RuntimeError: no weights here"),
    ("{mod}:not_a_module", "returned int, not a torch.nn.Module"),
])
def test_bad_arch(factory_module, spec, message):
    with pytest.raises(ArqcError, match=message):
        archs.build(spec.format(mod=factory_module))


def test_builtin_archs_fit_their_declared_shapes():
    for name in ("resnet20", "mnist_cnn"):
        spec = archs.get_arch(name)
        with torch.no_grad():
            out = archs.build(name)(torch.rand(2, *spec.input_shape))
        assert out.shape == (2, spec.num_classes)


def test_normalization_constants_are_not_weights():
    assert not any("normalize" in k for k in archs.build("resnet20").state_dict())


# ------------------------------------------------------------------------------------------------------
# Bad files


def test_missing_file():
    with pytest.raises(ArqcError, match="does not exist"):
        load_model("/nonexistent/model.pt", "resnet20")


def test_no_file_no_arch():
    with pytest.raises(ArqcError, match="--arch"):
        load_model(None)


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "text"])
def test_corrupt_files(tmp_path, resnet20, damage):
    path = tmp_path / "bad.pt"
    torch.save(resnet20.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes({"random": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8).numpy().tobytes(),
                      "truncated": data[: len(data) // 3], "empty": b"", "text": b"hello\n"}[damage])
    with pytest.raises(ArqcError, match="corrupt") as err:
        load_model(str(path), "resnet20")
    assert "\n" not in str(err.value)


def test_loaded_model_is_a_module():
    assert isinstance(load_model(None, "mnist_cnn").model, nn.Module)
