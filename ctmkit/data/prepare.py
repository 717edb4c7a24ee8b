"""`ctmkit prepare SRC OUT.npy`: any supported data source -> a uint8 .npy (+ OUT.labels.npy), in bounded memory.

Image files (plain folders with class subfolders, EDM zips / dataset folders) are decoded one at a time into a
memory-mapped temp file, optionally centre-cropped and resized (`--resolution`, as EDM's dataset_tool
`--transform=center-crop`), then renamed into place; array sources (CIFAR-10 batches, MNIST idx, .npz, .npy) are
copied in chunks. See ctmkit/data/images.py for EDM's dataset format.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..progress import progress_bar
from . import readers
from .images import IMAGE_EXTS, ImageSource, is_edm_dataset, iter_arrays, labels_path, scan_headers
from .load import read_raw
from .normalize import chunk_rows


def prepare(src_path: Path, out: Path, resolution: int | None = None, progress: bool | None = True) -> dict:
    """Convert a data source to OUT.npy (+ OUT.labels.npy); returns {n, shape, labelled}."""
    out = Path(out)
    if out.suffix != ".npy":
        raise UserError(f"OUT must end in .npy, got '{out.name}'")
    src_path = Path(src_path)
    if src_path.is_dir() and not _array_folder(src_path) and _plain_image_folder(src_path):
        return _prepare_images(ImageSource(src_path, plain=True), out, resolution, progress)
    if is_edm_dataset(src_path):
        return _prepare_images(ImageSource(src_path), out, resolution, progress)
    if resolution:
        raise UserError("--resolution applies to image files (folders and zips); this source is an array")
    raw = read_raw(src_path)
    a = raw.data   # in memory, or a .npy read row by row (readers.NpyRows): copied a chunk at a time either way
    if a.dtype != np.uint8 or len(a.shape) not in (3, 4):
        raise UserError(f"'{src_path}' is not a set of uint8 images (dtype {a.dtype}, shape {tuple(a.shape)})")
    k = chunk_rows(a.shape)
    _write_npy(out, tuple(a.shape), (np.asarray(a[i:i + k]) for i in range(0, len(a), k)))
    _write_labels(out, raw.labels)
    return {"n": len(a), "shape": list(a.shape[1:]), "labelled": raw.labels is not None}


def _array_folder(folder: Path) -> bool:
    """Folders read as arrays or by their own format: EDM datasets, MNIST idx, CIFAR-10 batches (or their parent)."""
    return is_edm_dataset(folder) or readers.is_mnist_folder(folder) or readers.cifar_dir(folder) is not None


def _plain_image_folder(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir()) or any(
        p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def _prepare_images(src: ImageSource, out: Path, resolution: int | None, progress) -> dict:
    gray = scan_headers(src, progress, same_size=not resolution)[1]
    first = next(iter_arrays(src, resolution, gray))
    shape = (len(src), *first.shape)
    it = progress_bar(iter_arrays(src, resolution, gray), desc="prepare", total=len(src), enabled=progress)
    _write_npy(out, shape, (a[None] for a in it))
    _write_labels(out, src.labels)
    return {"n": len(src), "shape": list(first.shape), "labelled": src.labels is not None}


@contextlib.contextmanager
def _replacing(path: Path):
    """A temp path beside `path` (a dot file ending in .npy), renamed to `path` when the block ends without an
    error, removed otherwise."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_npy(out: Path, shape: tuple, chunks) -> None:
    """Fill a memory-mapped temp .npy chunk by chunk, then rename it to `out` (bounded memory, atomic)."""
    with _replacing(out) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        i = 0
        for c in chunks:
            mm[i:i + len(c)] = c
            i += len(c)
        mm.flush()
        del mm


def _write_labels(out: Path, labels: np.ndarray | None) -> None:
    path = labels_path(out)
    if labels is None:
        path.unlink(missing_ok=True)
        return
    with _replacing(path) as tmp:
        np.save(tmp, np.asarray(labels, np.int64))
