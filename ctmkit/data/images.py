"""Image sources read one item at a time (`LazyImages`: decoded on access), EDM's dataset format, and the helpers of
`prepare` (any source -> a uint8 .npy).

EDM's dataset format (written by its dataset_tool.py): a zip file or a folder of images (PNG) with a
`dataset.json` at its root holding `{"labels": [[relative_path, class], ...]}` or `{"labels": null}`; paths use '/'.
`prepare` converts any supported source (image folders, EDM zips/folders, CIFAR-10 batches, MNIST idx, .npz/.npy)
into `OUT.npy` (uint8, [N, H, W] or [N, H, W, C]) and, when labelled, `OUT.labels.npy` (int64 [N]) beside it,
written through a memory-mapped temp file (bounded memory) and renamed into place; `--resolution R` centre-crops
to a square and resizes to R x R (Lanczos), as EDM's dataset_tool does with `--transform=center-crop`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError
from ..progress import progress_bar
from .readers import IMAGE_EXTS, Raw, first_line


def is_edm_dataset(path: Path) -> bool:
    """A zip file, or a folder with a dataset.json: EDM's dataset format."""
    return (path.is_file() and path.suffix.lower() == ".zip") or (path.is_dir() and (path / "dataset.json").is_file())


class ImageSource:
    """The images of an EDM zip / folder, or of a plain image folder (`plain=True`: files directly in it, unlabelled,
    else one subfolder per class, sorted -> 0..K-1): `names` (sorted relative paths), `labels` (int64 [N] or None),
    `num_classes`, and `open(i)` -> a PIL image, one item at a time. A zip is reopened in each process (DataLoader
    workers never share a file offset)."""

    def __init__(self, path: Path, plain: bool = False) -> None:
        self.path = Path(path)
        self._zip, self._pid = None, None
        if plain:
            self.names, self.labels, self.num_classes = _plain_folder(self.path)
            return
        all_names = self.zip.namelist() if self.path.is_file() else [
            p.relative_to(self.path).as_posix() for p in sorted(self.path.rglob("*")) if p.is_file()]
        self.names = sorted(n for n in all_names if _is_image(n))
        if not self.names:
            raise UserError(f"'{path}' holds no image files ({', '.join(IMAGE_EXTS)})")
        self.labels, self.num_classes = self._labels(all_names)

    @property
    def zip(self) -> zipfile.ZipFile | None:
        """The zip file opened by this process (None for a folder)."""
        if not self.path.is_file():
            return None
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_pid": None}

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
            raise UserError(f"cannot read image file {self.describe(name)} ({first_line(e)}); fix or remove it") from e
        return im

    def describe(self, name: str) -> str:
        """An image named for a message: 'FOLDER/NAME', or 'NAME' in 'ZIP'."""
        return f"'{name}' in '{self.path}'" if self.zip else f"'{self.path / name}'"

    def digest(self) -> str:
        """SHA-256 of what identifies the images without decoding them: names and CRC-32s (zip) or names, sizes and
        modification times (folder)."""
        h = hashlib.sha256(str(self.path.resolve()).encode())
        for name in self.names:
            if self.zip:
                info = self.zip.getinfo(name)
                h.update(f"{name}\0{info.file_size}\0{info.CRC}\n".encode())
            else:
                st = (self.path / name).stat()
                h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS and not Path(name).name.startswith(".")


def _plain_folder(folder: Path) -> tuple[list[str], np.ndarray | None, int | None]:
    """(names, labels, num_classes) of a plain folder: image files directly in it (unlabelled), else one subfolder
    per class (sorted -> 0..K-1), each holding images."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and _is_image(p.name))
    if files:
        return files, None, None
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    names, labels = [], []
    for k, sub in enumerate(classes):
        sub_files = sorted(p.name for p in sub.iterdir() if p.is_file() and _is_image(p.name))
        if not sub_files:
            raise UserError(f"class folder '{sub}' has no image files ({', '.join(IMAGE_EXTS)}); add images or "
                            "remove it")
        names += [f"{sub.name}/{f}" for f in sub_files]
        labels += [k] * len(sub_files)
    if not names:
        raise UserError(f"folder '{folder}' has no image files ({', '.join(IMAGE_EXTS)}) and no class subfolders "
                        "with images")
    return names, np.asarray(labels, np.int64), len(classes)


def scan_headers(src: ImageSource, progress: bool | None = None,
                 same_size: bool = True) -> tuple[tuple[int, int], bool]:
    """((width, height), gray) of a set of images from their headers alone (no pixel is decoded): every image must
    have the first one's size (unless not `same_size`); gray when every image is grayscale (modes L, 1), else all
    are read as RGB."""
    from PIL import Image

    first, gray = None, True
    for i in progress_bar(range(len(src)), desc="image headers", enabled=progress and len(src) >= 10000,
                          transient=True):
        name = src.names[i]
        try:
            with (src.zip.open(name) if src.zip else open(src.path / name, "rb")) as f, Image.open(f) as im:
                size, mode = im.size, im.mode
        except Exception as e:   # PIL: UnidentifiedImageError, OSError...
            raise UserError(f"cannot read image file {src.describe(name)} ({first_line(e)}); fix or remove it") from e
        first = first or size
        if same_size and size != first:
            raise UserError(f"images differ in size: {src.describe(src.names[0])} is {first[0]}x{first[1]} but "
                            f"{src.describe(name)} is "
                            f"{size[0]}x{size[1]}; convert the set with `ctmkit prepare SRC OUT.npy --resolution R`")
        gray = gray and mode in ("L", "1")
    return first, gray


class LazyImages:
    """The items of an ImageSource as a read-only uint8 array [N, H, W] (gray) / [N, H, W, 3] decoded on access
    (`a[i]`, `a[slice]`, `a[index array]`): at the start only the headers are read (sizes, modes); an image that
    cannot be decoded is a UserError naming the file when it is read."""

    dtype = np.dtype(np.uint8)

    def __init__(self, src: ImageSource, start: int = 0, stop: int | None = None,
                 header: tuple[tuple[int, int], bool] | None = None) -> None:
        """header: ((width, height), gray) of every image, from `scan_headers` (computed when not given)."""
        self.src, self.start = src, start
        self.stop = len(src) if stop is None else min(stop, len(src))
        (w, h), self.gray = header or scan_headers(src)
        self.shape = (self.stop - start, h, w) if self.gray else (self.stop - start, h, w, 3)

    @property
    def layout(self) -> str:
        return "NHW" if self.gray else "NHWC"

    def __len__(self) -> int:
        return self.shape[0]

    def item(self, i: int) -> np.ndarray:
        """Image i (0-based within this view) as uint8 [H, W] or [H, W, 3]."""
        im = self.src.open(self.start + i)
        a = np.asarray(im.convert("L" if self.gray else "RGB"), dtype=np.uint8)
        if a.shape != self.shape[1:]:
            (h0, w0), (h1, w1) = self.shape[1:3], a.shape[:2]
            raise UserError(f"images differ in size: {self.src.describe(self.src.names[self.start])} is {w0}x{h0} "
                            f"but {self.src.describe(self.src.names[self.start + i])} is {w1}x{h1}; convert the set "
                            "with `ctmkit prepare SRC OUT.npy --resolution R`")
        return a

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return LazyImages(self.src, self.start + start, self.start + max(start, stop),
                                  ((self.shape[2], self.shape[1]), self.gray))
            key = np.arange(start, stop, step)
        if np.ndim(key) == 0:
            return self.item(_check_index(int(key), len(self)))
        idx = [_check_index(int(i), len(self)) for i in np.asarray(key).reshape(-1)]
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        for j, i in enumerate(idx):
            out[j] = self.item(i)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[np.arange(len(self))]
        return a if dtype is None else a.astype(dtype)

    def digest(self) -> str:
        return f"{self.src.digest()}:{self.start}:{self.stop}"


def _check_index(i: int, n: int) -> int:
    if not -n <= i < n:
        raise IndexError(f"index {i} is out of range for {n} images")
    return i % n


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


def read_images(path: Path, plain: bool = False, n: int | None = None) -> Raw:
    """An EDM zip / dataset folder (or a plain image folder; its first n images) as LazyImages: decoded per item
    when read."""
    src = ImageSource(path, plain)
    if n is not None:
        src.names = src.names[:n]
        src.labels = None if src.labels is None else src.labels[:n]
    items = LazyImages(src)
    return Raw(items, src.labels, num_classes=src.num_classes, layout=items.layout)


def labels_path(npy: Path) -> Path:
    """FILE.npy -> FILE.labels.npy (the labels `prepare` writes beside the images, read back with them)."""
    return Path(npy).with_suffix(".labels.npy")
