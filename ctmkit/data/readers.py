"""File readers: each returns raw data-space arrays (validation and normalisation happen in dataset.py).

Formats: .npy / .npz, a folder of image files (subfolders = classes), an MNIST idx folder, a CIFAR-10
python-batches folder (pickles, read with a restricted unpickler), and a Gaussian-mixture JSON file.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctmkit.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DATA_KEYS = ("x", "data", "images", "samples")
LABEL_KEYS = ("labels", "y")


@dataclass
class Raw:
    """What a reader found: data [N, ...], optional labels [N], class count (None: max label + 1), layout."""

    data: np.ndarray
    labels: np.ndarray | None = None
    num_classes: int | None = None
    layout: str | None = None


def first_line(e: BaseException) -> str:
    """One line describing an exception from a third-party reader."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---- numpy --------------------------------------------------------------------------------------
class SharedFile:
    """A read-only descriptor of a path, shared by the views of one file and reopened (by path) in another process
    (DataLoader workers): opened at once, so a file replaced or removed later is still the one read here."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd, self.pid = Path(path), None, None
        self.here()

    def here(self) -> int:
        """The descriptor of this process."""
        if self.fd is None or self.pid != os.getpid():
            try:
                self.fd, self.pid = os.open(self.path, os.O_RDONLY), os.getpid()
            except OSError as e:
                raise UserError(f"cannot open '{self.path}' ({e.strerror or e})") from None
        return self.fd

    def __getstate__(self) -> dict:
        return {"path": self.path, "fd": None, "pid": None}

    def __del__(self) -> None:
        if self.fd is not None and self.pid == os.getpid():
            os.close(self.fd)


PIECE = 1 << 26   # bytes per positioned read (one pread returns at most ~2 GiB)


class NpyRows:
    """The items of a C-ordered .npy file as a read-only array [N, ...] read on access (`a[i]`, `a[index array]`,
    np.asarray(a); `a[start:stop]` is a view, read when used) with positioned reads into the result (os.preadv):
    nothing is read up front, and the process keeps no file pages (a memory map's pages count in its RSS, ~1 MB per
    random item with an 8 MB read-ahead)."""

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype, offset: int, file: SharedFile | None = None) -> None:
        self.path, self.shape, self.dtype, self.offset = Path(path), tuple(shape), np.dtype(dtype), int(offset)
        self.row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.file = file or SharedFile(path)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count, *self.shape[1:]), self.dtype)
        buf, pos, want = memoryview(out.reshape(-1).view(np.uint8)), 0, count * self.row
        while pos < want:
            try:
                got = os.preadv(self.file.here(), [buf[pos:pos + PIECE]], self.offset + start * self.row + pos)
            except OSError as e:
                raise UserError(f"cannot read '{self.path}' ({e.strerror or e})") from None
            if got == 0:
                raise UserError(f"'{self.path}' is shorter than its header says (rows {start}..{start + count - 1}); "
                                "re-create it")
            pos += got
        return out

    def __getitem__(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return NpyRows(self.path, (max(stop - start, 0), *self.shape[1:]), self.dtype,
                               self.offset + start * self.row, self.file)
            key = np.arange(start, stop, step)
        if np.ndim(key) == 0:
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} items")
            return self._read(i % n, 1)[0]
        idx = np.asarray(key, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"an index is out of range for {n} items")
        out = np.empty((idx.size, *self.shape[1:]), self.dtype)
        for j, i in enumerate(idx % n if n else idx):
            out[j] = self._read(int(i), 1)[0]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self._read(0, len(self))
        return a if dtype is None else a.astype(dtype)


def read_npy(path: Path, lazy: bool = False) -> Raw:
    """A .npy array (no pickles); `lazy`: a C-ordered numeric array's rows read on access (NpyRows), others read."""
    if lazy:
        try:
            a = np.load(path, allow_pickle=False, mmap_mode="r")
        except Exception:  # an empty or malformed file: read plainly, which reports it
            return read_npy(path)
        if isinstance(a, np.memmap) and a.ndim >= 1 and a.flags.c_contiguous and a.dtype.kind in "uif":
            return Raw(NpyRows(path, a.shape, a.dtype, a.offset))
        return read_npy(path)
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError/... on malformed files
        raise UserError(f"cannot read '{path}' as a .npy array ({first_line(e)}); save it with numpy.save") from e
    if not isinstance(a, np.ndarray):
        raise UserError(f"'{path}' is not a .npy array; save it with numpy.save")
    return Raw(a)


def read_npz(path: Path) -> Raw:
    """A .npz archive: data under x/data/images/samples (or the only non-label array), labels: labels/y."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise UserError(f"'{path}' is not a .npz archive; save it with numpy.savez")
            keys = list(z.files)
            data_key = next((k for k in DATA_KEYS if k in keys), None)
            if data_key is None:
                rest = [k for k in keys if k not in LABEL_KEYS]
                if len(rest) != 1:
                    raise UserError(f"'{path}' has arrays {keys}; put the data under one of "
                                    f"{', '.join(DATA_KEYS)}")
                data_key = rest[0]
            label_key = next((k for k in LABEL_KEYS if k in keys), None)
            data = z[data_key]
            labels = None if label_key is None else z[label_key]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read '{path}' as a .npz archive ({first_line(e)}); "
                        "save it with numpy.savez") from e
    return Raw(data, labels)


# ---- MNIST idx ----------------------------------------------------------------------------------
MNIST_IMAGES = ("train-images-idx3-ubyte", "train-images.idx3-ubyte")
MNIST_LABELS = ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte")
MAX_IDX_BYTES = 1 << 34  # 16 GiB: a larger header in a .gz file is taken as corruption, not allocated


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for cand in (folder / name, folder / (name + ".gz")):
            if cand.is_file():
                return cand
    return None


def is_mnist_folder(folder: Path) -> bool:
    return _find(folder, MNIST_IMAGES) is not None


def _read_idx(path: Path, magic: int, ndim: int, limit: int | None) -> np.ndarray:
    """An idx file (big-endian int32 header, uint8 payload) -> uint8 array; only `limit` items if given."""
    header_len = 4 * (1 + ndim)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            header = f.read(header_len)
            if len(header) < header_len:
                raise UserError(f"idx file '{path}' is truncated (header is {len(header)} bytes)")
            fields = np.frombuffer(header, dtype=">i4")
            if int(fields[0]) != magic:
                raise UserError(f"'{path}' is not an idx file of this kind (magic {int(fields[0])}, expected "
                                f"{magic}); use the original MNIST files")
            dims = [int(v) for v in fields[1:]]
            if min(dims) < 0:
                raise UserError(f"idx file '{path}' has negative sizes {dims}")
            item = int(np.prod(dims[1:], dtype=object)) if ndim > 1 else 1
            count = dims[0] if limit is None else min(limit, dims[0])
            size = None if path.suffix == ".gz" else path.stat().st_size - header_len
            if count * item > (size if size is not None else MAX_IDX_BYTES):
                raise UserError(f"idx file '{path}' has the wrong size for its header {dims} "
                                f"({count * item} bytes of data expected); re-download it")
            payload = f.read(count * item)
            extra = f.read(1) if limit is None else b""
    except UserError:
        raise
    except Exception as e:  # gzip.BadGzipFile, EOFError, OSError
        raise UserError(f"cannot read idx file '{path}' ({first_line(e)})") from e
    if len(payload) < count * item or extra:
        raise UserError(f"idx file '{path}' has the wrong size for its header {dims}; re-download it")
    return np.frombuffer(payload, dtype=np.uint8).reshape([count] + dims[1:])


def read_mnist(folder: Path, n: int | None = None) -> Raw:
    """MNIST training set from idx files (optionally .gz): uint8 [N, 28, 28] images and 10-class labels."""
    images = _read_idx(_find(folder, MNIST_IMAGES), 2051, 3, n)
    labels_path = _find(folder, MNIST_LABELS)
    if labels_path is None:
        return Raw(images, layout="NHW")
    labels = _read_idx(labels_path, 2049, 1, n)
    if labels.shape[0] != images.shape[0]:
        raise UserError(f"'{labels_path}' has {labels.shape[0]} labels but the images file has "
                        f"{images.shape[0]} images")
    return Raw(images, labels.astype(np.int64), num_classes=10, layout="NHW")


# ---- CIFAR-10 python batches --------------------------------------------------------------------
def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals numpy-array pickles need (old and new module names)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    table: dict[tuple[str, str], object] = {}
    for mod in ("numpy.core", "numpy._core"):
        table[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            table[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    return table


_SAFE_BUILTINS = {"dict": dict, "list": list, "tuple": tuple, "bytes": bytes, "bytearray": bytearray,
                  "str": str, "int": int, "float": float, "bool": bool, "set": set, "frozenset": frozenset}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only plain containers and numpy array reconstruction; other globals are refused."""

    def find_class(self, module: str, name: str) -> object:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if (module, name) == ("_codecs", "encode"):  # bytes pickled with protocol <= 2
            import codecs

            return codecs.encode
        obj = _numpy_globals().get((module, name))
        if obj is None:
            raise UserError(f"refusing to unpickle '{module}.{name}': only plain data and numpy arrays are "
                            "allowed in CIFAR batch files")
        return obj


def restricted_load(path: Path) -> object:
    """Load a pickle file with RestrictedUnpickler (Python 2 strings are read as bytes)."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read '{path}' as a CIFAR-10 python batch ({first_line(e)})") from e


def cifar_dir(folder: Path) -> Path | None:
    """The CIFAR-10 batches folder: `folder` itself or its `cifar-10-batches-py` child; None if neither."""
    for cand in (folder, folder / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file():
            return cand
    return None


def _get(d: dict, key: str) -> object:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    return None


def read_cifar(folder: Path, n: int | None = None) -> Raw:
    """CIFAR-10 training batches data_batch_1..5 (those present): uint8 [N, 32, 32, 3] NHWC and labels."""
    paths = [folder / f"data_batch_{i}" for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()]
    datas, labels, total = [], [], 0
    for p in paths:
        d = restricted_load(p)
        if not isinstance(d, dict):
            raise UserError(f"'{p}' is not a CIFAR-10 batch (expected a dict, got {type(d).__name__})")
        data, lab = _get(d, "data"), _get(d, "labels")
        ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
        if not ok or data.shape[1] != 3072:
            shape = getattr(data, "shape", None)
            raise UserError(f"'{p}' has no uint8 [N, 3072] 'data' array (got {type(data).__name__} {shape})")
        try:
            lab = np.asarray(lab)
        except (TypeError, ValueError, OverflowError) as e:
            raise UserError(f"'{p}' has no integer 'labels' list") from e
        if lab.dtype.kind not in "iuf":  # non-integer values are refused by check_labels (dataset.py)
            raise UserError(f"'{p}' has no integer 'labels' list (got {lab.dtype} values)")
        if lab.ndim != 1 or lab.shape[0] != data.shape[0]:
            raise UserError(f"'{p}' has {lab.size} labels for {data.shape[0]} images")
        datas.append(data)
        labels.append(lab)
        total += data.shape[0]
        if n is not None and total >= n:
            break
    x = np.concatenate(datas).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Raw(np.ascontiguousarray(x), np.concatenate(labels), num_classes=10, layout="NHWC")


# ---- Gaussian mixture JSON ----------------------------------------------------------------------
def read_gmm_json(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(means [K, D], stds [K], weights [K] summing to 1, classes [K] int64 or None) from a JSON file, validated.
    The optional `classes` key labels the mixture: component k belongs to class classes[k] (0..C-1, all used)."""
    if not path.is_file():
        raise UserError(f"mixture file '{path}' does not exist")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"mixture file '{path}' is not valid JSON ({first_line(e)})") from e
    if not isinstance(spec, dict):
        raise UserError(f"mixture file '{path}' must hold an object with keys means, stds, weights")
    arrays = {}
    for key, ndim in (("means", 2), ("stds", 1), ("weights", 1)):
        if key not in spec:
            raise UserError(f"mixture file '{path}' is missing key '{key}' "
                            "(needs means [K][D], stds [K], weights [K])")
        form = "[K][D]" if ndim == 2 else "[K]"
        try:
            a = np.asarray(spec[key], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise UserError(f"mixture file '{path}': '{key}' must be a {form} list of numbers "
                            "(same length rows)") from e
        if a.ndim != ndim or a.size == 0:
            raise UserError(f"mixture file '{path}': '{key}' must be a non-empty {form} list, "
                            f"got shape {tuple(a.shape)}")
        if not np.all(np.isfinite(a)):
            raise UserError(f"mixture file '{path}': '{key}' contains NaN or Inf values")
        arrays[key] = a
    means, stds, weights = arrays["means"], arrays["stds"], arrays["weights"]
    k = means.shape[0]
    if stds.shape[0] != k or weights.shape[0] != k:
        raise UserError(f"mixture file '{path}': {k} means but {stds.shape[0]} stds and "
                        f"{weights.shape[0]} weights; need one of each per component")
    if np.any(stds <= 0):
        raise UserError(f"mixture file '{path}': stds must be positive, got {stds.min():g}")
    if np.any(weights < 0) or weights.sum() <= 0:
        raise UserError(f"mixture file '{path}': weights must be non-negative with a positive sum")
    return means, stds, weights / weights.sum(), _gmm_classes(spec.get("classes"), k, path)


def _gmm_classes(raw, k: int, path: Path) -> np.ndarray | None:
    """The optional classes [K] of a mixture file: integers 0..C-1, every one used."""
    if raw is None:
        return None
    msg = (f"mixture file '{path}': 'classes' must list one integer class (0..C-1, each used) per component, "
           f"{k} in all")
    try:
        a = np.asarray(raw)
    except (TypeError, ValueError) as e:
        raise UserError(msg) from e
    if a.shape != (k,) or a.dtype.kind not in "iu" or a.min() < 0 or set(a.tolist()) != set(range(int(a.max()) + 1)):
        raise UserError(msg)
    return a.astype(np.int64)
