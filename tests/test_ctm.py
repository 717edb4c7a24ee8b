"""CTM against the exact flow map of a Gaussian mixture (docs/method.md sections 2-4: exact oracles first)."""

import pytest
import torch

from ctmkit import flow_map, gamma_sample, karras_sigmas, sample_schedule, solve_pf_ode
from ctmkit.core.losses import ctm_pair, l2
from ctmkit.core.schedules import sample_ctm_indices, sample_k
from ctmkit.metrics import swd_ratio

from .conftest import ring_mixture


def exact_G(gmm, steps=96):
    """The true CTM jump G*(x, t, s): a fine Heun solve of the PF-ODE with the exact denoiser."""
    return lambda x, t, s, labels=None: flow_map(gmm, x.double(), t, s, steps).to(x.dtype)


def test_ctm_loss_vanishes_for_the_exact_flow_map(ring):
    N, gen = 80, torch.Generator().manual_seed(0)
    grid = karras_sigmas(N)
    G = exact_G(ring)
    G_wrong = exact_G(ring_mixture(std=0.1))
    x0 = ring.sample(256, gen).double()
    losses, wrong = [], []
    for _ in range(3):
        k = sample_k(N - 1, gen)
        n, u, m = sample_ctm_indices(256, N, k, gen)
        t, tu, s = grid[n], grid[u], grid[m]
        x_t = x0 + t[:, None] * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        x_u = solve_pf_ode(ring, x_t, grid[n[None] + torch.arange(k + 1)[:, None]], "heun")
        est, tgt = ctm_pair(G, G, x_t, x_u, t, tu, s, torch.full_like(t, 0.002))
        losses.append(l2(est, tgt).mean().item())
        # the flow map of a slightly different mixture (component std 0.1 instead of 0.08) scores far worse
        e2, t2 = ctm_pair(G_wrong, G, x_t, x_u, t, tu, s, torch.full_like(t, 0.002))
        wrong.append(l2(e2, t2).mean().item())
    assert max(losses) < 1e-5, losses
    assert min(wrong) > 100 * max(losses), (losses, wrong)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("nfe", [1, 4])
def test_gamma_sampling_with_exact_flow_map_reproduces_mixture(ring, gamma, nfe):
    G = exact_G(ring, steps=64)
    samples = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        samples.append(gamma_sample(G, torch.randn(1500, 2, generator=g, dtype=torch.float64), sample_schedule(nfe),
                                    gamma, generator=g).float())
    r = swd_ratio(samples, lambda n, g: ring.sample(n, g))
    assert r["ratio"] < 1.5, r


def test_gamma_sampling_same_seed_same_sample_whatever_the_batch(ring):
    from ctmkit.core.sampling import per_sample_normal
    G = exact_G(ring, steps=8)
    big = per_sample_normal(10, (4, 2), seed=3)
    small = per_sample_normal(4, (4, 2), seed=3)
    assert torch.equal(big[:4], small)
    a = gamma_sample(G, big[:, 0], sample_schedule(4), 0.5, step_noise=big[:, 1:])
    b = gamma_sample(G, small[:, 0], sample_schedule(4), 0.5, step_noise=small[:, 1:])
    assert torch.allclose(a[:4], b, atol=1e-6)


def test_gamma_one_is_consistency_multistep_and_zero_is_deterministic(ring):
    G = exact_G(ring, steps=16)
    z = torch.randn(64, 2, dtype=torch.float64)
    a = gamma_sample(G, z, sample_schedule(3), 0.0, generator=torch.Generator().manual_seed(0))
    b = gamma_sample(G, z, sample_schedule(3), 0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # gamma 0 draws no noise
    c = gamma_sample(G, z, sample_schedule(3), 1.0, generator=torch.Generator().manual_seed(0))
    d = gamma_sample(G, z, sample_schedule(3), 1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(c, d)
    with pytest.raises(ValueError, match="gamma"):
        gamma_sample(G, z, sample_schedule(3), 1.5)
