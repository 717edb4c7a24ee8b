"""Post-hoc EMA (core/phema.py) held against exact arithmetic: the width of the discrete power-function update, and
EMAs of other widths reconstructed from snapshots against the same EMAs tracked step by step."""

from __future__ import annotations

import numpy as np
import pytest

from ctmkit.core.phema import (
    SIGMA_REL_MAX,
    gamma_to_sigma_rel,
    phema_coefficients,
    power_beta,
    sigma_rel_to_gamma,
)


def test_sigma_rel_and_gamma_invert_each_other_with_the_papers_values():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)    # the paper's two training profiles
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.005, 0.03, 0.1, 0.2, 0.29):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.5):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_the_discrete_update_averages_with_the_width_of_eq3(sigma_rel):
    """Unrolled, theta_hat_T = sum_tau w_tau theta_tau with w_tau = (1 - beta_tau) prod_{k > tau} beta_k; the standard
    deviation of tau / T under w is sigma_rel (the continuous profile's), up to the discretisation."""
    g, T = sigma_rel_to_gamma(sigma_rel), 20000
    beta = np.array([power_beta(t, g) for t in range(1, T + 1)])
    w = (1 - beta) * np.append(np.cumprod(beta[::-1])[::-1][1:], 1.0)
    tau = np.arange(1, T + 1) / T
    mean = (w * tau).sum()
    assert w.sum() == pytest.approx(1.0, abs=1e-12) and beta[0] == 0.0      # step 1 takes theta_1 whole
    assert np.sqrt((w * (tau - mean) ** 2).sum()) == pytest.approx(sigma_rel, rel=1e-6)   # measured: 4e-8


def _track(theta: np.ndarray, gammas: dict, every: int, keep: tuple) -> tuple[list, dict]:
    """Run power EMAs of `gammas` over the trajectory theta [T, D]; snapshots of 'a' and 'b' every `every` steps,
    and every EMA at the steps in `keep`."""
    ema = {k: np.zeros(theta.shape[1]) for k in gammas}
    snaps, kept = [], {}
    for t in range(1, len(theta) + 1):
        for k, g in gammas.items():
            b = power_beta(t, g)
            ema[k] = b * ema[k] + (1 - b) * theta[t - 1]
        if t % every == 0:
            snaps += [(t, gammas["a"], ema["a"].copy()), (t, gammas["b"], ema["b"].copy())]
        if t in keep:
            kept.update({(t, k): v.copy() for k, v in ema.items()})
    return snaps, kept


def test_an_ema_of_another_width_is_rebuilt_from_snapshots_of_two():
    rng = np.random.default_rng(0)
    T, D = 4000, 64                       # a drifting random walk: the EMAs of different widths differ clearly
    theta = np.cumsum(rng.normal(size=(T, D)), 0) * 0.01 + np.linspace(0, 1, T)[:, None] * rng.normal(size=D)
    widths = {"a": 0.05, "b": 0.10, "narrow": 0.03, "mid": 0.07, "wide": 0.15}
    gammas = {k: sigma_rel_to_gamma(s) for k, s in widths.items()}
    snaps, kept = _track(theta, gammas, every=200, keep=(3000, T))
    steps, gam, W = [s[0] for s in snaps], [s[1] for s in snaps], np.stack([s[2] for s in snaps])
    for t in (3000, T):
        for k in ("narrow", "mid", "wide"):
            want = kept[(t, k)]
            got = phema_coefficients(steps, gam, t, gammas[k]) @ W
            averaging = np.abs(want - theta[t - 1]).mean()        # how far the EMA itself moves from theta_t
            # the continuous profiles stand for the discrete updates and 40 snapshots span the wanted profile only
            # approximately: measured at most 1.8 % of the averaging distance (narrow, t = 3000); 5 % allowed. An
            # EMA of another listed width is 25 % to 100 % away, so a wrong gamma or time fails by far.
            assert np.abs(got - want).mean() < 0.05 * averaging, (t, k)
            others = [kept[(t, o)] for o in ("narrow", "mid", "wide") if o != k]
            assert all(np.abs(o - want).mean() > 0.2 * averaging for o in others)


def test_a_snapshots_own_profile_is_that_snapshot():
    steps, gammas = [100, 200, 300, 100, 200, 300], [16.97] * 3 + [6.94] * 3
    x = phema_coefficients(steps, gammas, 200, 6.94)
    assert np.allclose(x, np.eye(6)[4], atol=1e-6)
    with pytest.raises(ValueError, match="last snapshot"):
        phema_coefficients(steps, gammas, 301, 6.94)
