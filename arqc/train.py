"""Train a classifier with Gaussian noise augmentation (Cohen et al. 2019), for randomized smoothing.

Noise ε ~ N(0, σ²I) is added in pixel space (images in [0, 1], no clamping) *before* the model, whose
normalization layer lives inside the model: exactly where ``arqc certify`` adds its noise. SGD with
momentum and a per-step learning rate from a cosine or one-cycle schedule.

Every random draw of an epoch (order, crops, flips, noise) comes from a generator seeded by (seed, epoch),
and after every epoch a resume file (weights, optimizer state, epoch, settings) is written atomically
beside the output, so a run interrupted after epoch k and resumed gives the same weights as an
uninterrupted run. The final output is an arqc checkpoint (:func:`arqc.loading.save_checkpoint`) with a
training card; the resume file is deleted once it is written.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from arqc import archs
from arqc.augment import AUGMENTS, augment, resolve_augment
from arqc.base import ArqcError, __version__, atomic_write, first_difference
from arqc.data import ImageSet, check_compatible, load_images, rebase_spec
from arqc.loading import load_model, save_checkpoint
from arqc.runtime.devices import resolve_device

SCHEDULES = ("cosine", "onecycle")
RESUME_FORMAT = "arqc-train-resume"
NOISE_NOTE = ("Gaussian N(0, sigma^2 I) added to [0, 1] pixels before the model (normalization inside it), "
              "no clamping")


@dataclass
class TrainConfig:
    """What a run is; a resumed run must match the interrupted one in every field but ``command``."""

    arch: str
    data: str
    sigma: float
    epochs: int
    output: str
    init: str | None = None
    lr: float = 0.1
    schedule: str = "cosine"
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: str = "auto"
    exclude: list[str] = field(default_factory=list)
    val: str | None = None
    seed: int = 0
    command: str = ""
    test_data: str | None = None  # held-out test images: excluded from training, recorded in the checkpoint


def resume_path(output: str | Path) -> Path:
    """The per-epoch resume file of a run writing ``output``: ``model.pt`` -> ``model.pt.resume``."""
    return Path(f"{output}.resume")


def check_config(cfg: TrainConfig) -> None:
    """Raise ArqcError for settings that cannot be trained."""
    if not (cfg.sigma > 0 and math.isfinite(cfg.sigma)):
        raise ArqcError(f"--sigma must be a positive number (the noise std in [0, 1] pixel units), "
                        f"got {cfg.sigma}")
    if cfg.epochs < 1:
        raise ArqcError(f"--epochs must be at least 1, got {cfg.epochs}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ArqcError(f"--lr must be positive, got {cfg.lr}")
    if cfg.batch_size < 1:
        raise ArqcError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if not 0 <= cfg.momentum < 1 or cfg.weight_decay < 0:
        raise ArqcError(f"need 0 <= --momentum < 1 and --weight-decay >= 0, "
                        f"got {cfg.momentum}, {cfg.weight_decay}")
    if cfg.schedule not in SCHEDULES:
        raise ArqcError(f"unknown --schedule '{cfg.schedule}'; use one of {', '.join(SCHEDULES)}")
    if cfg.augment not in AUGMENTS:
        raise ArqcError(f"unknown --augment '{cfg.augment}'; use one of {', '.join(AUGMENTS)}")
    if cfg.seed < 0:
        raise ArqcError(f"--seed must be >= 0, got {cfg.seed}")


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` of ``total`` (a pure function: nothing to resume)."""
    t = step / max(total, 1)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    warm = 0.3  # one-cycle: linear warm-up from lr/25 over 30% of the steps, then cosine down to lr/1e4
    if t < warm:
        return cfg.lr * (1 / 25 + (1 - 1 / 25) * t / warm)
    return cfg.lr * (1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (1 - warm))))


def exclude_images(images: ImageSet, specs: list[str]) -> tuple[ImageSet, list[dict]]:
    """``images`` without every image whose pixels equal (bit for bit) an image of one of ``specs``."""
    if not specs:
        return images, []
    rows = images.x.reshape(len(images), -1).numpy()
    keep = torch.ones(len(images), dtype=torch.bool)
    report = []
    for spec in specs:
        other = load_images(spec)
        if tuple(other.x.shape[1:]) != tuple(images.x.shape[1:]):
            raise ArqcError(f"--exclude '{spec}' has images of shape {'x'.join(map(str, other.x.shape[1:]))} "
                            f"but the training data has {'x'.join(map(str, images.x.shape[1:]))}; "
                            "exclude images of the training data's shape")
        banned = {r.tobytes() for r in other.x.reshape(len(other), -1).numpy()}
        hits = torch.tensor([r.tobytes() in banned for r in rows], dtype=torch.bool)
        report.append({"spec": spec, "images": len(other), "sha256": _tensor_digest(other.x),
                       "removed_from_training": int((hits & keep).sum()), "matched": int(hits.sum())})
        keep &= ~hits
    index = torch.nonzero(keep).flatten()
    if len(index) == 0:
        raise ArqcError("--exclude removed every training image; check the --exclude data")
    kept = ImageSet(images.x[index], images.y[index], images.ids[index], images.spec, images.num_classes)
    return kept, report


def _tensor_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class TrainingRun:
    """A validated run: everything loaded, nothing written yet."""

    cfg: TrainConfig
    model: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    train: ImageSet
    val: ImageSet | None
    excluded: list[dict]
    init_sha256: str | None


def prepare_training(cfg: TrainConfig) -> TrainingRun:
    """Check the settings, load the data and build (or load) the model; raise ArqcError on any problem."""
    check_config(cfg)
    spec = archs.get_arch(cfg.arch)
    images = load_images(cfg.data)
    input_shape = spec.input_shape or tuple(images.x.shape[1:])
    num_classes = spec.num_classes or images.num_classes
    check_compatible(images, input_shape, num_classes)
    val = load_images(cfg.val) if cfg.val else None
    if val is not None:
        check_compatible(val, input_shape, num_classes)
    images, excluded = exclude_images(images, cfg.exclude + ([cfg.test_data] if cfg.test_data else []))
    torch.manual_seed(cfg.seed)  # fresh weights depend on the seed only
    if cfg.init:
        model = _init_model(cfg.init, cfg.arch)
    else:
        model = archs.build(cfg.arch)
    with torch.no_grad():
        try:
            out = model.eval()(images.x[:2])
        except RuntimeError as err:
            raise ArqcError(f"arch '{cfg.arch}' cannot run on images of shape "
                            f"{'x'.join(map(str, images.x.shape[1:]))} ({str(err).splitlines()[0][:120]}); "
                            "use data that matches the arch") from None
    if out.ndim != 2 or out.shape[1] < num_classes:
        raise ArqcError(f"arch '{cfg.arch}' gives outputs of shape {tuple(out.shape)} but the data has "
                        f"{num_classes} classes; use an arch with one logit per class")
    return TrainingRun(cfg, model, tuple(input_shape), int(out.shape[1]), images, val, excluded,
                    _file_digest(cfg.init) if cfg.init else None)


def _init_model(path: str, arch: str) -> nn.Module:
    """The ``--init`` weights: an arqc checkpoint of ``arch`` or a state_dict (``module.`` prefix allowed)."""
    try:
        probe = load_model(path)  # arqc checkpoints know their arch; plain state_dicts raise here
    except ArqcError:
        probe = None
    if probe is not None and probe.arch is not None and probe.arch != arch:
        raise ArqcError(f"--init {path} holds a '{probe.arch}' model but --arch is '{arch}'; "
                        f"give an --init checkpoint of {arch}, or --arch {probe.arch}")
    try:
        loaded = load_model(path, arch)
    except ArqcError as err:
        raise ArqcError(f"--init: {err}") from None
    if not isinstance(loaded.model, nn.Module):
        raise ArqcError(f"--init {path} is not a trainable torch.nn.Module; give a state_dict or checkpoint")
    return loaded.model


def _resume_header(cfg: TrainConfig) -> dict:
    settings = asdict(cfg)
    settings.pop("command")
    return settings


def _load_resume(cfg: TrainConfig) -> dict:
    path = resume_path(cfg.output)
    if not path.is_file():
        raise ArqcError(f"--resume: no resume file {path}; run without --resume to start from scratch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for damaged files
        raise ArqcError(f"--resume: cannot read {path} ({str(err).splitlines()[0][:120]}); "
                        "delete it and start again") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ArqcError(f"--resume: {path} is not an arqc training resume file; delete it")
    want = _resume_header(cfg)
    k = first_difference(state["settings"], want, keys=want)
    if k is not None:
        raise ArqcError(f"--resume: {path} belongs to a run with other settings "
                        f"({k}={state['settings'].get(k)!r}, now {want[k]!r}); "
                        "resume with the same options or delete the file")
    return state


def train(prep: TrainingRun, resume: bool = False, device: str | None = None, progress: bool = True,
          log=print) -> dict:
    """Run (or continue) the training of ``prep``; write the final checkpoint and return its card."""
    cfg = prep.cfg
    dev = resolve_device(device)
    model = prep.model.to(dev)
    channels_last = dev.type == "cpu" and prep.train.x.ndim == 4  # faster convolutions on CPU
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    start_epoch, history, seconds = 0, [], 0.0
    rpath = resume_path(cfg.output)
    if resume:
        state = _load_resume(cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history, seconds = int(state["epoch"]), list(state["history"]), float(state["seconds"])
        log(f"resuming {rpath} after epoch {start_epoch} of {cfg.epochs}")
    elif rpath.exists():
        raise ArqcError(f"{rpath} exists from an interrupted run; pass --resume to continue it, "
                        "or delete it to start over")
    kind = resolve_augment(cfg.augment, prep.train.x)
    steps_per_epoch = math.ceil(len(prep.train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        stats = _run_epoch(model, optimizer, prep, kind, epoch, steps_per_epoch, total, dev, channels_last,
                           progress)
        if prep.val is not None:
            stats.update(evaluate(model, prep.val, cfg.sigma, cfg.seed, dev, cfg.batch_size))
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, **stats})
        log(f"epoch {epoch + 1}/{cfg.epochs}: " + "  ".join(f"{k} {v:.4f}" for k, v in stats.items()))
        state = {"format": RESUME_FORMAT, "settings": _resume_header(cfg), "epoch": epoch + 1,
                 "history": history, "seconds": seconds, "model": _plain_state(model),
                 "optimizer": optimizer.state_dict()}
        atomic_write(rpath, lambda f, state=state: torch.save(state, f))
    card = _card(prep, history, seconds, dev, kind)
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    specs = {"train": cfg.data} | ({"test": cfg.test_data} if cfg.test_data else {})
    save_checkpoint(cfg.output, model, cfg.arch, prep.input_shape, prep.num_classes, card,
                    {role: rebase_spec(spec, Path.cwd()) for role, spec in specs.items()})
    rpath.unlink(missing_ok=True)
    return card


def _plain_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _run_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, prep: TrainingRun, kind: str, epoch: int,
               steps_per_epoch: int, total: int, dev: torch.device, channels_last: bool,
               progress: bool) -> dict:
    cfg = prep.cfg
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # one stream per (seed, epoch)
    order = torch.randperm(len(prep.train), generator=gen)
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
               unit="batch", leave=False)
    for i in bar:
        index = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        x = augment(prep.train.x[index], kind, gen)
        x = x + cfg.sigma * torch.randn(x.shape, generator=gen)
        y = prep.train.y[index]
        x, y = x.to(dev), y.to(dev)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, epoch * steps_per_epoch + i, total)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise ArqcError(f"training diverged (loss {loss.item()}) in epoch {epoch + 1}; lower --lr")
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    return {"train_loss": loss_sum / seen, "train_noisy_accuracy": correct / seen,
            "lr_end": learning_rate(cfg, (epoch + 1) * steps_per_epoch, total)}


def evaluate(model: nn.Module, images: ImageSet, sigma: float, seed: int, dev: torch.device,
             batch_size: int = 256) -> dict:
    """Accuracy of the base classifier on clean images and on one noisy copy of each (not a certificate)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed + 7)
    clean = noisy = 0
    with torch.inference_mode():
        for x, y in images.batches(batch_size):
            xn = x + sigma * torch.randn(x.shape, generator=gen)
            y = y.to(dev)
            clean += int((model(x.to(dev)).argmax(1) == y).sum())
            noisy += int((model(xn.to(dev)).argmax(1) == y).sum())
    return {"val_clean_accuracy": clean / len(images), "val_noisy_accuracy": noisy / len(images)}


def _card(prep: TrainingRun, history: list[dict], seconds: float, dev: torch.device, kind: str) -> dict:
    cfg = prep.cfg
    last = history[-1] if history else {}
    return {
        "data": cfg.data,
        "train_images": len(prep.train),
        "train_data_sha256": _tensor_digest(prep.train.x),
        "excluded": prep.excluded,
        "sigma": cfg.sigma,
        "noise": NOISE_NOTE,
        "epochs": cfg.epochs,
        "init": cfg.init,
        "init_sha256": prep.init_sha256,
        "optimizer": f"SGD momentum={cfg.momentum} weight_decay={cfg.weight_decay}",
        "lr": cfg.lr,
        "schedule": cfg.schedule,
        "batch_size": cfg.batch_size,
        "augment": kind,
        "seed": cfg.seed,
        "val": cfg.val,
        "final_accuracy": {k: v for k, v in last.items() if "accuracy" in k},
        "final_train_loss": last.get("train_loss"),
        "history": history,
        "device": dev.type,
        "train_seconds": round(seconds, 1),
        "torch": str(torch.__version__),
        "arqc": __version__,
        "command": cfg.command,
    }
