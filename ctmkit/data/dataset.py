"""The Dataset container and its constructors: validated arrays, samplers and exact Gaussian mixtures.

A Dataset keeps its items in the data's own space and layout (`items`: a numpy array, a .npy read row by row on
access (readers.NpyRows), or images decoded one at a time (images.LazyImages): uint8 stays uint8) and converts to
model space (see normalize.py) per batch, on whatever device the batch goes to: memory is bounded whatever the data
size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ctmkit.core.mixtures import GaussianMixture
from ctmkit.data.normalize import Normalizer, array_tensor, chunk_rows, fit_images, fit_vectors, vector_normalizer
from ctmkit.errors import UserError

Sampler = Callable[[int, "torch.Generator | None"], Tensor]
_F32_MAX = float(np.finfo(np.float32).max)
MAX_CLASSES = 1_000_000


@dataclass
class Dataset:
    """Data items in data space (converted to model space per batch) + labels, plus a fresh sampler / exact
    mixture when known. `data[idx]` (idx: indices) gives model-space items [len(idx), ...] on the CPU."""

    items: object  # data-space items [N, ...] in the data's layout: np.ndarray / NpyRows / LazyImages
    labels: Tensor | None  # int64 [N] or None
    num_classes: int  # 0 when unlabelled
    normalizer: Normalizer
    spec: str
    mixture: GaussianMixture | None = None  # GaussianMixture: exact density in model space, when known
    sampler: Sampler | None = None  # fresh model-space samples (generated sets)

    @property
    def shape(self) -> tuple:
        """Per-sample model-space shape, e.g. (2,) or (1, 8, 8)."""
        item = tuple(self.items.shape[1:])
        layout = self.normalizer.layout
        if layout == "NHW":
            return (1,) + item
        if layout == "NHWC":
            return (item[2], item[0], item[1])
        return item

    @property
    def kind(self) -> str:
        """'vector' or 'image'."""
        return self.normalizer.kind

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def raw(self, idx) -> Tensor:
        """Data-space items at indices `idx` as a CPU tensor in the data's dtype (uint8 stays uint8) and layout."""
        return array_tensor(self.items[np.asarray(idx, dtype=np.int64)])

    def __getitem__(self, idx) -> Tensor:
        """Model-space float32 items at indices `idx` (a tensor, array or list of ints) on the CPU."""
        return self.normalizer.to_model_batch(self.raw(idx))

    def batches(self, idx=None, size: int | None = None) -> Iterator[Tensor]:
        """Model-space batches of at most `size` items (default: data/normalize.py: chunk_rows) over `idx` (default:
        every item, in order)."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        size = size or chunk_rows(self.items.shape)
        for i in range(0, len(idx), size):
            yield self[idx[i:i + size]]

    @property
    def x(self) -> Tensor:
        """The whole set in model space [N, ...] float32 (materialised: for small sets; use batches() otherwise)."""
        return torch.cat(list(self.batches())) if len(self) else self[[]]

    def sample_batch(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """A batch (x [n, ...], labels [n] | None): fresh from `sampler`, else uniform draws from the items."""
        if self.sampler is not None:
            out = self.sampler(n, generator)
            return out if isinstance(out, tuple) else (out, None)
        idx = torch.randint(len(self), (n,), generator=generator)
        return self[idx], (None if self.labels is None else self.labels[idx])

    def fresh(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n true samples [n, ...] for evaluation: fresh from `sampler`, else a random subset of the items."""
        if self.sampler is not None:
            out = self.sampler(n, generator)
            return out[0] if isinstance(out, tuple) else out
        return self[self.subset(n, generator)]

    def subset(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n random item indices: distinct when n <= len(self), else drawn with replacement."""
        size = len(self)
        if n <= size:
            return torch.randperm(size, generator=generator)[:n]
        return torch.randint(size, (n,), generator=generator)


# ---- validation ---------------------------------------------------------------------------------
def check_n(n: int | None) -> None:
    """`n` must be None or a positive integer."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise UserError(f"n must be a positive integer, got {n!r}")


def infer_layout(shape: tuple) -> str:
    """'ND', 'NHW', 'NHWC' or 'NCHW' from an array shape (channels last when the last dim is 1, 3 or 4)."""
    if len(shape) == 2:
        return "ND"
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4 and shape[3] in (1, 3, 4):
        return "NHWC"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "NCHW"
    raise UserError(f"expected [N, D] vectors or [N, H, W(, C)] images, got shape {tuple(shape)}")


def check_array(a, what: str = "data") -> str:
    """Validate raw data items (dtype, emptiness, and for floats NaN/Inf and the float32 range, checked chunk by
    chunk: a file read on access is never read whole); returns the normalizer dtype name."""
    if not hasattr(a, "dtype") or not hasattr(a, "shape") or isinstance(a, Tensor):
        raise UserError(f"{what} must be a numeric array, got {type(a).__name__}")
    if a.dtype.kind not in "uif":
        raise UserError(f"{what} has dtype {a.dtype}; expected uint8 or floating-point numbers")
    if len(a.shape) == 0 or 0 in a.shape:
        raise UserError(f"{what} is empty (shape {tuple(a.shape)}); it needs at least one sample")
    k = chunk_rows(a.shape)
    for i in range(0, a.shape[0], k) if a.dtype.kind == "f" else ():
        c = np.asarray(a[i:i + k])
        bad = ~np.isfinite(c)
        if bad.any():
            first = i + int(np.argwhere(bad.reshape(c.shape[0], -1).any(1))[0, 0])
            raise UserError(f"{what} contains NaN or Inf values (first at index {first}); remove or fix them")
        big = np.abs(c) > _F32_MAX if c.dtype.itemsize > 4 else np.zeros(1, bool)
        if big.any():
            first = i + int(np.argwhere(big.reshape(c.shape[0], -1).any(1))[0, 0])
            raise UserError(f"{what} has values beyond the float32 range (first at index {first}); rescale it")
    return "uint8" if a.dtype == np.uint8 else "float32"


def check_labels(labels: np.ndarray | None, n: int,
                 num_classes: int | None = None) -> tuple[Tensor | None, int]:
    """Validate integer labels [n] (>= 0, < num_classes when given); returns (int64 tensor, num_classes)."""
    if labels is None:
        return None, 0
    lab = np.asarray(labels)
    if lab.dtype.kind not in "ui":
        if lab.dtype.kind == "f" and lab.size and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise UserError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.ndim != 1 or lab.shape[0] != n:
        raise UserError(f"labels have shape {tuple(lab.shape)} but the data has {n} samples; "
                        "need one label each")
    if lab.size and lab.min() < 0:
        raise UserError(f"labels must be >= 0, found {int(lab.min())}")
    top = int(lab.max()) + 1 if lab.size else 0
    if top > MAX_CLASSES:
        raise UserError(f"label {top - 1} is too large; labels must be class indices 0..K-1 "
                        f"(K <= {MAX_CLASSES})")
    if num_classes is None:
        num_classes = top
    elif top > num_classes:
        raise UserError(f"label {top - 1} is out of range for {num_classes} classes (0..{num_classes - 1})")
    return torch.from_numpy(lab.astype(np.int64)), int(num_classes)


# ---- constructors -------------------------------------------------------------------------------
def from_array(a, spec: str, labels: np.ndarray | None = None, num_classes: int | None = None,
               n: int | None = None, layout: str | None = None,
               normalizer: Normalizer | None = None) -> Dataset:
    """A finite Dataset over data-space items (an array, NpyRows or LazyImages; first n items),
    validated; the items stay as they are and are normalised per batch."""
    check_n(n)
    if n is not None and hasattr(a, "shape") and len(a.shape) > 0:   # only the first n items are read at all
        a = a[:n]
        labels = None if labels is None else np.asarray(labels)[:n]
    dtype = check_array(a)
    layout = layout or infer_layout(a.shape)
    lab, k = check_labels(labels, a.shape[0], num_classes)
    if normalizer is None:
        normalizer = fit_vectors(a, dtype) if layout == "ND" else fit_images(a, layout, dtype)
    data = Dataset(items=a, labels=lab, num_classes=k, normalizer=normalizer, spec=spec)
    k = chunk_rows(a.shape)
    for i in range(0, len(data), k) if dtype != "uint8" else ():   # uint8 maps into [-1, 1]
        if not torch.isfinite(normalizer.to_model_batch(array_tensor(a[i:i + k]))).all():
            raise UserError("data values are too large to normalise; rescale the data")
    return data


def from_sampler(data_sampler: Sampler, normalizer: Normalizer, spec: str, n: int | None, seed: int,
                 default_n: int = 20000) -> Dataset:
    """Generated vector Dataset: `data_sampler(n, g)` gives data-space samples; pool of n drawn at `seed`."""
    check_n(n)

    def sampler(k: int, generator: torch.Generator | None = None) -> Tensor:
        return normalizer.to_model(data_sampler(k, generator))

    pool = data_sampler(n or default_n, torch.Generator().manual_seed(seed)).numpy()
    return Dataset(items=pool, labels=None, num_classes=0, normalizer=normalizer, spec=spec, sampler=sampler)


def mixture_moments(means: Tensor, stds: Tensor, weights: Tensor) -> tuple[np.ndarray, float]:
    """Exact per-dim mean [D] and mean per-dim variance of an isotropic mixture (float64)."""
    w = weights / weights.sum()
    mean = w @ means
    second = w @ (means * means) + (w * stds * stds).sum()
    var = float((second - mean * mean).clamp_min(0).mean())
    return mean.numpy(), var


def from_mixture(means, stds, weights, spec: str, n: int | None, seed: int,
                 default_n: int = 20000, classes=None) -> Dataset:
    """A Dataset from a data-space isotropic Gaussian mixture; `mixture` is the exact model-space density. With
    `classes` [K] (component -> class) the set is labelled: items and fresh samples carry their component's class."""
    check_n(n)
    means = torch.as_tensor(means, dtype=torch.float64)
    stds = torch.as_tensor(stds, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    mean, var = mixture_moments(means, stds, weights)
    norm = vector_normalizer(mean, var)
    shift = torch.tensor(norm.shift, dtype=torch.float64)
    model = GaussianMixture((means - shift) * norm.scale, stds * norm.scale, weights / weights.sum(), classes)
    labelled = model.classes is not None

    def sampler(k: int, generator: torch.Generator | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return model.sample(k, generator=generator, with_labels=labelled)

    pool = GaussianMixture(means, stds, weights / weights.sum(), classes).sample(  # the pool in data space (float64)
        n or default_n, torch.Generator().manual_seed(seed), torch.float64, with_labels=labelled)
    pool, labels = pool if labelled else (pool, None)
    data = Dataset(items=pool.numpy(), labels=labels, num_classes=model.num_classes, normalizer=norm, spec=spec,
                   mixture=model, sampler=sampler)
    if not torch.isfinite(data.x).all():
        raise UserError(f"mixture '{spec}' has values too large to normalise; rescale its means/stds")
    return data
