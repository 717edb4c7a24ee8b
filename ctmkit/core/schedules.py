"""Noise-level schedules (docs/method.md sections 1, 3): the Karras grid, CTM time triplets, DSM sigma sampling.

All functions are pure: randomness comes in through a ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def karras_interp(frac: Tensor, hi: Tensor | float, lo: Tensor | float, rho: float = RHO) -> Tensor:
    """Karras et al. (2022) eq. 5 at fractions frac in [0, 1] of the way from hi down to lo (rho spacing):
    (hi^(1/rho) + frac (lo^(1/rho) - hi^(1/rho)))^rho. The one place the Karras curve is computed."""
    return (hi ** (1 / rho) + frac * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """Karras et al. (2022) eq. 5 grid with n points, descending from sigma_max to sigma_min: Tensor[n] float64."""
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1, got {n}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    return karras_interp(i / (n - 1), sigma_max, sigma_min, rho)   # t_i, i = 0..N-1


def lognormal_sigmas(z: Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """EDM training noise levels ln(sigma) ~ N(p_mean, p_std^2) (EDM Table 1) from standard normal draws z."""
    return (p_mean + p_std * z).exp()


def sample_k(num_scales_m: int, generator: torch.Generator | None = None) -> int:
    """CTM step 1: k in {1..M} with P(k) proportional to k (one k per iteration)."""
    p = torch.arange(1, num_scales_m + 1, dtype=torch.float64)
    return int(torch.multinomial(p / p.sum(), 1, generator=generator).item()) + 1


def sample_ctm_indices(batch: int, n_grid: int, k: int, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """CTM step 2: grid indices (n, n+k, m) with n ~ U{0..N-1-k}, m ~ U{n+k..N-1}: three LongTensor[batch]."""
    if not 1 <= k <= n_grid - 1:
        raise ValueError(f"k must be in [1, {n_grid - 1}], got {k}")
    n = torch.randint(0, n_grid - k, (batch,), generator=generator)
    u = n + k
    m = u + (torch.rand(batch, generator=generator, dtype=torch.float64) * (n_grid - u)).long()
    return n, u, torch.minimum(m, torch.full_like(m, n_grid - 1))


def sample_uniform_pairs(batch: int, n_grid: int, max_k: int, all_the_way: bool = False,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample grid indices (n, u, m), three LongTensor[batch]: (n, m) uniform over all N(N-1)/2 pairs n < m, then
    k = u - n ~ U{1..min(m - n, max_k)} per sample, or u = m when `all_the_way` (the teacher solves to s)."""
    if n_grid < 2 or max_k < 1:
        raise ValueError(f"need n_grid >= 2 and max_k >= 1, got {n_grid}, {max_k}")
    pairs = torch.triu_indices(n_grid, n_grid, offset=1)                # [2, P]: every n < m
    pick = torch.randint(0, pairs.shape[1], (batch,), generator=generator)
    n, m = pairs[0, pick], pairs[1, pick]
    if all_the_way:
        return n, m, m
    k_max = torch.clamp(m - n, max=max_k)
    k = 1 + (torch.rand(batch, generator=generator, dtype=torch.float64) * k_max).long().clamp(max=k_max - 1)
    return n, n + k, m



def sample_mixed_pairs(batch: int, n_grid: int, k: int, max_k: int, frac: float,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ctm.pairs=mixed: floor(frac * batch) samples drawn all the way (uniform pairs, u = s), spread evenly over the
    batch (sample i iff floor((i + 1) frac) > floor(i frac): every rank's and micro-batch's slice gets its share),
    the others by the reference draw with this iteration's k. Three LongTensor[batch]."""
    i = torch.arange(batch, dtype=torch.float64)
    far = torch.floor((i + 1) * frac) > torch.floor(i * frac)
    na, ua, ma = sample_uniform_pairs(int(far.sum()), n_grid, max_k, True, generator)
    nr, ur, mr = sample_ctm_indices(batch - int(far.sum()), n_grid, k, generator)
    out = [torch.empty(batch, dtype=torch.long) for _ in range(3)]
    for o, a, r in zip(out, (na, ua, ma), (nr, ur, mr)):
        o[far], o[~far] = a, r
    return out[0], out[1], out[2]

def sample_dsm_sigmas(batch: int, p_mean: float = -1.2, p_std: float = 1.2, sigma_min: float = SIGMA_MIN,
                      sigma_max: float = SIGMA_MAX, rho: float = RHO, karras_frac: float = 0.5,
                      upper: float = 0.7, generator: torch.Generator | None = None) -> Tensor:
    """CTM step 6 sigmas, Tensor[batch] float64: a karras_frac share uniform on the Karras curve over its upper
    (noisier) `upper` fraction, the rest log-normal(p_mean, p_std) (EDM). karras_frac=0 gives plain EDM."""
    n_k = int(round(batch * karras_frac))
    z = torch.randn(batch - n_k, generator=generator, dtype=torch.float64)
    lognormal = lognormal_sigmas(z, p_mean, p_std)
    r = torch.rand(n_k, generator=generator, dtype=torch.float64) * upper  # position along the curve from the top
    karras = karras_interp(r, sigma_max, sigma_min, rho)
    return torch.cat([karras, lognormal])


def karras_between(t: Tensor, s: Tensor, n: int, rho: float = RHO) -> Tensor:
    """Per-sample Karras grids from t [B] down to s [B] in n steps: Tensor[n+1, B] float64 (rho spacing)."""
    t, s = t.double(), s.double()
    i = torch.linspace(0, 1, n + 1, dtype=torch.float64, device=t.device)[:, None]
    return karras_interp(i, t[None], s[None], rho)


def sample_schedule(nfe: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """Default gamma-sampling schedule (docs/method.md section 4): Karras grid, nfe+1 points, sigma_max -> sigma_min.

    NFE1 is 80 -> 0.002 and NFE2 is 80 -> 2.5152 -> 0.002, as in the reference implementation."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return karras_sigmas(nfe + 1, sigma_min, sigma_max, rho)


def heun_schedule(nfe: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """EDM Heun schedule for a budget of nfe evaluations: n steps use 2n-1 NFE (last step Euler to 0).

    Returns the Karras grid of n = (nfe+1)//2 points plus a final 0 (EDM Algorithm 1; 18 steps = 35 NFE)."""
    steps = max(1, (nfe + 1) // 2)
    return torch.cat([karras_sigmas(steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])


LR_SCHEDULES = ("constant", "cosine", "inv_sqrt")


def lr_factor(step: int, steps: int, warmup: int = 0, schedule: str = "constant", final: float = 0.0,
              ref_steps: int = 1000) -> float:
    """The learning rate of step `step` (0-based) of `steps` as a fraction of the base rate: a linear warm-up
    min(1, (step + 1) / warmup), times the schedule after it:
      constant: 1;
      cosine:   final + (1 - final) (1 + cos(pi p)) / 2, p = (step - warmup) / (steps - warmup) in [0, 1];
      inv_sqrt: 1 / sqrt(max(step / ref_steps, 1))  (EDM2's decay, Karras et al. 2024, counted in steps).
    A pure function of the step: a resumed run continues the same curve."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "constant":
        return warm
    if schedule == "cosine":
        p = min(1.0, max(0.0, (step - warmup) / max(1, steps - warmup)))
        return warm * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p)))
    if schedule == "inv_sqrt":
        return warm / math.sqrt(max(step / ref_steps, 1.0))
    raise ValueError(f"unknown learning-rate schedule '{schedule}' (one of {', '.join(LR_SCHEDULES)})")
