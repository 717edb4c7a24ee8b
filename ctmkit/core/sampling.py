"""Samplers (docs/method.md section 4): gamma-sampling with a CTM jump G, and EDM Heun sampling with any denoiser.

gamma-sampling uses the reference implementation's sigma_min-offset form (so that s never reaches 0):
    s_tilde = sqrt(1 - gamma^2) (t_{n+1} - sigma_min) + sigma_min
    x <- G(x, t_n, s_tilde);  x <- x + sqrt(t_{n+1}^2 - s_tilde^2) z_n   (no noise after the last jump)
gamma = 0: deterministic jumps along the ODE; gamma = 1: the consistency-model multistep sampler.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .schedules import SIGMA_MAX, SIGMA_MIN, heun_schedule, sample_schedule
from .solvers import solve_pf_ode

__all__ = ["gamma_sample", "two_jump_sample", "heun_sample", "sample_schedule", "heun_schedule", "per_sample_normal"]


def gamma_sample(model: Callable, noise: Tensor, sigmas: Tensor, gamma: float = 0.0,
                 generator: torch.Generator | None = None, labels: Tensor | None = None,
                 step_noise: Tensor | None = None, sigma_min: float | None = None,
                 project: Callable[[Tensor, float, int], Tensor] | None = None) -> Tensor:
    """CTM gamma-sampling: noise [B, ...] standard normal, sigmas descending [K+1] ending at sigma_min -> x0 [B, ...].

    model(x, t, s, labels) is the jump G. Re-noising draws come from step_noise [B, K-1, ...] if given, else
    from `generator` (sample-major). NFE = K = len(sigmas) - 1.
    `project(x, level, n) -> x` (zero-shot editing, core/editing.py) is applied to the start (n = 0, level t_0) and
    after jump n (n = 1..K, level s~ of that jump, before its re-noising); None leaves the sampler as it was."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    k = len(sigmas) - 1
    if k < 1:
        raise ValueError("sigmas needs at least two levels (NFE >= 1)")
    s_min = float(sigmas[-1]) if sigma_min is None else sigma_min
    if gamma > 0 and k > 1 and step_noise is None:
        step_noise = torch.randn((noise.shape[0], k - 1, *noise.shape[1:]), generator=generator,
                                 dtype=noise.dtype).to(noise.device)
    x = noise * float(sigmas[0])
    if project is not None:
        x = project(x, float(sigmas[0]), 0)
    for n in range(k):
        t, t_next = float(sigmas[n]), float(sigmas[n + 1])
        s_tilde = math.sqrt(1 - gamma**2) * (t_next - s_min) + s_min
        x = model(x, _full(t, x), _full(s_tilde, x), labels)
        if project is not None:
            x = project(x, s_tilde, n + 1)
        if gamma > 0 and n < k - 1:
            x = x + math.sqrt(max(t_next**2 - s_tilde**2, 0.0)) * step_noise[:, n]
    return x


def two_jump_sample(model: Callable, noise: Tensor, grid: Tensor, i1: int, i2: int, labels: Tensor | None = None,
                    renoise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The reference implementation's two-jump sampler (NFE 2), times given as indices of the training grid
    grid = t_0 > ... > t_{N-1} (descending, t_{N-1} = sigma_min), i1 >= i2:
        x = G(t_0 z, t_0, t_{i1});  x <- x + sqrt(t_{i2}^2 - t_{i1}^2) z';  x = G(x, t_{i2}, t_{N-1}).
    It jumps below t_{i2} and re-noises up to it (i1 = i2: no re-noising, gamma-sampling NFE 2 through t_{i2}).
    z' is `renoise` [B, ...] if given, else drawn from `generator`."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    n = len(grid)
    if not 0 < i2 <= i1 < n - 1:
        raise ValueError(f"need 0 < i2 <= i1 < {n - 1} (grid indices), got i1={i1}, i2={i2}")
    t0, t1, t2, t_end = (float(grid[i]) for i in (0, i1, i2, n - 1))
    if renoise is None:
        renoise = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
    x = model(noise * t0, _full(t0, noise), _full(t1, noise), labels)
    x = x + math.sqrt(max(t2**2 - t1**2, 0.0)) * renoise
    return model(x, _full(t2, x), _full(t_end, x), labels)


def two_jump_as_gamma(grid: Tensor, i1: int, i2: int) -> tuple[Tensor, float]:
    """The two-jump sampler as gamma-sampling: times (t_0, t_{i2}, t_{N-1}) and the gamma whose jump target
    s~ = sqrt(1 - gamma^2) (t_{i2} - sigma_min) + sigma_min is t_{i1} (re-noising std sqrt(t_{i2}^2 - t_{i1}^2))."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    t0, t1, t2, t_min = (float(grid[i]) for i in (0, i1, i2, len(grid) - 1))
    gamma = math.sqrt(max(0.0, 1 - ((t1 - t_min) / (t2 - t_min)) ** 2))
    return torch.tensor([t0, t2, t_min], dtype=torch.float64), gamma


def heun_sample(denoiser: Callable, noise: Tensor, sigmas: Tensor | None = None, nfe: int = 35,
                labels: Tensor | None = None, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN) -> Tensor:
    """EDM Heun sampling (Algorithm 1, no churn): noise [B, ...] standard normal -> x0. Default schedule: the
    EDM grid for an `nfe` budget (18 steps = 35 NFE) ending with an Euler step to 0."""
    if sigmas is None:
        sigmas = heun_schedule(nfe, sigma_min, sigma_max)
    return solve_pf_ode(denoiser, noise * float(sigmas[0]), sigmas, "heun", labels)


def per_sample_normal(n: int, shape: tuple, seed: int, start: int = 0) -> Tensor:
    """Standard normal [n, *shape] where row i depends only on (seed, start + i): batch-size independent."""
    out = torch.empty((n, *shape))
    for i in range(n):
        g = torch.Generator().manual_seed((seed * 1_000_003 + start + i) % (2**63))
        out[i] = torch.randn(shape, generator=g)
    return out


def _full(v: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), v, device=x.device, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
