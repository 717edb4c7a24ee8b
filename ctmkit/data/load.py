"""load_data(SPEC): one entry point for every data source (README, "Data SPEC")."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from ctmkit.data import readers
from ctmkit.data.dataset import Dataset, check_n, from_array, from_mixture
from ctmkit.data.images import is_edm_dataset, labels_path, read_images
from ctmkit.data.latents import is_latent_folder, load_latents
from ctmkit.data.toy import DEFAULT_POOL, builtin_names, load_builtin
from ctmkit.errors import UserError


def load_data(spec: str, n: int | None = None, seed: int = 0) -> Dataset:
    """Load a data SPEC (built-in name, gmm:PATH.json, .npy/.npz, image folder, MNIST idx or CIFAR-10 folder, or a
    prepared latent folder: data/latents.py, a LatentData).

    n caps finite sets (first n items) and sets the pool size of generated ones; seed fixes that pool."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"data SPEC must be a non-empty string, got {spec!r}")
    check_n(n)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    spec = spec.strip()
    if spec.startswith("gmm:"):
        means, stds, weights, classes = readers.read_gmm_json(Path(spec[4:]).expanduser())
        return from_mixture(means, stds, weights, spec=spec, n=n, seed=seed, default_n=DEFAULT_POOL, classes=classes)
    if spec in builtin_names():
        return load_builtin(spec, n=n, seed=seed)
    path = Path(spec).expanduser()
    if not path.exists():
        if "/" in spec or "\\" in spec or path.suffix:
            raise UserError(f"data path '{spec}' does not exist")
        raise UserError(f"unknown data set '{spec}': not a built-in ({', '.join(builtin_names())}) "
                        "and no such file or folder")
    if is_latent_folder(path):     # before any image folder: `ctmkit prepare --pipeline` wrote it
        return load_latents(path, n)
    raw = read_raw(path, n)   # a .npy's rows and image files are read per item, when used
    return from_array(raw.data, spec=spec, labels=raw.labels, num_classes=raw.num_classes, n=n,
                      layout=raw.layout)


def read_raw(path: Path, n: int | None = None) -> readers.Raw:
    """The raw items of a data file or folder: .npy (rows read on access, + FILE.labels.npy beside it), .npz, an EDM
    dataset zip or folder (dataset.json), an MNIST idx folder, a CIFAR-10 batches folder or a folder of images (zips
    and image folders as LazyImages, decoded per item). Only the first `n` items are read when given."""
    spec = str(path)
    if is_latent_folder(path):
        raise UserError(f"'{spec}' is a prepared latent folder: use it as --data {spec} with its pipeline's teacher")
    if is_edm_dataset(path):
        try:
            return read_images(path, n=n)
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f"cannot read '{spec}' as an EDM dataset ({e})") from None
    if path.is_dir():
        try:
            return _read_folder(path, n)
        except OSError as e:  # e.g. a folder or file without read permission
            raise UserError(f"cannot read data folder '{spec}' ({e.strerror or e}); check permissions") from e
    if path.suffix.lower() == ".npy":
        raw = readers.read_npy(path, lazy=True)
        if labels_path(path).is_file():
            raw.labels = readers.read_npy(labels_path(path)).data
        return raw
    if path.suffix.lower() == ".npz":
        return readers.read_npz(path)
    if path.suffix.lower() == ".json":
        raise UserError(f"'{spec}' is a JSON file; write gmm:{spec} to load it as a Gaussian mixture")
    raise UserError(f"unsupported data file '{spec}'; use .npy, .npz, .zip (EDM), gmm:FILE.json or an image folder")


def _read_folder(path: Path, n: int | None) -> readers.Raw:
    """MNIST idx folder, CIFAR-10 batches folder, or a folder of image files."""
    if readers.is_mnist_folder(path):
        return readers.read_mnist(path, n)
    cifar = readers.cifar_dir(path)
    if cifar is not None:
        return readers.read_cifar(cifar, n)
    return read_images(path, plain=True, n=n)
