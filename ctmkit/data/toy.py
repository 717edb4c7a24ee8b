"""Built-in data sets: 2-D toys sampled on the fly (ring, labelled_ring, labelled_blobs and grid: exact Gaussian
mixtures; labelled_ring has 4 well-separated classes, labelled_blobs 2 overlapping ones), sklearn digits.

The 2-D samplers follow the usual toy densities (FFJORD, Grathwohl et al. 2019; sklearn make_moons /
make_swiss_roll) but draw from a torch.Generator so that a seed fixes the samples.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ctmkit.data.dataset import Dataset, from_array, from_mixture, from_sampler
from ctmkit.data.normalize import Normalizer, fit_vectors

RING_RADIUS, RING_STD, RING_K = 2.0, 0.05, 8
GRID_SIDE, GRID_STD = 5, 0.05
MOONS_NOISE = 0.05
SPIRAL_NOISE = 0.5  # before the 1/5 rescale (FFJORD's swiss roll uses noise 1.0)
DEFAULT_POOL = 20000


def ring_params() -> tuple[Tensor, Tensor, Tensor]:
    """8 equal-weight isotropic Gaussians on a circle of radius 2: (means [8, 2], stds [8], weights [8])."""
    a = torch.arange(RING_K, dtype=torch.float64) * (2 * math.pi / RING_K)
    means = RING_RADIUS * torch.stack([a.cos(), a.sin()], 1)
    stds = torch.full((RING_K,), RING_STD, dtype=torch.float64)
    return means, stds, torch.full((RING_K,), 1.0 / RING_K, dtype=torch.float64)


def labelled_ring_params() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ring with 4 classes, component k in class k mod 4 (each class two opposite blobs): (means, stds, weights,
    classes [8])."""
    return (*ring_params(), torch.arange(RING_K) % 4)


def labelled_blobs_params() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two overlapping classes, where guidance moves samples far (the guidance benchmark's set): class 0 one wide
    blob at (-1, 0), class 1 a wide blob at (1, 0) and a narrower one at (0, 1.5): (means, stds, weights, classes)."""
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], dtype=torch.float64)
    return (means, torch.tensor([0.5, 0.5, 0.3], dtype=torch.float64),
            torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64), torch.tensor([0, 1, 1]))


def grid_params() -> tuple[Tensor, Tensor, Tensor]:
    """5x5 equal-weight isotropic Gaussians at integers -2..2: (means [25, 2], stds [25], weights [25])."""
    c = torch.arange(GRID_SIDE, dtype=torch.float64) - (GRID_SIDE - 1) / 2
    means = torch.cartesian_prod(c, c)
    k = means.shape[0]
    stds = torch.full((k,), GRID_STD, dtype=torch.float64)
    return means, stds, torch.full((k,), 1.0 / k, dtype=torch.float64)


def moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaving half circles (sklearn make_moons, random positions), noise 0.05: [n, 2] float64."""
    t = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64) * MOONS_NOISE
    return torch.stack([x, y], 1) + noise


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the 8 dark squares of a 4x4 checkerboard on [-4, 4]^2 (FFJORD): [n, 2] float64."""
    x1 = torch.rand(n, generator=generator, dtype=torch.float64) * 4 - 2
    x2 = torch.rand(n, generator=generator, dtype=torch.float64)
    x2 = x2 - torch.randint(0, 2, (n,), generator=generator).double() * 2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2


def spiral(n: int, generator: torch.Generator | None = None) -> Tensor:
    """2-D swiss roll t (cos t, sin t), t ~ U(1.5 pi, 4.5 pi), plus noise, divided by 5: [n, 2] float64."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    x = torch.stack([t * t.cos(), t * t.sin()], 1)
    return (x + SPIRAL_NOISE * torch.randn(n, 2, generator=generator, dtype=torch.float64)) / 5


_SAMPLERS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "moons": moons, "checkerboard": checkerboard, "spiral": spiral}
_MIXTURES = {"ring": ring_params, "grid": grid_params, "labelled_ring": labelled_ring_params,
             "labelled_blobs": labelled_blobs_params}
BUILTIN_NAMES = ["ring", "grid", "moons", "checkerboard", "spiral", "digits", "labelled_ring", "labelled_blobs"]


def builtin_names() -> list[str]:
    """Names accepted as a data SPEC without a path."""
    return list(BUILTIN_NAMES)


@cache
def _sampler_normalizer(name: str) -> Normalizer:
    """Deterministic normaliser of a sampled toy set: moments of 200k samples drawn with seed 0."""
    x = _SAMPLERS[name](200_000, torch.Generator().manual_seed(0)).numpy()
    return fit_vectors(x, "float32")


def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits: images [1797, 8, 8] float32 in 0..16 and labels [1797] int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def load_builtin(name: str, n: int | None = None, seed: int = 0) -> Dataset:
    """A built-in data set by name (see builtin_names)."""
    if name in _MIXTURES:
        params = _MIXTURES[name]()
        return from_mixture(*params[:3], spec=name, n=n, seed=seed, default_n=DEFAULT_POOL,
                            classes=params[3] if len(params) > 3 else None)
    if name in _SAMPLERS:
        return from_sampler(_SAMPLERS[name], _sampler_normalizer(name), spec=name, n=n, seed=seed,
                            default_n=DEFAULT_POOL)
    if name == "digits":
        images, labels = load_digits_array()
        norm = Normalizer("image", "NHW", "float32", lo=0.0, hi=16.0)
        return from_array(images, spec=name, labels=labels, num_classes=10, n=n, layout="NHW",
                          normalizer=norm)
    raise KeyError(name)
