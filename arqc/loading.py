"""Loading models from files, safely.

Accepted inputs:
- ``.pt``/``.pth``/``.th``: a state_dict (needs ``--arch``), a checkpoint dict holding ``state_dict``
  (e.g. akamaster's, needs ``--arch``), or arqc's own checkpoint (``state_dict`` + ``arch``, see
  :func:`save_checkpoint`). Read with ``torch.load(weights_only=True)``; a ``module.`` prefix (DataParallel)
  is removed.
- ``.pt2``: a ``torch.export`` program.
- a fully pickled nn.Module, only with ``trust_pickle=True`` (it executes code from the file).
- no file at all, with ``--arch``: fresh weights, for counting (``arqc analyze --arch resnet20``).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from arqc import archs
from arqc.base import ArqcError, atomic_write

CHECKPOINT_FORMAT = "arqc-checkpoint"


@dataclass
class LoadedModel:
    model: nn.Module | torch.export.ExportedProgram
    arch: str | None
    input_shape: tuple[int, ...] | None  # C, H, W
    num_classes: int | None
    source: str
    card: dict = field(default_factory=dict)  # training card of arqc checkpoints
    # arqc checkpoints: where the training ("train") and held-out test ("test") images are, as data specs whose
    # relative paths are relative to the checkpoint's folder (arqc.data.rebase_spec reads them from elsewhere)
    data_specs: dict[str, str] = field(default_factory=dict)


def load_model(path: str | None, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load a model file (or build ``arch`` with fresh weights when ``path`` is None)."""
    if path is None:
        if arch is None:
            raise ArqcError("give a model file, or --arch NAME to count an architecture without weights")
        spec = archs.get_arch(arch)
        return LoadedModel(archs.build(arch), arch, spec.input_shape, spec.num_classes, f"--arch {arch}")
    p = Path(path)
    if not p.is_file():
        raise ArqcError(f"model file {path} does not exist; check the path")
    if p.suffix == ".pt2":
        return _load_export(p)
    if p.suffix == ".onnx":
        raise ArqcError(f"{path} is an ONNX model; this command takes a PyTorch model (.pt/.pth/.th state_dict or "
                        "checkpoint, .pt2 export). Certify an ONNX model with `arqc certify`, inspect one arqc wrote "
                        "with `arqc report`")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        # torch says "Weights only load failed" for any refused opcode, also in random bytes; only a
        # refused global or function call means that the file holds pickled objects
        if "Unsupported global" in str(err) or "unrecognized function" in str(err):
            raise ArqcError(f"{path} holds pickled Python objects (a full nn.Module?) that loading would "
                            "execute; pass --trust-pickle only if you trust the file, or save a state_dict "
                            "instead") from None
        raise ArqcError(f"cannot read {path}: the file is corrupt or truncated "
                        "(not pickle data that torch.load can read)") from None
    except (ImportError, AttributeError) as err:  # trusted pickle of a class that cannot be imported here
        raise ArqcError(f"cannot unpickle {path}: {_first_line(err)}; make the model's code importable "
                        "(PYTHONPATH), or save a state_dict and pass --arch") from None
    except Exception as err:  # whatever a damaged file makes the unpickler raise (EOFError, KeyError, ...)
        raise ArqcError(f"cannot read {path}: the file is corrupt, truncated or not a PyTorch file "
                        f"({_first_line(err)})") from None
    if isinstance(obj, nn.Module):
        spec = archs.get_arch(arch) if arch else None
        return LoadedModel(obj.eval(), arch, spec.input_shape if spec else None,
                           spec.num_classes if spec else None, str(path))
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        arch = arch or obj["arch"]
        if arch != obj["arch"]:
            raise ArqcError(f"{path} is an arqc checkpoint of '{obj['arch']}', not '{arch}'; drop --arch")
        model = _with_state_dict(arch, obj["state_dict"], path)
        return LoadedModel(model, arch, tuple(obj["input_shape"]), obj["num_classes"], str(path),
                           obj.get("card", {}), dict(obj.get("data_specs") or {}))
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArqcError(f"{path} holds neither a state_dict nor a checkpoint with one; save "
                        "model.state_dict() or use arqc's checkpoint format")
    if arch is None:
        raise ArqcError(f"{path} holds only weights; say which architecture they belong to with --arch "
                        f"({', '.join(archs.ARCHS)} or package.module:factory)")
    spec = archs.get_arch(arch)
    return LoadedModel(_with_state_dict(arch, state, path), arch, spec.input_shape, spec.num_classes, str(path))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Silence the logger ``name`` (and its children) for the block: a damaged file must end in arqc's one line."""
    logger = logging.getLogger(name)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate


def _load_export(p: Path) -> LoadedModel:
    try:
        with _quiet_logger("torch.export"):  # it logs its own traceback before raising
            ep = torch.export.load(str(p))
    except Exception as err:  # torch.export.load raises many types for damaged archives
        raise ArqcError(f"cannot read {p}: not a valid torch.export program ({_first_line(err)})") from None
    inputs = [s for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    if len(inputs) != 1:
        raise ArqcError(f"{p} takes {len(inputs)} inputs; arqc compiles classifiers with one image input")
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name)
    shape = tuple(int(d) for d in node.meta["val"].shape[1:])
    out = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, list | tuple) else out
    classes = int(out.meta["val"].shape[-1]) if "val" in out.meta else None
    return LoadedModel(ep, None, shape, classes, str(p))


def _with_state_dict(arch: str, state: dict, path) -> nn.Module:
    model = archs.build(arch)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)  # key mismatches are reported below
    except RuntimeError as err:
        raise ArqcError(f"the weights in {path} do not fit arch '{arch}' (shape mismatch: "
                        f"{_first_line(err)[:160]}); check --arch") from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ArqcError(f"the weights in {path} do not fit arch '{arch}': {len(missing)} missing and "
                        f"{len(unexpected)} unexpected keys (e.g. '{first}'); check --arch")
    return model.eval()


def save_checkpoint(path: str | Path, model: nn.Module, arch: str, input_shape, num_classes: int,
                    card: dict | None = None, data_specs: dict[str, str] | None = None) -> None:
    """arqc's own checkpoint: a plain dict that ``torch.load(weights_only=True)`` reads back. ``data_specs``:
    where its training and held-out test images are ({"train": SPEC, "test": SPEC}; a relative path in a spec
    is read relative to the checkpoint's folder, so that a shipped model can name shipped data)."""
    obj = {"format": CHECKPOINT_FORMAT, "version": 1, "arch": arch, "input_shape": list(input_shape),
           "num_classes": int(num_classes), "state_dict": model.state_dict(), "card": card or {}}
    if data_specs:
        obj["data_specs"] = dict(data_specs)
    atomic_write(path, lambda f: torch.save(obj, f))


def record_data_specs(path: str | Path, specs: dict[str, str]) -> None:
    """Record in the arqc checkpoint ``path`` where its training and test images are (weights untouched)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ArqcError(f"{path} is not an arqc checkpoint; only those record data specs")
    obj["data_specs"] = dict(specs)
    atomic_write(path, lambda f: torch.save(obj, f))
