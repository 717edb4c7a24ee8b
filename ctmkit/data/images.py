"""Image sources read one item at a time, EDM's dataset format, and `prepare` (any source -> a uint8 .npy).

EDM's dataset format (written by its dataset_tool.py): a zip file or a folder of images (PNG) with a
`dataset.json` at its root holding `{"labels": [[relative_path, class], ...]}` or `{"labels": null}`; paths use '/'.
`prepare` converts any supported source (image folders, EDM zips/folders, CIFAR-10 batches, MNIST idx, .npz/.npy)
into `OUT.npy` (uint8, [N, H, W] or [N, H, W, C]) and, when labelled, `OUT.labels.npy` (int64 [N]) beside it,
written through a memory-mapped temp file (bounded memory) and renamed into place; `--resolution R` centre-crops
to a square and resizes to R x R (Lanczos), as EDM's dataset_tool does with `--transform=center-crop`.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError
from .readers import IMAGE_EXTS, Raw, first_line


def is_edm_dataset(path: Path) -> bool:
    """A zip file, or a folder with a dataset.json: EDM's dataset format."""
    return (path.is_file() and path.suffix.lower() == ".zip") or (path.is_dir() and (path / "dataset.json").is_file())


class ImageSource:
    """The images of an EDM zip / folder (or a plain image folder with class subfolders): `names` (sorted relative
    paths), `labels` (int64 [N] or None), `num_classes`, and `open(i)` -> a PIL image, one item at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.zip = zipfile.ZipFile(self.path) if self.path.is_file() else None
        all_names = self.zip.namelist() if self.zip else [
            p.relative_to(self.path).as_posix() for p in sorted(self.path.rglob("*")) if p.is_file()]
        self.names = sorted(n for n in all_names if Path(n).suffix.lower() in IMAGE_EXTS
                            and not Path(n).name.startswith("."))
        if not self.names:
            raise UserError(f"'{path}' holds no image files ({', '.join(IMAGE_EXTS)})")
        self.labels, self.num_classes = self._labels(all_names)

    def _labels(self, all_names: list[str]) -> tuple[np.ndarray | None, int | None]:
        if "dataset.json" not in all_names:
            return None, None
        raw = self.zip.read("dataset.json") if self.zip else (self.path / "dataset.json").read_bytes()
        try:
            meta = json.loads(raw)
        except ValueError:
            raise UserError(f"'{self.path}': dataset.json is not valid JSON") from None
        pairs = meta.get("labels") if isinstance(meta, dict) else "bad"
        if pairs is None:
            return None, None
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise UserError(f"'{self.path}': dataset.json 'labels' must be a list of [path, class] pairs or null")
        table = {str(name).replace("\\", "/"): c for name, c in pairs}
        missing = [n for n in self.names if n not in table]
        if missing:
            raise UserError(f"'{self.path}': dataset.json has no label for '{missing[0]}' ({len(missing)} images "
                            "without one)")
        labels = np.array([table[n] for n in self.names])
        if labels.dtype.kind not in "iu" or labels.min() < 0:
            raise UserError(f"'{self.path}': dataset.json labels must be class indices >= 0")
        return labels.astype(np.int64), int(labels.max()) + 1

    def __len__(self) -> int:
        return len(self.names)

    def open(self, i: int):
        from PIL import Image
        name = self.names[i]
        try:
            if self.zip:
                with self.zip.open(name) as f:
                    im = Image.open(f)
                    im.load()
            else:
                im = Image.open(self.path / name)
                im.load()
        except Exception as e:     # PIL: UnidentifiedImageError, OSError (truncated), DecompressionBombError...
            raise UserError(f"cannot read image '{name}' in '{self.path}' ({first_line(e)}); fix or remove it") from e
        return im


def center_crop_resize(im, resolution: int):
    """EDM's dataset_tool `center-crop`: the central square, resized to resolution x resolution (Lanczos)."""
    from PIL import Image
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im.resize((resolution, resolution), Image.LANCZOS)


def iter_arrays(src: ImageSource, resolution: int | None, gray: bool) -> Iterator[np.ndarray]:
    """uint8 [H, W] (gray) or [H, W, 3] per item; every item must have the first one's size (after the resize)."""
    first = None
    for i in range(len(src)):
        im = src.open(i)
        if resolution:
            im = center_crop_resize(im, resolution)
        a = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
        if first is None:
            first = a.shape
        elif a.shape != first:
            raise UserError(f"images differ in size: '{src.names[0]}' is {first[1]}x{first[0]} but "
                            f"'{src.names[i]}' is {a.shape[1]}x{a.shape[0]}; use --resolution R to resize them")
        yield a


def read_edm_dataset(path: Path, n: int | None = None) -> Raw:
    """An EDM zip / dataset folder, decoded (the training loader; `prepare` streams instead)."""
    src = ImageSource(path)
    count = len(src) if n is None else min(n, len(src))
    gray = src.open(0).mode in ("L", "1")
    out = None
    for i, a in zip(range(count), iter_arrays(src, None, gray)):
        if out is None:
            out = np.empty((count, *a.shape), np.uint8)
        out[i] = a
    labels = None if src.labels is None else src.labels[:count]
    return Raw(out, labels, num_classes=src.num_classes, layout="NHW" if gray else "NHWC")


def labels_path(npy: Path) -> Path:
    """FILE.npy -> FILE.labels.npy (the labels `prepare` writes beside the images, read back with them)."""
    return Path(npy).with_suffix(".labels.npy")
