"""Load labelled image data sets from a spec string: cifar10, mnist, imagefolder or npz.

Specs: ``cifar10:DIR[:train|:test]``, ``mnist:DIR[:train|:test]``, ``imagefolder:DIR``, ``npz:FILE``.
Every problem with the user's data raises :class:`arqc.base.ArqcError` with a one-line message.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib
import io
import math
import os
import pickle
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from arqc.base import ArqcError

KINDS = ("cifar10", "mnist", "imagefolder", "npz")
SPLIT_KINDS = ("cifar10", "mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_Loaded = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]  # x, y, ids, num_classes
SPEC_HELP = "use cifar10:DIR[:train|:test], mnist:DIR[:train|:test], imagefolder:DIR or npz:FILE"


@dataclass
class ImageSet:
    """Images (float32 NCHW in [0, 1]) with int64 labels and stable int64 ids into the source split."""

    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor
    spec: str
    num_classes: int

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, num: int | None = None, skip: int = 1, start: int = 0) -> ImageSet:
        """Every `skip`-th image from index `start`, at most `num` of them; ids are kept."""
        if skip < 1 or start < 0 or (num is not None and num < 1):
            raise ArqcError(f"bad subset num={num} skip={skip} start={start}; "
                            "use num >= 1, skip >= 1, start >= 0")
        if start >= len(self):
            raise ArqcError(f"subset start={start} is past the end of the {len(self)} images "
                            f"in '{self.spec}'; use a smaller start")
        index = torch.arange(start, len(self), skip)[:num]
        return ImageSet(self.x[index], self.y[index], self.ids[index], self.spec, self.num_classes)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches of at most `batch_size` images, in order."""
        if batch_size < 1:
            raise ArqcError(f"batch size must be at least 1, got {batch_size}")
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size]


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """Split a data spec into (kind, path, split); split is None for kinds without splits."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        raise ArqcError(f"data spec '{spec}': unknown kind '{kind}'; {SPEC_HELP}")
    split = None
    head, sep, tail = rest.rpartition(":")
    if sep and tail in ("train", "test"):
        if kind not in SPLIT_KINDS:
            raise ArqcError(f"data spec '{spec}': {kind} takes no split; "
                            "point it at the split's own folder or file")
        rest, split = head, tail
    elif kind in SPLIT_KINDS:
        split = "test"
    if not rest:
        raise ArqcError(f"data spec '{spec}': no path given; {SPEC_HELP}")
    return kind, os.path.expanduser(rest), split


def rebase_spec(spec: str, folder: str | Path) -> str:
    """``spec`` with a relative path read relative to ``folder``: the same data, named from anywhere."""
    kind, path, split = parse_spec(spec)
    path = os.path.abspath(os.path.join(folder, path))
    return f"{kind}:{path}" + (f":{split}" if split else "")


def load_images(spec: str) -> ImageSet:
    """Load the whole data set named by `spec` into memory."""
    kind, path, split = parse_spec(spec)
    if not os.path.exists(path):
        raise ArqcError(f"data spec '{spec}': {path} does not exist; check the path")
    x, y, ids, num_classes = _LOADERS[kind](spec, Path(path), split)
    if len(y) == 0:
        raise ArqcError(f"data spec '{spec}': the data set is empty; give it at least one image")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ArqcError(f"data spec '{spec}': labels must lie in 0..{num_classes - 1}, "
                        f"found {int(y.min())}..{int(y.max())}; fix the labels")
    return ImageSet(x, y, ids, spec, num_classes)


def as_images(data: str | ImageSet | tuple | torch.utils.data.Dataset, num_classes: int | None = None) -> ImageSet:
    """Images for the Python API: a data spec, an ImageSet, a pair (x, y) of tensors or arrays (x: N, C, H, W
    floats in [0, 1]), or a torch Dataset of (image, label) pairs. In-memory images get the spec
    ``tensors:N:SHA`` (N images, the first 12 hex digits of their sha256), which names them in reports and
    resume signatures."""
    if isinstance(data, ImageSet):
        return data
    if isinstance(data, str):
        return load_images(data)
    if isinstance(data, torch.utils.data.Dataset):
        pairs = [data[i] for i in range(len(data))]
        data = (torch.stack([torch.as_tensor(p[0]) for p in pairs]), torch.as_tensor([int(p[1]) for p in pairs]))
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise ArqcError(f"images must be a data spec, an ImageSet, (x, y) tensors or a torch Dataset, not "
                        f"{type(data).__name__}")
    x = torch.as_tensor(data[0], dtype=torch.float32).contiguous()
    y = torch.as_tensor(data[1], dtype=torch.int64).flatten()
    if x.ndim != 4 or len(x) != len(y) or len(y) == 0:
        raise ArqcError(f"images must be x [N, C, H, W] with N >= 1 labels y; got x of shape {tuple(x.shape)} "
                        f"and {len(y)} labels")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ArqcError("image pixels must lie in [0, 1] (the model normalizes inside); scale them first")
    digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:12]
    classes = num_classes or int(y.max()) + 1
    return ImageSet(x, y, torch.arange(len(y)), f"tensors:{len(y)}:{digest}", classes)


def check_compatible(images: ImageSet, input_shape: tuple[int, ...], num_classes: int | None) -> None:
    """Raise ArqcError unless the images fit the model's input shape (C, H, W or N, C, H, W) and classes."""
    want = tuple(input_shape)[-3:] if len(input_shape) == 4 else tuple(input_shape)
    have = tuple(images.x.shape[1:])
    dynamic = (None, -1, 0)  # unknown (dynamic) dims of the model match anything
    if len(want) != len(have) or any(w not in dynamic and w != h for w, h in zip(want, have, strict=True)):
        raise ArqcError(f"data '{images.spec}' has images of shape {'x'.join(map(str, have))} but the model "
                        f"expects {'x'.join(map(str, want))}; use data that matches the model")
    if num_classes is not None and len(images) and int(images.y.max()) >= num_classes:
        raise ArqcError(f"data '{images.spec}' has labels up to {int(images.y.max())} but the model has "
                        f"only {num_classes} classes; use data labelled for this model")


# --- helpers -------------------------------------------------------------------------------------

def _u8_to_float(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32)).div_(255)


def _why(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _arange(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64)


def _read(spec: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.name.endswith(".gz") else data
    except (OSError, EOFError, zlib.error) as e:
        raise ArqcError(f"data spec '{spec}': cannot read {path} ({_why(e)}); replace the file") from e


# --- cifar10 -------------------------------------------------------------------------------------

def _latin1_encode(obj: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, encoding)


def _empty_bytes(*args: object) -> bytes:
    if args:  # protocol 2 pickles b"" as bytes(); nothing else needs it
        raise pickle.UnpicklingError("refused bytes() with arguments")
    return b""


_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in (("__builtin__", "bytes"), ("builtins", "bytes")):
            return _empty_bytes
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        mod, attr = _SAFE_GLOBALS[(module, name)]
        try:
            return getattr(importlib.import_module(mod), attr)
        except ImportError:  # numpy 1.x has numpy.core only
            return getattr(importlib.import_module(mod.replace("numpy._core", "numpy.core")), attr)


def _load_cifar_batch(spec: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _SafeUnpickler(io.BytesIO(_read(spec, path)), encoding="bytes").load()
    except ArqcError:
        raise
    except Exception as e:  # anything a corrupt or hostile pickle can raise
        raise ArqcError(f"data spec '{spec}': {path} is not a valid CIFAR-10 batch ({_why(e)}); "
                        "replace it with the original file") from e
    data = d.get(b"data", d.get("data")) if isinstance(d, dict) else None
    labels = d.get(b"labels", d.get("labels")) if isinstance(d, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ArqcError(f"data spec '{spec}': {path} has no uint8 N x 3072 'data' array; "
                        "replace it with the original CIFAR-10 file")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ArqcError(f"data spec '{spec}': {path} has unreadable 'labels'; replace it") from e
    if labels is None or len(y) != len(data):
        raise ArqcError(f"data spec '{spec}': {path} has {len(data)} images but "
                        f"{0 if labels is None else len(y)} labels; replace it with the original file")
    return data.reshape(-1, 3, 32, 32), y


def _load_cifar10(spec: str, path: Path, split: str | None) -> _Loaded:
    root = path / "cifar-10-batches-py"
    if not root.is_dir():
        root = path
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not any((root / n).is_file() for n in [*names, "test_batch", "data_batch_1", "batches.meta"]):
        raise ArqcError(f"data spec '{spec}': no cifar-10-batches-py folder found in {path}; "
                        "point DIR at the folder that torchvision's CIFAR10(download=True) creates")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise ArqcError(f"data spec '{spec}': {root} lacks {', '.join(missing)} for the {split} split; "
                        "re-extract cifar-10-python.tar.gz there")
    parts = [_load_cifar_batch(spec, root / n) for n in names]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return _u8_to_float(x), torch.from_numpy(y), _arange(len(y)), 10


# --- mnist ---------------------------------------------------------------------------------------

def _parse_idx(spec: str, path: Path, magic: int) -> np.ndarray:
    data = _read(spec, path)
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or int.from_bytes(data[:4], "big") != magic:
        raise ArqcError(f"data spec '{spec}': {path} is not an idx file (expected magic number {magic}); "
                        "replace it with the original MNIST file")
    dims = [int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4)]
    body = data[4 + 4 * ndim :]
    if len(body) != math.prod(dims):
        raise ArqcError(f"data spec '{spec}': {path} holds {len(body)} bytes of data but its header "
                        f"announces {'x'.join(map(str, dims))}; the file is truncated or corrupt, replace it")
    return np.frombuffer(body, np.uint8).reshape(dims)


def _load_mnist(spec: str, path: Path, split: str | None) -> _Loaded:
    prefix = "train" if split == "train" else "t10k"
    wanted = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    for folder in (path, path / "raw", path / "MNIST" / "raw"):
        found = []
        for name in wanted:
            found += [p for p in (folder / name, folder / f"{name}.gz") if p.is_file()][:1]
        if len(found) == 2:
            break
    else:
        raise ArqcError(f"data spec '{spec}': no {wanted[0]}[.gz] and {wanted[1]}[.gz] in {path} "
                        "(nor in raw/ or MNIST/raw/); point DIR at the folder holding the MNIST idx files")
    images = _parse_idx(spec, found[0], 2051)
    labels = _parse_idx(spec, found[1], 2049)
    if len(images) != len(labels):
        raise ArqcError(f"data spec '{spec}': {found[0].name} has {len(images)} images but {found[1].name} "
                        f"has {len(labels)} labels; replace the mismatched file")
    y = torch.from_numpy(labels.astype(np.int64))
    return _u8_to_float(images[:, None]), y, _arange(len(y)), 10


# --- imagefolder ---------------------------------------------------------------------------------

def _load_imagefolder(spec: str, path: Path, split: str | None) -> _Loaded:
    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise ArqcError(f"data spec '{spec}': {path} is not a folder; imagefolder needs DIR/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise ArqcError(f"data spec '{spec}': {path} has no class sub-folders; "
                        "put each class's images in DIR/<class>/")
    arrays, labels, files = [], [], []
    for label, cls in enumerate(classes):
        for root, _, fnames in sorted(os.walk(path / cls, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(Path(root) / fname)
                    labels.append(label)
    for f in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ArqcError(f"data spec '{spec}': cannot read image {f} ({_why(e)}); fix or remove it") from e
        if arrays[-1].shape != arrays[0].shape:
            raise ArqcError(f"data spec '{spec}': {f} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} but "
                            f"{files[0]} is {arrays[0].shape[1]}x{arrays[0].shape[0]}; resize all images "
                            "to one size first")
    if not arrays:
        raise ArqcError(f"data spec '{spec}': no images ({', '.join(IMAGE_EXTENSIONS)}) in the class "
                        f"folders of {path}; add images")
    x = _u8_to_float(np.stack(arrays).transpose(0, 3, 1, 2))
    return x, torch.tensor(labels, dtype=torch.int64), _arange(len(labels)), len(classes)


# --- npz -----------------------------------------------------------------------------------------

def _npz_x(spec: str, x: np.ndarray) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ArqcError(f"data spec '{spec}': x has shape {x.shape}; "
                        "use N x C x H x W, N x H x W x C or N x H x W")
    if x.dtype == np.uint8:
        nchw = x.shape[1] in (1, 3) and x.shape[3] not in (1, 3)
        return _u8_to_float(x if nchw else x.transpose(0, 3, 1, 2))
    if not np.issubdtype(x.dtype, np.floating):
        raise ArqcError(f"data spec '{spec}': x has dtype {x.dtype}; use uint8 pixels or floats in [0, 1]")
    x = x.astype(np.float32)
    if x.size and not np.isfinite(x).all():
        raise ArqcError(f"data spec '{spec}': x holds NaN or infinite pixels; make them lie in [0, 1]")
    if x.size and not (x.min() >= 0 and x.max() <= 1):
        raise ArqcError(f"data spec '{spec}': float pixels must lie in [0, 1] but range over "
                        f"{x.min():g}..{x.max():g}; scale x to [0, 1] (or store uint8)")
    return torch.from_numpy(x)


def _npz_ints(spec: str, arr: np.ndarray, name: str, n: int) -> torch.Tensor:
    if not np.issubdtype(arr.dtype, np.integer) or arr.shape != (n,):
        raise ArqcError(f"data spec '{spec}': {name} must be {n} integers (one per image) but has shape "
                        f"{arr.shape} and dtype {arr.dtype}; fix the {name} array")
    return torch.from_numpy(arr.astype(np.int64))


def _load_npz(spec: str, path: Path, split: str | None) -> _Loaded:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zip, format or pickle-refusal errors from a bad file
        raise ArqcError(f"data spec '{spec}': cannot read {path} as .npz without pickles ({_why(e)}); "
                        "save it with numpy.savez(FILE, x=..., y=...)") from e
    if "x" not in arrays or "y" not in arrays:
        raise ArqcError(f"data spec '{spec}': {path} lacks array 'x' or 'y' (has {sorted(arrays)}); "
                        "save it with numpy.savez(FILE, x=..., y=...)")
    x = _npz_x(spec, arrays["x"])
    y = _npz_ints(spec, arrays["y"], "y", len(x))
    ids = _npz_ints(spec, arrays["ids"], "ids", len(x)) if "ids" in arrays else _arange(len(x))
    if len(ids) and (int(ids.min()) < 0 or len(torch.unique(ids)) != len(ids)):
        raise ArqcError(f"data spec '{spec}': ids must be distinct and non-negative; fix the ids array")
    if "num_classes" in arrays:
        nc = arrays["num_classes"]
        if nc.size != 1 or not np.issubdtype(nc.dtype, np.integer) or int(nc.reshape(-1)[0]) < 1:
            raise ArqcError(f"data spec '{spec}': num_classes must be one positive integer; fix it")
        num_classes = int(nc.reshape(-1)[0])
    else:
        num_classes = int(y.max()) + 1 if len(y) else 1
    return x, y, ids, num_classes


_LOADERS = {
    "cifar10": _load_cifar10, "mnist": _load_mnist, "imagefolder": _load_imagefolder, "npz": _load_npz,
}
