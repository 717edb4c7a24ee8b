"""Sample-quality metrics: sliced Wasserstein and MMD for vectors; Frechet distances (features of any network),
FID and k-NN precision/recall (Inception-v3 features, the optional `fid` extra)."""

from .fid import fid, precision_recall
from .frechet import frechet_distance
from .swd import mmd_rbf, sliced_w1, swd_ratio, true_floor

__all__ = ["frechet_distance", "fid", "precision_recall", "sliced_w1", "mmd_rbf", "swd_ratio", "true_floor"]
