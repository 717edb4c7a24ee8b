"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3):
power-function EMA profiles, and the least-squares reconstruction of any profile from snapshots of others.

A power-function EMA with exponent gamma > -1, read at step t, averages the weights theta_tau of the steps tau <= t
with the density
    w(tau; t, gamma) = (gamma + 1) tau^gamma / t^(gamma + 1),    0 <= tau <= t        (it integrates to 1),
which the in-place update  theta_hat <- beta_t theta_hat + (1 - beta_t) theta_t,  beta_t = (1 - 1/t)^(gamma + 1)
tracks (steps counted from 1). Its width relative to t is
    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))                          (the paper's eq. 3),
the standard deviation of tau / t under w. An EMA of any other width at any step follows from snapshots of such
profiles: find the mix sum_i x_i w(.; t_i, gamma_i) closest in L2 to the wanted w(.; t, gamma), and mix the
snapshots' weights with the same x (the paper's Algorithm 1 / Appendix C.3, here with the integrals in closed form).
"""

from __future__ import annotations

import math

import numpy as np


def power_beta(t: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1): the rate of the power-function EMA's update at step t >= 1."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


# sigma_rel is largest where d ln sigma_rel / d gamma = 1/(gamma+1) - 2/(gamma+2) - 1/(gamma+3) = 0, i.e.
# gamma^2 + 3 gamma + 1 = 0: wider profiles do not exist, and each narrower width has a second, front-loaded gamma in
# (-1, GAMMA_PEAK) that nobody wants; the inverse takes the branch gamma >= GAMMA_PEAK.
GAMMA_PEAK = (math.sqrt(5.0) - 3.0) / 2.0
SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_PEAK)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The gamma of eq. 3 for a width: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (eq. 3 with its denominator cleared)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.3f}), got {sigma_rel}")
    q = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - q, 12.0 - q])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def _overlap(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<w(.; t_a, g_a), w(.; t_b, g_b)> in L2, all pairs: (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) /
    ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)) with m = min(t_a, t_b)."""
    ta, ga, tb, gb = t_a[:, None], g_a[:, None], t_b[None, :], g_b[None, :]
    m = np.minimum(ta, tb)
    return (ga + 1) * (gb + 1) * m ** (ga + gb + 1) / ((ga + gb + 1) * ta ** (ga + 1) * tb ** (gb + 1))


def phema_coefficients(steps, gammas, step: float, gamma: float) -> np.ndarray:
    """x [S]: the snapshots (taken at `steps` [S] with exponents `gammas` [S]) mixed as sum_i x_i theta_i give the
    power-function EMA of exponent `gamma` at `step` (least squares over the profiles; exact where the wanted
    profile is one of the snapshots'). Times are divided by the largest one first: the integrals are unchanged
    up to one common factor and the powers stay within float64."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    if t.ndim != 1 or t.shape != g.shape or len(t) == 0:
        raise ValueError("steps and gammas must be 1-D of the same nonzero length")
    if step > t.max() or step <= 0 or (t <= 0).any() or (g <= -1).any() or gamma <= -1:
        raise ValueError("need 0 < step <= the last snapshot's step, snapshot steps > 0 and exponents > -1")
    scale = t.max()
    t, ts = t / scale, np.array([step / scale])
    A = _overlap(t, g, t, g)
    b = _overlap(t, g, ts, np.array([float(gamma)]))[:, 0]
    return np.linalg.lstsq(A, b, rcond=None)[0]
