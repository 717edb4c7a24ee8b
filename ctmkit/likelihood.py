"""PF-ODE log-likelihood (CTM_SPEC section 5; Song et al. 2021, appendix D.2).

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

from .errors import UserError


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


def log_likelihood(denoiser: Callable, x: Tensor, labels: Tensor | None = None, sigma_min: float = 0.002,
                   sigma_max: float = 80.0, exact: bool | None = None, n_probes: int = 1, rtol: float = 1e-5,
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

    def drift(xt: Tensor, t: float) -> Tensor:
        sig = torch.full((b,), t, dtype=xt.dtype, device=xt.device)
        return (xt - denoiser(xt, sig, labels)) / t

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y[: b * d]).reshape(shape).to(x)
        fx, div = _divergence(lambda v: drift(v, t), xt, probes)
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


def data_nll(model, data, n: int = 256, batch_size: int = 256, rtol: float = 1e-5, atol: float = 1e-5,
             exact: bool | None = None, seed: int = 0) -> dict:
    """NLL of the first n items of a Dataset under a loaded model (CTM: its denoiser g(x, t, t)), in the data's own
    units: nats/dim for continuous data; bits/dim with uniform dequantisation for 8-bit images.

    A class-conditional model is given each item's label: the figure is then log p(x | y) (reported as
    "conditional": true), which is below the unconditional log p(x) by at most log(num_classes) per sample."""
    from tqdm.auto import tqdm
    info, norm = model.info, data.normalizer
    denoiser = model.denoise if info["kind"] == "ctm" else model
    x = data.x[:n]
    d = x[0].numel()
    conditional = info["backbone"]["kwargs"].get("num_classes", 0) > 0 if "backbone" in info else False
    if conditional and data.labels is None:
        raise UserError(f"the model is class-conditional but '{data.spec}' has no labels")
    labels = data.labels[:n] if conditional else None
    g = torch.Generator().manual_seed(seed)
    uint8 = norm.kind == "image" and norm.dtype == "uint8"
    if uint8:  # dequantise: y = k + u, u ~ U[0, 1), mapped to model space with the same affine map
        levels = ((x.double() + 1) / 2 * (norm.hi - norm.lo) + norm.lo).round()     # the integer pixel values
        x = ((levels + torch.rand(levels.shape, generator=g, dtype=torch.float64) - norm.lo) / (norm.hi - norm.lo) * 2
             - 1).float()
    # log p_data(y) = log p_model(x) + D log |dx/dy|
    log_jac = d * (math.log(norm.scale) if norm.kind == "vector" else math.log(2 / (norm.hi - norm.lo)))
    lls = []
    for i in tqdm(range(0, x.shape[0], batch_size), desc="likelihood", leave=False):
        lab = None if labels is None else labels[i:i + batch_size]
        lls.append(log_likelihood(denoiser, x[i:i + batch_size], lab, info["sigma_min"], info["sigma_max"], exact,
                                  rtol=rtol, atol=atol, generator=g))
    ll = torch.cat(lls) + log_jac
    out = {"n": int(x.shape[0]), "dim": d, "nats_per_dim": float(-ll.mean() / d),
           "nats_per_sample": float(-ll.mean()), "nats_per_sample_std": float(ll.std()) if len(ll) > 1 else 0.0,
           "conditional": conditional, "divergence": "exact" if (d <= 16 if exact is None else exact) else "hutchinson"}
    if uint8:
        out["bits_per_dim"] = out["nats_per_dim"] / math.log(2)
    return out
