"""Sliced Wasserstein-1 distance and RBF MMD for vector samples (docs/method.md section 6).

Sliced W1 of two equal-size samples: mean over random unit directions of the W1 distance between the
projected samples (mean absolute difference of the sorted projections). Quality is reported as a ratio to
the true-vs-true floor: the mean sliced W1 between fresh true draws of the same size."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def sliced_w1(a: Tensor, b: Tensor, n_proj: int = 512, generator: torch.Generator | None = None) -> float:
    """Sliced W1 between samples a [N, D] and b [M, D] (quantiles interpolated when N != M)."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"samples differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    dirs = torch.randn(a.shape[1], n_proj, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    if pa.shape[0] != pb.shape[0]:
        q = torch.linspace(0, 1, max(pa.shape[0], pb.shape[0]), dtype=torch.float64)
        pa, pb = torch.quantile(pa, q, dim=0), torch.quantile(pb, q, dim=0)
    return float((pa - pb).abs().mean())


def true_floor(sample_true: Callable[[int, torch.Generator], Tensor], n: int, draws: int = 5, seed: int = 0,
               n_proj: int = 512) -> float:
    """Mean sliced W1 between pairs of fresh true samples of size n (the noise floor of the metric)."""
    vals = []
    for i in range(draws):
        g = torch.Generator().manual_seed(seed + 1000 + i)
        vals.append(sliced_w1(sample_true(n, g), sample_true(n, g), n_proj, torch.Generator().manual_seed(i)))
    return sum(vals) / len(vals)


def swd_ratio(samples: list[Tensor], sample_true: Callable[[int, torch.Generator], Tensor], draws: int = 5,
              seed: int = 0, n_proj: int = 512) -> dict:
    """Sliced W1 of each model sample set (e.g. one per sampling seed) to a fresh true sample, averaged, and its
    ratio to the true-vs-true floor: {'swd', 'floor', 'ratio', 'seed_ratios'} (the last: each set's own ratio,
    whose mean is 'ratio' and whose range is the spread from one sampling seed to another)."""
    n = samples[0].shape[0]
    vals = []
    for i, s in enumerate(samples):
        g = torch.Generator().manual_seed(seed + 5000 + i)
        vals.append(sliced_w1(s, sample_true(n, g), n_proj, torch.Generator().manual_seed(100 + i)))
    floor = true_floor(sample_true, n, draws, seed, n_proj)
    swd = sum(vals) / len(vals)
    return {"swd": swd, "floor": floor, "ratio": swd / floor, "seed_ratios": [v / floor for v in vals]}


def mmd_rbf(a: Tensor, b: Tensor, bandwidths: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased squared MMD with a sum of RBF kernels exp(-|x-y|^2 / (2 h^2)) over bandwidths h."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()

    def k(x, y):
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = a.shape[0], b.shape[0]
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - kaa.diag().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diag().sum()) / (m * (m - 1))
                 - 2 * kab.mean())
