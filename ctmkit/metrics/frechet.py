"""Frechet distances between Gaussian fits of features (Heusel et al. 2017), in any feature space.

`frechet_distance` is the formula; `ClassifierFeatures` is a small CNN trained on a labelled image set whose
penultimate layer gives a domain-specific feature space (for digits / MNIST). A Frechet distance in those
features is NOT FID: it is comparable only between runs on the same data with the same feature network."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from ..progress import progress_bar


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64 throughout (S1, S2 symmetric PSD [F, F]).

    tr (S1 S2)^(1/2) is computed as sum sqrt(eig(R S2 R)), R = S1^(1/2): S1 S2 is similar to the symmetric PSD
    R S2 R, so two symmetric eigendecompositions replace the general sqrtm of the reference code (same value,
    about 4x faster at F = 2048, and stable for the singular covariances of fewer than F samples)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    if not (np.isfinite(s1).all() and np.isfinite(s2).all() and np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        return float("nan")
    w, v = scipy.linalg.eigh(s1)
    r = (v * np.sqrt(_nonneg(w))) @ v.T  # S1^(1/2)
    m = r @ s2 @ r
    tr_covmean = np.sqrt(_nonneg(scipy.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _nonneg(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off zeroed (below max * size * eps, the usual rank tolerance): the
    square root would turn each round-off ~1e-16 into ~1e-8, which adds up over the null space of a singular
    covariance (fewer samples than features)."""
    tol = max(float(w.max(initial=0.0)), 0.0) * w.size * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def feature_stats(feats: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and covariance [F, F] (float64) of features [N, F]."""
    f = feats.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def streamed_stats(batches) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and covariance [F, F] (float64, divisor N - 1) of features given batch by batch ([n_i, F] each), from
    their running sum and sum of outer products (as EDM's fid.py): memory is F^2, whatever N."""
    n, total, outer = 0, None, None
    for f in batches:
        f = f.double().cpu().numpy()
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = f.T @ f if outer is None else outer + f.T @ f
        n += f.shape[0]
    if n < 2:
        raise ValueError(f"feature statistics need at least 2 items, got {n}")
    mu = total / n
    return mu, (outer - n * np.outer(mu, mu)) / (n - 1)


class ClassifierFeatures(nn.Module):
    """Small CNN for [N, C, H, W] images in [-1, 1]: features() -> [N, 64] (penultimate), forward() -> logits."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 64), nn.SiLU())
        self.head = nn.Linear(64, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def train_classifier(x, labels: Tensor, num_classes: int, steps: int = 1500, batch: int = 128,
                     seed: int = 0, progress: bool = False) -> ClassifierFeatures:
    """Fit ClassifierFeatures on model-space images with labels (Adam 1e-3, small random shifts). `x`: a tensor
    [N, C, H, W] or anything whose x[indices] gives one (a ctmkit Dataset: only the batches are read)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ClassifierFeatures(x[torch.zeros(1, dtype=torch.long)].shape[1], num_classes)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in progress_bar(range(steps), desc="feature classifier", enabled=progress, transient=True):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = x[idx]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        xb = torch.roll(xb, (dx, dy), (2, 3))
        loss = nn.functional.cross_entropy(net(xb), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(net: ClassifierFeatures, x, labels: Tensor, batch: int = 1024) -> float:
    """Accuracy on every item of `x` (a tensor or a Dataset), `batch` items at a time."""
    right = 0
    for i in range(0, len(x), batch):
        idx = torch.arange(i, min(i + batch, len(x)))
        right += int((net(x[idx]).argmax(1) == labels[idx]).sum())
    return right / len(x)
