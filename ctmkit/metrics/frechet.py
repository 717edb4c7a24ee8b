"""Frechet distances between Gaussian fits of features (Heusel et al. 2017), in any feature space.

`frechet_distance` is the formula; `ClassifierFeatures` is a small CNN trained on a labelled image set whose
penultimate layer gives a domain-specific feature space (for digits / MNIST). A Frechet distance in those
features is NOT FID: it is comparable only between runs on the same data with the same feature network."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64 throughout."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularise (as the reference FID code does)
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feature_stats(feats: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and covariance [F, F] (float64) of features [N, F]."""
    f = feats.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


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


def train_classifier(x: Tensor, labels: Tensor, num_classes: int, steps: int = 1500, batch: int = 128,
                     seed: int = 0, progress: bool = False) -> ClassifierFeatures:
    """Fit ClassifierFeatures on model-space images with labels (Adam 1e-3, small random shifts)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ClassifierFeatures(x.shape[1], num_classes)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in tqdm(range(steps), desc="feature classifier", disable=not progress, leave=False):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb = x[idx]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        xb = torch.roll(xb, (dx, dy), (2, 3))
        loss = nn.functional.cross_entropy(net(xb), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(net: ClassifierFeatures, x: Tensor, labels: Tensor) -> float:
    return float((net(x).argmax(1) == labels).float().mean())
