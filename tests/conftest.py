import math
import os
import shutil
import tempfile

import pytest
import torch

from ctmkit import GaussianMixture

_CACHE = tempfile.mkdtemp(prefix="ctmkit-test-cache-")


def pytest_configure(config):
    # The suite never reads or writes the user's ~/.cache/ctmkit: statistics cached there by another run (another
    # torch, another ATEN_CPU_CAPABILITY) differ in their last bits and would leak into tests that compare a cached
    # value with a fresh one. Set here, before the test modules build their subprocess environments.
    os.environ["CTMKIT_CACHE"] = _CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


def ring_mixture(k: int = 8, radius: float = 1.0, std: float = 0.08) -> GaussianMixture:
    """K isotropic Gaussians on a circle, equal weights (model-space scale: overall std about 0.7)."""
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return GaussianMixture(torch.stack([ang.cos(), ang.sin()], 1) * radius, torch.full((k,), std), torch.ones(k))


@pytest.fixture
def ring():
    return ring_mixture()


@pytest.fixture
def gmm10():
    g = torch.Generator().manual_seed(3)
    return GaussianMixture(torch.randn(4, 10, generator=g, dtype=torch.float64), [0.3, 0.5, 0.2, 0.4], [1, 2, 3, 1])
