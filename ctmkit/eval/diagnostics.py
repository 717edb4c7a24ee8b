"""Diagnostics against exact ground truth: how far a CTM's jumps are from the exact PF-ODE flow map."""

from __future__ import annotations

import torch

from ..core.schedules import karras_sigmas
from ..core.solvers import flow_map


@torch.no_grad()
def flow_map_error(model, mixture, pairs: int = 1024, num_scales: int = 18, seed: int = 0) -> float:
    """Mean |G_theta(x_t, t, s) - G*(x_t, t, s)| over random pairs s < t of the Karras grid (the pairs CTM trains
    on), x_t on the true marginal at t, G* the exact flow map (fine Heun solve of the exact denoiser)."""
    g = torch.Generator().manual_seed(seed)
    grid = karras_sigmas(num_scales)
    i = torch.randint(0, num_scales - 1, (pairs,), generator=g)
    j = i + 1 + (torch.rand(pairs, generator=g, dtype=torch.float64) * (num_scales - 1 - i)).long()
    t, s = grid[i], grid[j]
    x_t = mixture.sample(pairs, g).double() + t[:, None] * torch.randn(pairs, mixture.dim, generator=g,
                                                                       dtype=torch.float64)
    exact = flow_map(mixture, x_t, t, s, steps=128)
    return float((model(x_t.float(), t.float(), s.float()).double() - exact).norm(dim=1).mean())
