"""Probability-flow ODE solvers (docs/method.md section 1; EDM Algorithm 1 without churn; k-diffusion conventions).

PF-ODE: dx/dt = (x - D(x, t)) / t. ``sigmas`` is a descending schedule, Tensor[n] (shared by the batch) or
Tensor[n, B] (one schedule per sample, e.g. a Karras grid between per-sample t and s). A final 0 is allowed:
that step is Euler (EDM Algorithm 1). Works with any denoiser of the protocol ``D(x, sigma, labels)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .precond import bcast
from .schedules import karras_between

Denoiser = Callable[..., Tensor]


def _level(sigmas: Tensor, i: int, x: Tensor) -> Tensor:
    """sigma_i as Tensor[B] (float64), from a shared [n] or per-sample [n, B] schedule."""
    s = sigmas[i].to(x.device, torch.float64)
    return s.expand(x.shape[0]) if s.ndim == 0 else s


def pf_ode_drift(denoiser: Denoiser, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
    """PF-ODE drift dx/dt = (x - D(x, t)) / t (EDM eq. 1 with sigma(t) = t and the score of eq. 3); t Tensor[B]."""
    return (x - denoiser(x, t.to(x.dtype) if x.dtype != torch.float64 else t, labels)) / bcast(t, x).to(x.dtype)


def euler_step(denoiser: Denoiser, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None) -> Tensor:
    """One Euler step t -> s: x + (s - t) d(x, t)."""
    return x + bcast(s - t, x).to(x.dtype) * pf_ode_drift(denoiser, x, t, labels)


def heun_step(denoiser: Denoiser, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None) -> Tensor:
    """One Heun (2nd-order) step t -> s, EDM Algorithm 1 lines 5-8; falls back to Euler where s == 0."""
    h = bcast(s - t, x).to(x.dtype)
    d = pf_ode_drift(denoiser, x, t, labels)
    x_euler = x + h * d
    if bool((s == 0).all()):
        return x_euler
    s_safe = torch.where(s > 0, s, t)  # avoid dividing by 0; those samples keep the Euler result
    d2 = pf_ode_drift(denoiser, x_euler, s_safe, labels)
    x_heun = x + h * (d + d2) / 2
    return torch.where(bcast(s > 0, x), x_heun, x_euler)


def solve_pf_ode(denoiser: Denoiser, x: Tensor, sigmas: Tensor, method: str = "heun",
                 labels: Tensor | None = None, progress: Callable | None = None) -> Tensor:
    """Integrate the PF-ODE from sigmas[0] to sigmas[-1]: x [B, ...] at sigmas[0] -> x at sigmas[-1]."""
    if method not in ("heun", "euler"):
        raise ValueError(f"method must be 'heun' or 'euler', got {method!r}")
    step = heun_step if method == "heun" else euler_step
    steps = range(len(sigmas) - 1)
    for i in progress(steps) if progress else steps:
        x = step(denoiser, x, _level(sigmas, i, x), _level(sigmas, i + 1, x), labels)
    return x


def solve_grid_segments(denoiser: Denoiser, x: Tensor, grid: Tensor, start: Tensor, steps: Tensor,
                        labels: Tensor | None = None, method: str = "heun") -> Tensor:
    """Per-sample solves along one shared descending grid: sample j goes from grid[start_j] to grid[start_j + steps_j]
    in steps_j steps. Each step runs only on the samples still moving, so the cost is sum_j steps_j evaluations
    (x2 for Heun), not batch x max_j steps_j. x [B, ...]; start, steps LongTensor[B]."""
    step = heun_step if method == "heun" else euler_step
    start, steps = start.cpu(), steps.cpu()
    for i in range(int(steps.max()) if len(steps) else 0):
        moving = steps > i
        t = grid[(start + i).clamp(max=len(grid) - 1)].to(x.device, torch.float64)
        s = grid[(start + i + 1).clamp(max=len(grid) - 1)].to(x.device, torch.float64)
        if bool(moving.all()):
            x = step(denoiser, x, t, s, labels)
            continue
        idx = moving.nonzero().squeeze(1).to(x.device)
        x = x.index_copy(0, idx, step(denoiser, x[idx], t[idx], s[idx], None if labels is None else labels[idx]))
    return x


def flow_map(denoiser: Denoiser, x: Tensor, t: Tensor | float, s: Tensor | float, steps: int = 64,
             labels: Tensor | None = None) -> Tensor:
    """The PF-ODE flow map x_t -> x_s by a Heun solve on a per-sample Karras grid (the CTM target G*(x, t, s)).

    With an exact denoiser and a fine grid this is the ground truth a CTM is compared to. Samples with
    s == t are returned unchanged."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
    s = torch.as_tensor(s, dtype=torch.float64, device=x.device).expand(x.shape[0])
    return solve_pf_ode(denoiser, x, karras_between(t, s, steps), "heun", labels)
