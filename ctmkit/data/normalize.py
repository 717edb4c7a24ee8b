"""Data space <-> model space.

Vectors are shifted by their per-dimension mean and multiplied by ONE scalar so that the overall
model-space std is sigma_data = 0.5 (EDM, Karras et al. 2022) and isotropic mixtures stay isotropic.
Images are mapped linearly from [lo, hi] to [-1, 1] and always live as [N, C, H, W] in model space.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from ctmkit.errors import UserError

SIGMA_DATA = 0.5
LAYOUTS = ("ND", "NHW", "NHWC", "NCHW")
DTYPES = ("uint8", "float32")
CHUNK = 4096  # at most this many items converted or checked at a time (float64 work buffers stay small)


def chunk_rows(shape: tuple) -> int:
    """Items per chunk of an array of `shape` [N, ...]: CHUNK, fewer for big items (a float64 chunk stays <= 64 MB)."""
    per_item = int(np.prod(shape[1:], dtype=np.int64)) * 8
    return max(1, min(CHUNK, (1 << 26) // max(per_item, 1)))


@dataclass
class Normalizer:
    """Maps data space <-> model space. Serialisable (to_dict/from_dict, plain JSON types)."""

    kind: str  # "vector" or "image"
    layout: str  # data layout: "ND" (vectors), "NHW", "NHWC", "NCHW"
    dtype: str  # data dtype name: "uint8" or "float32"
    shift: list[float] | None = None  # vectors: per-dim mean
    scale: float = 1.0  # vectors: x_model = (x - shift) * scale
    lo: float = 0.0  # images: x_model = (x - lo) / (hi - lo) * 2 - 1
    hi: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("vector", "image") or self.layout not in LAYOUTS or self.dtype not in DTYPES:
            raise UserError(f"invalid normalizer (kind={self.kind!r}, layout={self.layout!r}, "
                            f"dtype={self.dtype!r}); re-create it from the data")
        if (self.kind == "vector") != (self.layout == "ND"):
            raise UserError(f"invalid normalizer: kind {self.kind!r} does not match layout {self.layout!r}")
        if self.kind == "vector" and self.shift is None:
            raise UserError("invalid normalizer: vector data needs a 'shift'")
        finite = all(math.isfinite(v) for v in (self.scale, self.lo, self.hi))
        if not (finite and self.scale > 0 and self.hi > self.lo):
            raise UserError(f"invalid normalizer: need finite scale > 0 and hi > lo (scale={self.scale}, "
                            f"lo={self.lo}, hi={self.hi})")

    # ---- shapes -------------------------------------------------------------------------------
    def _check_data_shape(self, shape: tuple) -> None:
        ndim = {"ND": 2, "NHW": 3, "NHWC": 4, "NCHW": 4}[self.layout]
        ok = len(shape) == ndim and (self.layout != "ND" or shape[1] == len(self.shift or []))
        if not ok:
            want = {"ND": f"[N, {len(self.shift or [])}]", "NHW": "[N, H, W]", "NHWC": "[N, H, W, C]",
                    "NCHW": "[N, C, H, W]"}[self.layout]
            raise UserError(f"expected data of shape {want} (layout {self.layout}), got shape {tuple(shape)}")

    def _check_model_shape(self, shape: tuple) -> None:
        if self.kind == "vector":
            ok = len(shape) == 2 and shape[1] == len(self.shift or [])
        else:
            ok = len(shape) == 4 and (self.layout != "NHW" or shape[1] == 1)
        if not ok:
            raise UserError(f"model-space tensor has shape {tuple(shape)}, which does not fit {self.kind} "
                            f"data of layout {self.layout}")

    # ---- maps ---------------------------------------------------------------------------------
    def to_model_batch(self, t: Tensor) -> Tensor:
        """Data-layout tensor [n, ...] (uint8 stays uint8 until here) -> float32 model tensor on the same device
        (images [n, C, H, W]). The arithmetic is float64 (float32 on MPS, which has no float64), so a batch converted
        on a GPU equals the one converted on the CPU bit for bit."""
        self._check_data_shape(tuple(t.shape))
        a = t.to(torch.float32 if t.device.type == "mps" else torch.float64)
        if self.kind == "vector":
            return ((a - torch.tensor(self.shift, dtype=a.dtype, device=a.device)) * self.scale).float()
        a = (a - self.lo) / (self.hi - self.lo) * 2 - 1
        if self.layout == "NHW":
            a = a[:, None]
        elif self.layout == "NHWC":
            a = a.permute(0, 3, 1, 2)
        return a.float().contiguous()

    def _backward(self, a: np.ndarray) -> np.ndarray:
        """Model [n, ...] float64 -> data [n, ...] in the data's dtype and layout."""
        if self.kind == "vector":
            a = a / self.scale + np.asarray(self.shift, dtype=np.float64)
        else:
            a = np.clip((a + 1) / 2 * (self.hi - self.lo) + self.lo, self.lo, self.hi)
            if self.layout == "NHW":
                a = a[:, 0]
            elif self.layout == "NHWC":
                a = a.transpose(0, 2, 3, 1)
        if self.dtype == "uint8":
            return np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        with np.errstate(over="ignore", invalid="ignore"):
            return a.astype(np.float32)

    def to_model(self, x: np.ndarray | Tensor) -> Tensor:
        """Data-layout array [N, ...] (one read on access too) -> float32 CPU model tensor: vectors [N, D], images
        [N, C, H, W]; converted in chunks by `to_model_batch`."""
        a = x.detach().cpu() if isinstance(x, Tensor) else x
        self._check_data_shape(tuple(a.shape))
        k = chunk_rows(a.shape)
        parts = [self.to_model_batch(array_tensor(a[i:i + k])) for i in range(0, a.shape[0], k)]
        return torch.cat(parts) if parts else self.to_model_batch(array_tensor(a[:0]))

    def to_data(self, x: Tensor | np.ndarray) -> np.ndarray:
        """Model tensor -> array in the data's own layout and value range (uint8 rounded and clipped)."""
        a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        self._check_model_shape(a.shape)
        n = a.shape[0]
        k = chunk_rows(a.shape)
        parts = [self._backward(a[i:i + k].astype(np.float64)) for i in range(0, n, k)]
        return np.concatenate(parts) if parts else self._backward(a.astype(np.float64))

    def to_unit(self, data: np.ndarray) -> np.ndarray:
        """Images in the data's own space and layout (what to_data gives) -> float32 [N, H, W, C] in [0, 1]:
        (data - lo) / (hi - lo) in float64, a channel axis for grey images (diffusers' numpy image convention)."""
        if self.kind != "image":
            raise UserError("only images map to [0, 1] pictures; these are vectors")
        a = (np.asarray(data, dtype=np.float64) - self.lo) / (self.hi - self.lo)
        a = a[..., None] if self.layout == "NHW" else a.transpose(0, 2, 3, 1) if self.layout == "NCHW" else a
        return np.ascontiguousarray(a, dtype=np.float32)

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON types."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        """Inverse of to_dict."""
        if not isinstance(d, dict):
            raise UserError(f"normalizer metadata must be a mapping, got {type(d).__name__}")
        missing = [k for k in ("kind", "layout", "dtype") if k not in d]
        if missing:
            raise UserError(f"normalizer metadata is missing key '{missing[0]}'; re-create it from the data")
        try:
            shift = None if d.get("shift") is None else [float(v) for v in d["shift"]]
            return cls(kind=str(d["kind"]), layout=str(d["layout"]), dtype=str(d["dtype"]), shift=shift,
                       scale=float(d.get("scale", 1.0)), lo=float(d.get("lo", 0.0)),
                       hi=float(d.get("hi", 1.0)))
        except (TypeError, ValueError) as e:
            raise UserError(f"normalizer metadata has a non-numeric value ({e}); "
                            "re-create it from the data") from e


def array_tensor(a) -> Tensor:
    """A CPU tensor of an array (chunk): copied when read-only or not in native byte order."""
    if isinstance(a, Tensor):
        return a
    a = np.asarray(a)
    if not a.dtype.isnative:   # big-endian data: torch takes native byte order only
        return torch.from_numpy(a.astype(a.dtype.newbyteorder("=")))
    return torch.from_numpy(a if a.flags.writeable else np.array(a))


def vector_normalizer(mean: np.ndarray, var: float, dtype: str = "float32") -> Normalizer:
    """Normalizer for vectors with per-dim mean [D] and mean per-dim variance `var` (model std 0.5)."""
    scale = SIGMA_DATA / math.sqrt(var) if var > 0 else 1.0
    if not math.isfinite(scale) or not np.all(np.isfinite(mean)):
        raise UserError("data values are too large to normalise; rescale the data")
    return Normalizer("vector", "ND", dtype, shift=[float(v) for v in mean], scale=float(scale))


def fit_vectors(x: np.ndarray, dtype: str) -> Normalizer:
    """Normalizer fitted to vector data [N, D] (an array read on access too): per-dim mean and variance in float64,
    streamed over chunks (Chan et al.'s pairwise update of count, mean and sum of squared deviations)."""
    count, mean, m2 = 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    with np.errstate(over="ignore", invalid="ignore"):
        k = chunk_rows(x.shape)
        for i in range(0, x.shape[0], k):
            c = np.asarray(x[i:i + k], dtype=np.float64)
            k, mc = c.shape[0], c.mean(0)
            delta = mc - mean
            m2 = m2 + ((c - mc) ** 2).sum(0) + delta ** 2 * count * k / (count + k)
            mean = mean + delta * k / (count + k)
            count += k
        var = float((m2 / count).mean())
    if not math.isfinite(var):
        raise UserError("data values are too large to normalise; rescale the data")
    return vector_normalizer(mean, var, dtype)


def uint8_image_normalizer(channels: int) -> Normalizer:
    """The normalizer of uint8 images [N, H, W] (one channel) or [N, H, W, C]: [0, 255] <-> [-1, 1] (the data space
    of foreign image teachers, whose samples are written as uint8 images)."""
    return Normalizer("image", "NHW" if channels == 1 else "NHWC", "uint8", lo=0.0, hi=255.0)


def fit_images(x: np.ndarray, layout: str, dtype: str) -> Normalizer:
    """Image normalizer: uint8 -> [0, 255]; float -> [0, 1] or [-1, 1] if inside it, else observed min/max."""
    if dtype == "uint8":
        lo, hi = 0.0, 255.0
    else:   # min and max streamed over chunks (a file read on access is never read whole)
        k, lo, hi = chunk_rows(x.shape), math.inf, -math.inf
        for i in range(0, x.shape[0], k):   # one pass: each chunk read once for both
            c = np.asarray(x[i:i + k])
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        elif lo >= -1.0 and hi <= 1.0:
            lo, hi = -1.0, 1.0
        elif hi <= lo:
            hi = lo + max(1.0, abs(lo) * 1e-6)  # constant data: any positive width
    return Normalizer("image", layout, dtype, lo=lo, hi=hi)
