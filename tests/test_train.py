"""arqc train: a tiny end-to-end run, resume == uninterrupted, exclusion, one-line errors for bad input."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import arqc.train as train_mod
from arqc import archs
from arqc.cli import main
from arqc.data import load_images
from arqc.loading import load_model, save_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
AKAMASTER = SHARED / "weights/akamaster-resnet-cifar10/resnet20-12fca82f.th"


def _npz(path: Path, n: int, shape: tuple[int, ...], seed: int = 0) -> str:
    """Synthetic labelled images: the label is which quarter of the image is brightest (learnable)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 80, size=(n, *shape), dtype=np.uint8)
    y = rng.integers(0, 4, size=n)
    h = shape[-2] // 2
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, ..., r * h : (r + 1) * h, c * h : (c + 1) * h] += 150
    np.savez(path, x=x, y=y.astype(np.int64), num_classes=np.int64(10))
    return f"npz:{path}"


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``arqc ARGV`` in-process (sys.argv as the real command line would set it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["arqc", *argv])
        return _run_main(argv, capsys)


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def _args(data: str, out: Path, *extra: str, epochs: int = 1, batch_size: int = 64) -> list[str]:
    return ["train", "--arch", "mnist_cnn", "--data", data, "--sigma", "0.25", "--epochs", str(epochs),
            "--lr", "0.02", "--batch-size", str(batch_size), "--seed", "3", "--no-progress", "-o", str(out),
            *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(str(path)).model.state_dict()


def test_one_epoch_end_to_end(tmp_path, capsys):
    # 512 easy images (the label is the bright quarter: chance is 1/4), 32 steps of 16: one epoch learns them
    data = _npz(tmp_path / "d.npz", 512, (28, 28))
    out = tmp_path / "m.pt"
    code, stdout, err = _run(_args(data, out, batch_size=16), capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    loaded = load_model(str(out))
    assert loaded.arch == "mnist_cnn" and loaded.input_shape == (1, 28, 28) and loaded.num_classes == 10
    # training moved every parameter away from the fresh weights of --seed 3 ...
    torch.manual_seed(3)
    fresh = archs.build("mnist_cnn").state_dict()
    trained = loaded.model.state_dict()
    assert all(not torch.equal(trained[k], v) for k, v in fresh.items() if k.endswith(("weight", "bias")))
    # ... towards the labels: the clean training images are learnt (chance 0.25), the noisy ones well beyond chance
    images = load_images(data)
    with torch.no_grad():
        clean_accuracy = (loaded.model.eval()(images.x).argmax(1) == images.y).float().mean().item()
    assert clean_accuracy >= 0.9
    card = loaded.card
    assert card["final_accuracy"] == {"train_noisy_accuracy": card["history"][0]["train_noisy_accuracy"]}
    assert card["final_accuracy"]["train_noisy_accuracy"] >= 0.5 and card["final_train_loss"] < math.log(10)
    assert [h["epoch"] for h in card["history"]] == [1]
    # the card records the settings this run used
    assert card["data"] == data and card["sigma"] == 0.25 and card["epochs"] == 1 and card["init"] is None
    assert (card["lr"], card["batch_size"], card["seed"], card["schedule"]) == (0.02, 16, 3, "cosine")
    assert card["augment"] == "none" and card["init_sha256"] is None and card["val"] is None  # auto, digits
    assert card["optimizer"] == "SGD momentum=0.9 weight_decay=0.0001" and card["excluded"] == []
    assert card["train_images"] == 512 and card["command"].startswith("arqc train --arch mnist_cnn")
    assert "--batch-size 16" in card["command"]
    assert card["train_data_sha256"] == hashlib.sha256(images.x.contiguous().numpy().tobytes()).hexdigest()
    assert not Path(f"{out}.resume").exists()  # removed once the final checkpoint is written
    # the saved weights are float32 and contiguous, whatever memory format training used
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in trained.values())


def test_seed_draws_the_order_and_noise_too(tmp_path, capsys):
    """From the same --init weights, --seed alone changes the batches and the noise (so the weights), and the
    same --seed repeats them exactly."""
    data = _npz(tmp_path / "d.npz", 64, (28, 28))
    torch.manual_seed(7)
    init = tmp_path / "init.pt"
    torch.save(archs.build("mnist_cnn").state_dict(), init)
    runs = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 1)):
        argv = _args(data, tmp_path / f"{name}.pt", "--init", str(init), batch_size=16)
        argv[argv.index("--seed") + 1] = str(seed)
        code, _, err = _run(argv, capsys)
        assert code == 0, err
        runs[name] = _weights(tmp_path / f"{name}.pt")
    assert all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"]["fc2.weight"], runs["b"]["fc2.weight"])


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    data = _npz(tmp_path / "d.npz", 96, (28, 28))
    full, cut = tmp_path / "full.pt", tmp_path / "cut.pt"
    assert _run(_args(data, full, epochs=2), capsys)[0] == 0

    real_epoch = train_mod._run_epoch
    def interrupted(*args, **kwargs):
        if args[4] == 1:  # the second epoch: stop as if the machine went down
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(train_mod, "_run_epoch", interrupted)
    code, _, err = _run(_args(data, cut, epochs=2), capsys)
    assert code == 130 and not cut.exists() and Path(f"{cut}.resume").exists()
    monkeypatch.setattr(train_mod, "_run_epoch", real_epoch)

    code, _, err = _run(_args(data, cut, epochs=2), capsys)  # no --resume: refuse to clobber the run
    assert code == 2 and "--resume" in err
    code, _, err = _run(_args(data, cut, "--lr", "0.05", "--resume", epochs=2), capsys)  # other settings
    assert code == 2 and err.startswith("arqc: error: --resume:") and "lr" in err
    code, stdout, err = _run(_args(data, cut, "--resume", epochs=2), capsys)
    assert code == 0, err
    assert "after epoch 1 of 2" in stdout
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in load_model(str(cut)).card["history"]] == [1, 2]


def test_exclude_drops_matching_images(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", 100, (28, 28))
    with np.load(tmp_path / "d.npz") as z:
        np.savez(tmp_path / "ex.npz", x=z["x"][10:30], y=z["y"][10:30])
    out = tmp_path / "m.pt"
    code, stdout, err = _run(_args(data, out, "--exclude", f"npz:{tmp_path / 'ex.npz'}"), capsys)
    assert code == 0, err
    card = load_model(str(out)).card
    assert card["train_images"] == 80
    assert card["excluded"][0]["removed_from_training"] == 20 and card["excluded"][0]["images"] == 20


def test_test_data_is_kept_out_of_training_and_recorded(tmp_path, capsys, monkeypatch):
    _npz(tmp_path / "d.npz", 100, (28, 28))
    with np.load(tmp_path / "d.npz") as z:
        np.savez(tmp_path / "held.npz", x=z["x"][:25], y=z["y"][:25])
    monkeypatch.chdir(tmp_path)  # relative specs are recorded as absolute paths: the checkpoint is read anywhere
    code, _, err = _run(_args("npz:d.npz", tmp_path / "m.pt", "--test-data", "npz:held.npz"), capsys)
    assert code == 0, err
    loaded = load_model(str(tmp_path / "m.pt"))
    assert loaded.card["train_images"] == 75 and loaded.card["excluded"][0]["removed_from_training"] == 25
    assert loaded.data_specs == {"train": f"npz:{tmp_path / 'd.npz'}", "test": f"npz:{tmp_path / 'held.npz'}"}


def test_init_from_an_akamaster_style_checkpoint(tmp_path, capsys):
    """A `module.`-prefixed state_dict in {'state_dict': ..., 'best_prec1': ...}, as akamaster ships them."""
    torch.manual_seed(1)  # not the run's --seed (0): a run that ignored --init would start elsewhere
    net = archs.build("resnet20")
    with torch.no_grad():  # and BatchNorm statistics unlike a fresh build's (zero mean, unit variance)
        for name, buffer in net.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    init = tmp_path / "aka.th"
    prefixed = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"best_prec1": 0.0, "state_dict": prefixed}, init)
    torch.manual_seed(0)
    seed0 = archs.build("resnet20").state_dict()  # what the run builds without --init
    assert not torch.equal(seed0["conv1.weight"], net.state_dict()["conv1.weight"])
    data = _npz(tmp_path / "c.npz", 8, (3, 32, 32))
    out = tmp_path / "r.pt"
    argv = ["train", "--arch", "resnet20", "--data", data, "--sigma", "0.5", "--epochs", "1", "--lr", "1e-9",
            "--batch-size", "8", "--init", str(init), "--no-progress", "-o", str(out)]
    # the run starts from the --init weights, every tensor of them (the prefix dropped), not from its seed's
    start = train_mod.prepare_training(train_mod.TrainConfig(arch="resnet20", data=data, sigma=0.5, epochs=1,
                                                             output=str(out), init=str(init))).model
    start_state, want = start.state_dict(), net.state_dict()
    assert start_state.keys() == want.keys() and all(torch.equal(start_state[k], want[k]) for k in want)
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    card = load_model(str(out)).card
    assert card["init"] == str(init) and card["init_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    trained = _weights(out)  # lr 1e-9: the weights stay where they started
    assert torch.allclose(trained["conv1.weight"], want["conv1.weight"], atol=1e-6)
    assert not torch.allclose(trained["conv1.weight"], seed0["conv1.weight"], atol=1e-3)


@pytest.mark.skipif(not AKAMASTER.is_file(), reason="shared akamaster weights not present")
def test_real_akamaster_checkpoint_loads_as_init(tmp_path):
    cfg = train_mod.TrainConfig(arch="resnet20", data=_npz(tmp_path / "c.npz", 8, (3, 32, 32)), sigma=0.25,
                                epochs=1, output=str(tmp_path / "r.pt"), init=str(AKAMASTER))
    prep = train_mod.prepare_training(cfg)
    assert prep.init_sha256.startswith("12fca82f")


def _assert_one_line_error(code: int, err: str, out: Path, *words: str) -> None:
    assert code == 2
    assert err.startswith("arqc: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not out.exists() and not Path(f"{out}.resume").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp leftovers


@pytest.mark.parametrize("change, words", [
    ({"--arch": "resnet21"}, ["unknown arch", "resnet21"]),
    ({"--sigma": "0"}, ["--sigma", "positive"]),
    ({"--sigma": "-0.25"}, ["--sigma", "positive"]),
    ({"--epochs": "0"}, ["--epochs"]),
])
def test_bad_options(tmp_path, capsys, change, words):
    data = _npz(tmp_path / "d.npz", 16, (28, 28))
    out = tmp_path / "m.pt"
    argv = _args(data, out)
    for key, value in change.items():
        argv[argv.index(key) + 1] = value
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, out, *words)


def test_data_that_does_not_fit_the_arch(tmp_path, capsys):
    data = _npz(tmp_path / "c.npz", 16, (3, 32, 32))
    out = tmp_path / "m.pt"
    code, _, err = _run(_args(data, out), capsys)
    _assert_one_line_error(code, err, out, "3x32x32", "1x28x28")


def test_init_checkpoint_of_another_arch(tmp_path, capsys):
    data = _npz(tmp_path / "c.npz", 16, (3, 32, 32))
    other = tmp_path / "mnist.pt"
    save_checkpoint(other, archs.build("mnist_cnn"), "mnist_cnn", (1, 28, 28), 10)
    plain = tmp_path / "mnist_state.pt"
    torch.save(archs.build("mnist_cnn").state_dict(), plain)
    out = tmp_path / "r.pt"
    for init, words in ((other, ["'mnist_cnn'", "resnet20"]), (plain, ["--init", "resnet20"])):
        argv = ["train", "--arch", "resnet20", "--data", data, "--sigma", "0.25", "--epochs", "1",
                "--init", str(init), "--no-progress", "-o", str(out)]
        code, _, err = _run(argv, capsys)
        _assert_one_line_error(code, err, out, *words)


def test_resume_without_a_resume_file(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", 16, (28, 28))
    out = tmp_path / "m.pt"
    code, _, err = _run(_args(data, out, "--resume"), capsys)
    _assert_one_line_error(code, err, out, "--resume", "no resume file")
