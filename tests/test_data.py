"""Tests for arqc.data: every spec kind on tiny synthetic data, bad inputs, hostile pickles, real data."""

import codecs
import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arqc.base import ArqcError
from arqc.data import ImageSet, check_compatible, load_images, parse_spec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def expect_error(spec_or_call, match: str | None = None) -> str:
    """Assert that loading the spec (or calling the callable) raises a one-line ArqcError."""
    with pytest.raises(ArqcError) as info:
        spec_or_call() if callable(spec_or_call) else load_images(spec_or_call)
    msg = str(info.value)
    assert msg and "\n" not in msg
    if match:
        assert match in msg, msg
    return msg


# --- builders ------------------------------------------------------------------------------------

def rng_u8(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as python 2 byte strings (BINSTRING), as cPickle did for the real batches."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head)
        self.write(obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], protocol: int = 2, py2=False):
    """A batch pickled like the real files: bytes keys, uint8 N x 3072 data, list labels."""
    d = {b"batch_label": b"batch", b"labels": labels, b"data": data, b"filenames": [b"f.png"] * len(labels)}
    if py2:  # python 2 + numpy 1.x: byte strings throughout, and numpy.core rather than numpy._core
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(d)
        raw = buf.getvalue().replace(b"numpy._core.", b"numpy.core.")
    else:
        raw = pickle.dumps(d, protocol=protocol)
    path.write_bytes(raw)


def make_cifar(root: Path, n_per_batch: int = 4, **kw) -> tuple[np.ndarray, ...]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng_u8((n_per_batch, 3072), seed=i)
        y = [(i + j) % 10 for j in range(n_per_batch)]
        write_cifar_batch(folder / f"data_batch_{i}", x, y, **kw)
        train_x.append(x)
        train_y += y
    test_x = rng_u8((n_per_batch, 3072), seed=99)
    test_y = [9 - j % 10 for j in range(n_per_batch)]
    write_cifar_batch(folder / "test_batch", test_x, test_y, **kw)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=2))
    return np.concatenate(train_x), np.array(train_y), test_x, np.array(test_y)


def write_idx(path: Path, arr: np.ndarray, magic: int, gz: bool) -> None:
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def make_mnist(folder: Path, gz: bool, n_train: int = 6, n_test: int = 5):
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x = rng_u8((n, 28, 28), seed)
        y = (np.arange(n, dtype=np.uint8) * 3 + seed) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x, 2051, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, 2049, gz)
        out[prefix] = (x, y)
    return out


def to_float(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8.astype(np.float32) / 255)


# --- parse_spec ----------------------------------------------------------------------------------

def test_parse_spec():
    assert parse_spec("cifar10:/d") == ("cifar10", "/d", "test")
    assert parse_spec("cifar10:/d:train") == ("cifar10", "/d", "train")
    assert parse_spec("MNIST:/a:b:test") == ("mnist", "/a:b", "test")
    assert parse_spec("npz:/f.npz") == ("npz", "/f.npz", None)
    assert parse_spec("imagefolder:/x:y") == ("imagefolder", "/x:y", None)
    expect_error(lambda: parse_spec("svhn:/d"), "unknown kind")
    expect_error(lambda: parse_spec("/just/a/path"), "unknown kind")
    expect_error(lambda: parse_spec("cifar10:"), "no path")
    expect_error(lambda: parse_spec("npz:/f.npz:test"), "takes no split")


# --- cifar10 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol,py2", [(2, True), (2, False), (4, False), (5, False)])
def test_cifar10_roundtrip(tmp_path, protocol, py2):
    train_x, train_y, test_x, test_y = make_cifar(tmp_path, protocol=protocol, py2=py2)
    for spec in (f"cifar10:{tmp_path}", f"cifar10:{tmp_path}/cifar-10-batches-py:test"):
        s = load_images(spec)
        assert s.x.shape == (4, 3, 32, 32) and s.x.dtype == torch.float32
        assert torch.equal(s.x, to_float(test_x.reshape(4, 3, 32, 32)))
        assert s.y.tolist() == test_y.tolist() and s.y.dtype == torch.int64
        assert s.ids.tolist() == [0, 1, 2, 3] and s.num_classes == 10 and s.spec == spec
    s = load_images(f"cifar10:{tmp_path}:train")
    assert len(s) == 20 and s.ids.tolist() == list(range(20))
    assert torch.equal(s.x, to_float(train_x.reshape(20, 3, 32, 32)))
    assert s.y.tolist() == train_y.tolist()
    # CHW row-major: first 1024 bytes are the red plane
    assert torch.equal(s.x[0, 0].flatten(), to_float(train_x[0, :1024]))


def test_cifar10_errors(tmp_path):
    expect_error(f"cifar10:{tmp_path}/nope", "does not exist")
    expect_error(f"cifar10:{tmp_path}", "no cifar-10-batches-py folder found")
    make_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    expect_error(f"cifar10:{tmp_path}:train", "data_batch_3")
    (folder / "test_batch").write_bytes((folder / "data_batch_1").read_bytes()[:100])
    expect_error(f"cifar10:{tmp_path}", "not a valid CIFAR-10 batch")
    write_cifar_batch(folder / "test_batch", rng_u8((4, 3072)), [1, 2, 3])
    expect_error(f"cifar10:{tmp_path}", "4 images but 3 labels")
    write_cifar_batch(folder / "test_batch", rng_u8((4, 100)), [1, 2, 3, 4])
    expect_error(f"cifar10:{tmp_path}", "N x 3072")
    write_cifar_batch(folder / "test_batch", rng_u8((2, 3072)), [1, 10])
    expect_error(f"cifar10:{tmp_path}", "labels must lie in 0..9")
    write_cifar_batch(folder / "test_batch", rng_u8((0, 3072)), [])
    expect_error(f"cifar10:{tmp_path}", "empty")


class _Reduce:
    def __init__(self, func, args):
        self.call = (func, args)

    def __reduce__(self):
        return self.call


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    payload = {b"data": _Evil(marker), b"labels": [0]}
    (folder / "test_batch").write_bytes(pickle.dumps(payload, protocol=protocol))
    msg = expect_error(f"cifar10:{tmp_path}", "refused to load")
    assert "system" in msg
    assert not marker.exists()


def test_pickle_refuses_other_globals(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for obj in (eval, np.load, Path):
        (folder / "test_batch").write_bytes(pickle.dumps({b"data": obj, b"labels": []}, protocol=2))
        expect_error(f"cifar10:{tmp_path}", "refused to load")
    # _codecs.encode is only allowed for latin1 (what protocol 2 uses for bytes); bytes() only empty
    for call in ((codecs.encode, ("abc", "rot13")), (bytes, (10**12,))):
        bad = pickle.dumps({b"data": _Reduce(*call), b"labels": []}, protocol=2)
        (folder / "test_batch").write_bytes(bad)
        expect_error(f"cifar10:{tmp_path}", "refused")


# --- mnist ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["", "raw", "MNIST/raw"])
def test_mnist_roundtrip(tmp_path, gz, layout):
    ref = make_mnist(tmp_path / layout, gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        s = load_images(f"mnist:{tmp_path}:{split}")
        x, y = ref[prefix]
        assert s.x.shape == (len(x), 1, 28, 28)
        assert torch.equal(s.x[:, 0], to_float(x))
        assert s.y.tolist() == y.tolist() and s.ids.tolist() == list(range(len(x)))
        assert s.num_classes == 10
    assert len(load_images(f"mnist:{tmp_path}")) == 5  # default split: test


def test_mnist_errors(tmp_path):
    expect_error(f"mnist:{tmp_path}", "t10k-images-idx3-ubyte")
    make_mnist(tmp_path, gz=False)
    images = tmp_path / "t10k-images-idx3-ubyte"
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:-10])
    expect_error(f"mnist:{tmp_path}", "truncated")
    images.write_bytes(b"\x00\x00\x08\x01" + good[4:])
    expect_error(f"mnist:{tmp_path}", "magic number 2051")
    images.write_bytes(b"")
    expect_error(f"mnist:{tmp_path}", "not an idx file")
    images.write_bytes(good)
    write_idx(labels, np.zeros(4, np.uint8), 2049, gz=False)
    expect_error(f"mnist:{tmp_path}", "5 images but")
    write_idx(labels, np.full(5, 12, np.uint8), 2049, gz=False)
    expect_error(f"mnist:{tmp_path}", "labels must lie in 0..9")
    labels.unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    expect_error(f"mnist:{tmp_path}", "cannot read")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"x" * 100)[:-8])
    expect_error(f"mnist:{tmp_path}", "cannot read")


# --- imagefolder ---------------------------------------------------------------------------------

def test_imagefolder_roundtrip(tmp_path):
    expected = []
    for label, cls in enumerate(["ant", "bee", "cat"]):
        (tmp_path / cls).mkdir()
        for k in range(2):
            arr = rng_u8((5, 7, 3), seed=10 * label + k)
            Image.fromarray(arr).save(tmp_path / cls / f"{k}.png")
            expected.append((arr, label))
    gray = rng_u8((5, 7), seed=77)
    Image.fromarray(gray).save(tmp_path / "cat" / "2.png")
    expected.append((np.repeat(gray[:, :, None], 3, axis=2), 2))
    (tmp_path / "bee" / "notes.txt").write_text("ignored")
    (tmp_path / "dog").mkdir()  # empty class still counts for the label order
    s = load_images(f"imagefolder:{tmp_path}")
    assert s.x.shape == (7, 3, 5, 7) and s.num_classes == 4
    assert s.y.tolist() == [lab for _, lab in expected] and s.ids.tolist() == list(range(7))
    for i, (arr, _) in enumerate(expected):
        assert torch.equal(s.x[i], to_float(arr.transpose(2, 0, 1)))


def test_imagefolder_errors(tmp_path):
    expect_error(f"imagefolder:{tmp_path}", "no class sub-folders")
    (tmp_path / "a").mkdir()
    expect_error(f"imagefolder:{tmp_path}", "no images")
    Image.fromarray(rng_u8((4, 4, 3))).save(tmp_path / "a" / "0.png")
    Image.fromarray(rng_u8((6, 4, 3))).save(tmp_path / "a" / "1.png")
    expect_error(f"imagefolder:{tmp_path}", "resize")
    (tmp_path / "a" / "1.png").write_bytes(b"garbage")
    expect_error(f"imagefolder:{tmp_path}", "cannot read image")
    expect_error(f"imagefolder:{tmp_path}/a/0.png", "not a folder")
    expect_error(f"imagefolder:{tmp_path}:test", "takes no split")


# --- npz -----------------------------------------------------------------------------------------

def test_npz_layouts(tmp_path):
    u8 = rng_u8((4, 3, 6, 5))
    want = to_float(u8)
    y = np.array([0, 2, 1, 2])
    layouts = {
        "nchw_float": u8.astype(np.float64) / 255,
        "nhwc_u8": u8.transpose(0, 2, 3, 1),
        "nchw_u8": u8,
    }
    for name, x in layouts.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
        s = load_images(f"npz:{tmp_path}/{name}.npz")
        assert s.x.dtype == torch.float32 and s.x.shape == (4, 3, 6, 5), name
        assert torch.allclose(s.x, want, atol=1e-7, rtol=0), name
        assert s.y.tolist() == y.tolist() and s.ids.tolist() == [0, 1, 2, 3] and s.num_classes == 3
    gray = rng_u8((4, 6, 5))
    np.savez(tmp_path / "gray.npz", x=gray, y=y.astype(np.uint8), ids=np.array([7, 3, 9, 1]), num_classes=10)
    s = load_images(f"npz:{tmp_path}/gray.npz")
    assert torch.equal(s.x, to_float(gray[:, None]))
    assert s.ids.tolist() == [7, 3, 9, 1] and s.num_classes == 10 and s.y.dtype == torch.int64
    np.savez(tmp_path / "gray1.npz", x=gray[:, :, :, None], y=y)  # NHWC with one channel
    assert torch.equal(load_images(f"npz:{tmp_path}/gray1.npz").x, to_float(gray[:, None]))


def test_npz_errors(tmp_path):
    def bad(name: str, match: str, **arrays):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        expect_error(f"npz:{tmp_path}/{name}.npz", match)

    x = rng_u8((3, 3, 4, 4))
    bad("nox", "lacks array 'x' or 'y'", y=np.zeros(3, int))
    bad("range", "[0, 1]", x=x.astype(np.float32), y=np.zeros(3, int))
    bad("nan", "NaN", x=np.full((3, 1, 2, 2), np.nan, np.float32), y=np.zeros(3, int))
    bad("dtype", "dtype int64", x=x.astype(np.int64), y=np.zeros(3, int))
    bad("ndim", "shape", x=np.zeros((3, 4), np.uint8), y=np.zeros(3, int))
    bad("count", "must be 3 integers", x=x, y=np.zeros(2, int))
    bad("yfloat", "must be 3 integers", x=x, y=np.zeros(3))
    bad("neg", "labels must lie", x=x, y=np.array([0, -1, 2]))
    bad("nc", "labels must lie", x=x, y=np.array([0, 5, 2]), num_classes=3)
    bad("ncbad", "num_classes", x=x, y=np.zeros(3, int), num_classes=np.array([1, 2]))
    bad("ids", "distinct", x=x, y=np.zeros(3, int), ids=np.array([1, 1, 2]))
    bad("empty", "empty", x=np.zeros((0, 3, 4, 4), np.uint8), y=np.zeros(0, int))
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 3), y=np.zeros(3, int))
    expect_error(f"npz:{tmp_path}/obj.npz", "without pickles")
    (tmp_path / "junk.npz").write_bytes(b"PK not really")
    expect_error(f"npz:{tmp_path}/junk.npz", "cannot read")
    expect_error(f"npz:{tmp_path}/missing.npz", "does not exist")


# --- ImageSet helpers ----------------------------------------------------------------------------

def small_set(n: int = 10) -> ImageSet:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2) / n
    return ImageSet(x.contiguous(), torch.arange(n) % 3, torch.arange(100, 100 + n), "npz:t", 3)


def test_subset_and_batches():
    s = small_set()
    assert len(s) == 10
    sub = s.subset(num=3, skip=2, start=1)
    assert sub.ids.tolist() == [101, 103, 105] and sub.y.tolist() == [1, 0, 2]
    assert torch.equal(sub.x, s.x[[1, 3, 5]]) and sub.spec == s.spec and sub.num_classes == 3
    assert s.subset().ids.tolist() == s.ids.tolist()
    assert s.subset(skip=4).ids.tolist() == [100, 104, 108]
    assert s.subset(num=100, start=8).ids.tolist() == [108, 109]
    assert sub.subset(skip=2).ids.tolist() == [101, 105]  # ids survive nested subsets
    sizes = [len(bx) for bx, _ in s.batches(4)]
    assert sizes == [4, 4, 2]
    xs, ys = zip(*s.batches(3), strict=True)
    assert torch.equal(torch.cat(xs), s.x) and torch.equal(torch.cat(ys), s.y)
    expect_error(lambda: s.subset(skip=0), "skip")
    expect_error(lambda: s.subset(num=0), "num")
    expect_error(lambda: s.subset(start=10), "past the end")
    expect_error(lambda: list(s.batches(0)), "batch size")


def test_check_compatible():
    s = small_set()
    check_compatible(s, (1, 2, 2), 3)
    check_compatible(s, (1, 1, 2, 2), None)
    check_compatible(s, (-1, 1, 2, 2), 5)
    msg = expect_error(lambda: check_compatible(s, (3, 32, 32), 3), "1x2x2")
    assert "3x32x32" in msg
    expect_error(lambda: check_compatible(s, (1, 2, 2), 2), "only 2 classes")


# --- real data -----------------------------------------------------------------------------------

def test_real_mnist_test_split():
    if not (SHARED / "mnist").is_dir():
        pytest.skip(f"real MNIST not found at {SHARED / 'mnist'}")
    s = load_images(f"mnist:{SHARED / 'mnist'}")
    assert len(s) == 10_000 and s.x.shape[1:] == (1, 28, 28)
    assert s.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert 0 <= float(s.x.min()) and float(s.x.max()) <= 1


def test_real_cifar10_npz():
    path = SHARED / "cifar10" / "test_first1000_lossless.npz"
    if not path.is_file():
        pytest.skip(f"real CIFAR-10 npz not found at {path}")
    s = load_images(f"npz:{path}")
    assert len(s) == 1000 and s.x.shape[1:] == (3, 32, 32) and s.num_classes == 10
    assert s.y[:5].tolist() == [3, 8, 8, 0, 6]
