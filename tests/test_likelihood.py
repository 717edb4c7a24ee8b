"""PF-ODE likelihood against the exact mixture density."""

import torch

from ctmkit import GaussianMixture, log_likelihood


def test_exact_denoiser_nll_matches_log_prob(ring):
    g = torch.Generator().manual_seed(0)
    x = ring.sample(64, g).double() + 0.002 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    ll = log_likelihood(ring, x, rtol=1e-6, atol=1e-6)
    exact = ring.log_prob(x, sigma=0.002)
    assert (ll - exact).abs().mean() < 0.01, (ll - exact).abs().mean()


def test_hutchinson_is_unbiased_in_higher_dimension():
    g = torch.Generator().manual_seed(1)
    gmm = GaussianMixture(torch.randn(3, 20, generator=g, dtype=torch.float64), [0.5, 0.8, 0.6], [1, 1, 2])
    x = gmm.sample(32, g).double()
    prior = lambda x_T: gmm.log_prob(x_T, sigma=80.0)  # noqa: E731  exact p_T isolates the ODE integration
    exact_div = log_likelihood(gmm, x, exact=True, rtol=1e-5, atol=1e-5, prior=prior)
    hutch = log_likelihood(gmm, x, exact=False, n_probes=4, rtol=1e-5, atol=1e-5, generator=g, prior=prior)
    assert (exact_div - gmm.log_prob(x, sigma=0.002)).abs().mean() < 0.02
    # Hutchinson is unbiased: the batch-mean error is small even though single samples are noisy
    assert (hutch - exact_div).mean().abs() < 0.5
