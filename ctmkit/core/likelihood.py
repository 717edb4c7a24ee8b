"""PF-ODE log-likelihood (docs/method.md section 5; Song et al. 2021, appendix D.2).

Along the probability-flow ODE dx/dt = f(x, t) = (x - D(x, t)) / t the log-density obeys
d log p_t(x_t) / dt = -div f(x_t, t), so integrating from t = sigma_min up to sigma_max,
    log p_{sigma_min}(x) = log N(x_T; 0, sigma_max^2 I) + int_{sigma_min}^{sigma_max} div f(x_t, t) dt.
The divergence is exact (D autograd passes) in low dimension, else Hutchinson with Rademacher probes.
The ODE is solved by scipy's adaptive RK45 (rtol/atol options) on the whole batch at once.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .schedules import SIGMA_MAX, SIGMA_MIN
from .solvers import pf_ode_drift


def _divergence(f: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor | None) -> tuple[Tensor, Tensor]:
    """f(x) and its divergence per sample: exact (probes None) or Hutchinson E[eps^T J eps]."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        fx = f(x)
        flat_x, flat_f = x, fx.reshape(x.shape[0], -1)
        if probes is None:
            div = sum(torch.autograd.grad(flat_f[:, i].sum(), flat_x, retain_graph=True)[0]
                      .reshape(x.shape[0], -1)[:, i] for i in range(flat_f.shape[1]))
        else:
            div = 0
            for eps in probes:
                g = torch.autograd.grad((fx * eps).sum(), flat_x, retain_graph=True)[0]
                div = div + (g * eps).reshape(x.shape[0], -1).sum(1)
            div = div / len(probes)
    return fx.detach(), div.detach()


def log_likelihood(denoiser: Callable, x: Tensor, labels: Tensor | None = None, sigma_min: float = SIGMA_MIN,
                   sigma_max: float = SIGMA_MAX, exact: bool | None = None, n_probes: int = 1, rtol: float = 1e-5,
                   atol: float = 1e-5, generator: torch.Generator | None = None,
                   prior: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """log p(x) in nats per sample, Tensor[B] (float64), for x [B, ...] treated as a draw at sigma_min.

    exact=None picks the exact divergence for dimension <= 16, Hutchinson (n_probes Rademacher vectors, fixed
    along the solve) otherwise."""
    from scipy.integrate import solve_ivp
    shape, b = x.shape, x.shape[0]
    d = x[0].numel()
    exact = d <= 16 if exact is None else exact
    probes = None if exact else (torch.randint(0, 2, (n_probes, *shape), generator=generator) * 2 - 1).to(x)

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y[: b * d]).reshape(shape).to(x)
        sig = torch.full((b,), t, dtype=xt.dtype, device=xt.device)
        fx, div = _divergence(lambda v: pf_ode_drift(denoiser, v, sig, labels), xt, probes)
        return np.concatenate([fx.reshape(-1).double().cpu().numpy(), div.double().cpu().numpy()])

    y0 = np.concatenate([x.detach().reshape(-1).double().cpu().numpy(), np.zeros(b)])
    sol = solve_ivp(rhs, (sigma_min, sigma_max), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"likelihood ODE solve failed: {sol.message}")
    y = torch.from_numpy(sol.y[:, -1])
    x_t, integral = y[: b * d].reshape(b, d), y[b * d:]
    if prior is None:
        log_p_T = -0.5 * (x_t**2).sum(1) / sigma_max**2 - 0.5 * d * math.log(2 * math.pi * sigma_max**2)
    else:
        log_p_T = prior(x_t).double()
    return log_p_T + integral
