"""The IRS cache: what CERTIFY learned about the full-precision f, per point, kept on disk.

File format (one ``.npz``, version ``CACHE_VERSION``, written to a temp file and renamed):

- ``header``: JSON string {"format": "arqc-irs-cache", "version", "fingerprint" (f's backend
  fingerprint), "sigma", "n", "n0", "alpha", "seed" (run seed), "noise" (noise scheme), "image_ids"}
- per point, in ``image_ids`` order: ``image_ids`` int64, ``labels`` int64, ``top_class`` int64 (ĉA),
  ``pA_lower`` float64, ``radius`` float64, ``seeds`` uint64 (point seed of the noise streams),
  ``image_sha256`` str (digest of the float32 image), ``predictions`` [N, n] uint8 (int16/int32 when
  there are more classes): f's class on each estimation sample.

Loaded without pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from arqc.base import ArqcError, atomic_write
from arqc.passes.meta import SEMANTICS, check_semantics
from arqc.runtime.noise import NOISE_SCHEME

CACHE_FORMAT = "arqc-irs-cache"
CACHE_VERSION = 1


@dataclass(frozen=True)
class CachePoint:
    """f's certificate of one image, with the seed of its noise and f's class on each estimation sample."""

    image_id: int
    label: int
    top_class: int
    pA_lower: float
    radius: float
    seed: int
    image_sha256: str
    predictions: np.ndarray = field(repr=False)


@dataclass
class IrsCache:
    """Cached certificates of one model f at one (σ, n, n0, α, seed)."""

    fingerprint: str
    sigma: float
    n: int
    n0: int
    alpha: float
    seed: int
    points: list[CachePoint]
    _by_id: dict[int, CachePoint] = field(default_factory=dict, init=False, repr=False, compare=False)

    def point(self, image_id: int) -> CachePoint:
        """The cached point of an image id."""
        if len(self._by_id) != len(self.points):
            self._by_id = {p.image_id: p for p in self.points}
        if image_id not in self._by_id:
            raise ArqcError(f"image {image_id} is not in the IRS cache; rebuild the cache with this image")
        return self._by_id[image_id]

    def header(self) -> dict:
        """The JSON header written to disk."""
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "semantics": SEMANTICS,
                "fingerprint": self.fingerprint,
                "sigma": self.sigma, "n": self.n, "n0": self.n0, "alpha": self.alpha, "seed": self.seed,
                "noise": NOISE_SCHEME, "image_ids": [p.image_id for p in self.points]}

    def save(self, path: str | Path) -> None:
        """Write the cache to ``path`` atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        predictions = np.stack([p.predictions for p in self.points]) if self.points else np.zeros((0, self.n))
        arrays = {
            "header": np.array(json.dumps(self.header())),
            "image_ids": np.array([p.image_id for p in self.points], np.int64),
            "labels": np.array([p.label for p in self.points], np.int64),
            "top_class": np.array([p.top_class for p in self.points], np.int64),
            "pA_lower": np.array([p.pA_lower for p in self.points], np.float64),
            "radius": np.array([p.radius for p in self.points], np.float64),
            "seeds": np.array([p.seed for p in self.points], np.uint64),
            "image_sha256": np.array([p.image_sha256 for p in self.points], dtype="U64"),
            "predictions": predictions.astype(_smallest_dtype(predictions)),
        }
        atomic_write(path, lambda f: np.savez(f, **arrays))


def load_cache(path: str | Path, *, fingerprint: str, sigma: float, n: int, ids: list[int]) -> IrsCache:
    """Read a cache, refusing one made for another model, σ, n or noise scheme, or lacking one of ``ids``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        header = json.loads(str(arrays["header"]))
    except (OSError, ValueError, KeyError) as e:
        raise ArqcError(f"cannot read IRS cache {str(path)!r} ({e}); rebuild it") from e
    if header.get("format") != CACHE_FORMAT or header.get("version") != CACHE_VERSION:
        raise ArqcError(f"{str(path)!r} is not a version-{CACHE_VERSION} IRS cache; rebuild it")
    check_semantics(header.get("semantics"), f"IRS cache {str(path)!r}")
    expected = {"fingerprint": fingerprint, "sigma": sigma, "n": n, "noise": NOISE_SCHEME}
    for key, value in expected.items():
        if header[key] != value:
            raise ArqcError(f"IRS cache {str(path)!r} was built with {key}={header[key]}, not {value}; "
                            "rebuild the cache for this model and these settings")
    missing = sorted(set(int(i) for i in ids) - set(header["image_ids"]))
    if missing:
        raise ArqcError(f"IRS cache {str(path)!r} lacks {len(missing)} of the requested images "
                        f"(e.g. id {missing[0]}); rebuild the cache on these images")
    if list(arrays["image_ids"]) != header["image_ids"] or arrays["predictions"].shape[1:] != (n,):
        raise ArqcError(f"IRS cache {str(path)!r} is inconsistent with its header; rebuild it")
    points = [
        CachePoint(image_id=int(arrays["image_ids"][i]), label=int(arrays["labels"][i]),
                   top_class=int(arrays["top_class"][i]), pA_lower=float(arrays["pA_lower"][i]),
                   radius=float(arrays["radius"][i]), seed=int(arrays["seeds"][i]),
                   image_sha256=str(arrays["image_sha256"][i]), predictions=arrays["predictions"][i])
        for i in range(len(arrays["image_ids"]))
    ]
    return IrsCache(fingerprint=header["fingerprint"], sigma=header["sigma"], n=header["n"], n0=header["n0"],
                    alpha=header["alpha"], seed=header["seed"], points=points)


def image_digest(x: np.ndarray) -> str:
    """sha256 of a float32 image's shape and bytes (is IRS given the image the cache was built on?)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return hashlib.sha256(str(x.shape).encode() + x.tobytes()).hexdigest()


def _smallest_dtype(predictions: np.ndarray) -> type:
    """uint8 for up to 256 classes, else int16, else int32."""
    top = int(predictions.max(initial=0))
    return np.uint8 if top < 256 else np.int16 if top < 2**15 else np.int32
