"""Zero-shot editing with a CTM (docs/method.md section 4, "Zero-shot editing"): inpainting, linear inverse problems
in an orthogonal basis (colourisation, super-resolution by block averages), SDEdit, inversion and interpolation.

Every sampler here is `gamma_sample` with its projection hook (no second copy of gamma-sampling). As in
core/sampling.py, the model, the tensors and the randomness are passed in; `edit_noise` draws them per sample, so a
result does not depend on the batch size. A teacher (a denoiser) edits through `heun_jump`: Heun steps stand in for
the jumps between the projections.

Conventions: samples are model-space tensors [B, ...] (vectors [B, D], images [B, C, H, W]); an orthogonal operator
A maps a sample to coefficients (`Orthogonal.fwd`) and back (`Orthogonal.inv` = A^T); `known` is a bool mask over the
coefficients (broadcastable), True where the observation fixes the coefficient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .sampling import gamma_sample, per_sample_normal
from .schedules import SIGMA_MAX, SIGMA_MIN, karras_sigmas
from .solvers import flow_map, solve_pf_ode

__all__ = ["Orthogonal", "IDENTITY", "LUMA", "colour_op", "block_op", "householder_basis", "luminance",
           "block_mean", "colour_observation", "block_observation", "observation_projection", "linear_inverse",
           "inpaint", "colorize", "superres", "sdedit", "inversion_schedule", "invert", "slerp", "interpolate",
           "heun_jump", "edit_noise"]

LUMA = (0.299, 0.587, 0.114)   # ITU-R BT.601 luminance weights; they sum to 1, so luminance commutes with [lo, hi]


@dataclass(frozen=True)
class Orthogonal:
    """An orthogonal operator A on samples: `fwd(x)` = A x (the coefficients), `inv(c)` = A^T c, A^T A = I."""

    fwd: Callable[[Tensor], Tensor]
    inv: Callable[[Tensor], Tensor]


IDENTITY = Orthogonal(lambda x: x, lambda c: c)


def householder_basis(u: Tensor) -> Tensor:
    """The symmetric orthogonal H = I - 2 v v^T / v^T v, v = e_1 - u, for a unit vector u [n]: H e_1 = u, so the
    first basis vector (row and column) is u and the other n - 1 are an orthonormal complement of it (float64)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    u = u / u.norm()
    v = -u.clone()
    v[0] += 1.0
    eye = torch.eye(len(u), dtype=torch.float64)
    vv = float(v @ v)
    return eye if vv < 1e-24 else eye - 2 * torch.outer(v, v) / vv


def colour_op() -> Orthogonal:
    """RGB [B, 3, H, W] <-> a decorrelated orthonormal colour basis whose first channel is luminance / |LUMA|."""
    q = householder_basis(torch.tensor(LUMA)).float()
    return Orthogonal(lambda x: torch.einsum("ij,bjhw->bihw", q.to(x), x),
                      lambda c: torch.einsum("ji,bjhw->bihw", q.to(c), c))


def block_op(factor: int) -> Orthogonal:
    """Images [B, C, H, W] <-> per-block coefficients [B, C, F*F, H/F, W/F] in an orthonormal basis of each F x F
    block whose first vector is uniform (1/F each): coefficient 0 is F times the block mean."""
    f = int(factor)
    h = householder_basis(torch.ones(f * f)).float()

    def fwd(x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        blocks = x.reshape(b, c, hh // f, f, ww // f, f).permute(0, 1, 3, 5, 2, 4).reshape(b, c, f * f, hh // f,
                                                                                              ww // f)
        return torch.einsum("ij,bcjhw->bcihw", h.to(x), blocks)

    def inv(co: Tensor) -> Tensor:
        b, c, _, hl, wl = co.shape
        blocks = torch.einsum("ji,bcjhw->bcihw", h.to(co), co).reshape(b, c, f, f, hl, wl)
        return blocks.permute(0, 1, 4, 2, 5, 3).reshape(b, c, hl * f, wl * f)

    return Orthogonal(fwd, inv)


def luminance(x: Tensor) -> Tensor:
    """RGB images [B, 3, H, W] -> luminance [B, 1, H, W] (LUMA weights)."""
    return torch.einsum("j,bjhw->bhw", torch.tensor(LUMA).to(x), x)[:, None]


def block_mean(x: Tensor, factor: int) -> Tensor:
    """Images [B, C, H, W] -> the means of their F x F blocks [B, C, H/F, W/F]."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // factor, factor, w // factor, factor).mean((3, 5))


def colour_observation(gray: Tensor) -> tuple[Tensor, Tensor]:
    """Luminance [B, 1, H, W] -> (coefficients [B, 3, H, W] of `colour_op`, known mask [1, 3, 1, 1])."""
    obs = torch.zeros(gray.shape[0], 3, *gray.shape[2:], dtype=gray.dtype, device=gray.device)
    obs[:, :1] = gray / math.sqrt(sum(w * w for w in LUMA))
    known = torch.tensor([True, False, False], device=gray.device).reshape(1, 3, 1, 1)
    return obs, known


def block_observation(low: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """Block means [B, C, h, w] -> (coefficients [B, C, F*F, h, w] of `block_op`, known mask [1, 1, F*F, 1, 1])."""
    b, c, h, w = low.shape
    obs = torch.zeros(b, c, factor * factor, h, w, dtype=low.dtype, device=low.device)
    obs[:, :, 0] = low * factor
    known = torch.zeros(1, 1, factor * factor, 1, 1, dtype=torch.bool, device=low.device)
    known[:, :, 0] = True
    return obs, known


def observation_projection(obs: Tensor, known: Tensor, op: Orthogonal, obs_noise: Tensor, k: int) -> Callable:
    """gamma_sample's hook for y = known coefficients `obs` of A: project(x, level, n) = A^T [known ? obs + level A e_n
    : A x], e_n = obs_noise[:, n] (standard normal, x's shape): the known coefficients become the observation noised
    to the level the sample is at (fresh noise per level), the others are the sample's. After the last jump (n = k)
    the level is taken as 0: the output's known coefficients are the observation itself."""
    known = known.bool()

    def project(x: Tensor, level: float, n: int) -> Tensor:
        target = obs if n >= k else obs + level * op.fwd(obs_noise[:, n])
        return op.inv(torch.where(known, target, op.fwd(x)))

    return project


def linear_inverse(model: Callable, noise: Tensor, sigmas: Tensor, obs: Tensor, known: Tensor,
                   op: Orthogonal = IDENTITY, gamma: float = 0.0, labels: Tensor | None = None,
                   step_noise: Tensor | None = None, obs_noise: Tensor | None = None,
                   generator: torch.Generator | None = None, sigma_min: float | None = None) -> Tensor:
    """Consistency models' Algorithm 4 on gamma-sampling: sample x given the coefficients A x = obs where `known`.
    noise [B, ...] and sigmas as for gamma_sample; obs_noise [B, K, ...] (one draw per level, x's shape) or drawn
    from `generator` after the re-noising draws. gamma = 1 is consistency models' algorithm."""
    k = len(sigmas) - 1
    if step_noise is None and gamma > 0 and k > 1:
        step_noise = torch.randn((noise.shape[0], k - 1, *noise.shape[1:]), generator=generator,
                                 dtype=noise.dtype).to(noise.device)
    if obs_noise is None:
        obs_noise = torch.randn((noise.shape[0], k, *noise.shape[1:]), generator=generator,
                                dtype=noise.dtype).to(noise.device)
    project = observation_projection(obs, known, op, obs_noise, k)
    return gamma_sample(model, noise, sigmas, gamma, labels=labels, step_noise=step_noise, sigma_min=sigma_min,
                        project=project)


def inpaint(model: Callable, noise: Tensor, sigmas: Tensor, y: Tensor, mask: Tensor, gamma: float = 0.0,
            **kw) -> Tensor:
    """Inpainting: x given x = y where mask (broadcastable to x; 1 = known). `linear_inverse` with A = I."""
    return linear_inverse(model, noise, sigmas, y, torch.as_tensor(mask, device=y.device).bool(), IDENTITY, gamma,
                          **kw)


def colorize(model: Callable, noise: Tensor, sigmas: Tensor, gray: Tensor, gamma: float = 0.0, **kw) -> Tensor:
    """Colourisation: RGB images [B, 3, H, W] whose luminance is `gray` [B, 1, H, W] (model space)."""
    obs, known = colour_observation(gray)
    return linear_inverse(model, noise, sigmas, obs, known, colour_op(), gamma, **kw)


def superres(model: Callable, noise: Tensor, sigmas: Tensor, low: Tensor, factor: int, gamma: float = 0.0,
             **kw) -> Tensor:
    """Super-resolution: images [B, C, F h, F w] whose F x F block means are `low` [B, C, h, w] (model space)."""
    obs, known = block_observation(low, factor)
    return linear_inverse(model, noise, sigmas, obs, known, block_op(factor), gamma, **kw)


def sdedit(model: Callable, guide: Tensor, noise: Tensor, sigmas: Tensor, gamma: float = 0.0, **kw) -> Tensor:
    """SDEdit: start at x_{t0} = guide + t0 noise (t0 = sigmas[0]) and gamma-sample down along `sigmas`."""
    return gamma_sample(model, noise, sigmas, gamma, project=lambda x, level, n: x + guide if n == 0 else x, **kw)


def inversion_schedule(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> Tensor:
    """The Karras grid of `steps` Heun steps, increasing from sigma_min to sigma_max: Tensor[steps + 1] float64."""
    return karras_sigmas(steps + 1, sigma_min, sigma_max).flip(0)


def invert(denoiser: Callable, x: Tensor, sigmas: Tensor, labels: Tensor | None = None) -> Tensor:
    """Data -> noise: the PF-ODE from sigmas[0] (the data, read as a sample at that level) up to sigmas[-1] by Heun
    on the increasing schedule `sigmas`, divided by sigmas[-1]: the standard-normal `noise` gamma_sample starts from."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if len(sigmas) < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError("invert needs an increasing schedule of at least two levels")
    return solve_pf_ode(denoiser, x, sigmas, "heun", labels) / float(sigmas[-1])


def slerp(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    """Spherical interpolation between noises a, b [B, ...] at fractions lam [L]: [B, L, ...] (lam 0 = a, 1 = b;
    linear where a and b are parallel)."""
    fa, fb = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1, 1))[:, None]                          # [B, 1]
    lam = torch.as_tensor(lam, dtype=torch.float64)[None]                   # [1, L]
    sin = torch.sin(theta)
    small = sin.abs() < 1e-6
    wa = torch.where(small, 1 - lam, torch.sin((1 - lam) * theta) / torch.where(small, 1.0, sin))
    wb = torch.where(small, lam, torch.sin(lam * theta) / torch.where(small, 1.0, sin))
    out = wa[..., None] * fa[:, None] + wb[..., None] * fb[:, None]
    return out.reshape(a.shape[0], lam.shape[1], *a.shape[1:]).to(a.dtype)


def interpolate(model: Callable, denoiser: Callable, x_a: Tensor, x_b: Tensor, lam: Tensor, sigmas: Tensor,
                inv_sigmas: Tensor, gamma: float = 0.0, labels: Tensor | None = None, **kw) -> Tensor:
    """Invert x_a, x_b [B, ...] (`invert` on inv_sigmas), slerp their noises at lam [L] and gamma-sample each point
    along `sigmas`: [B * L, ...], pair-major. `labels` [B] (conditional models) are shared by each path."""
    za, zb = invert(denoiser, x_a, inv_sigmas, labels), invert(denoiser, x_b, inv_sigmas, labels)
    z = slerp(za, zb, lam).flatten(0, 1)
    lab = None if labels is None else labels.repeat_interleave(len(lam))
    return gamma_sample(model, z, sigmas, gamma, labels=lab, **kw)


def heun_jump(denoiser: Callable, steps: int = 1) -> Callable:
    """A denoiser's stand-in for the jump G(x, t, s, labels): `steps` Heun steps of its PF-ODE on a Karras grid from
    t to s (how a teacher runs the editing algorithms: Heun between the projections)."""
    def jump(x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None) -> Tensor:
        return flow_map(denoiser, x, t, s, steps, labels)
    return jump


def edit_noise(n: int, k: int, shape: tuple, seed: int, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample noise for an edit with K jumps: (start noise [n, ...], re-noising draws [n, K-1, ...], observation
    draws [n, K, ...]); row i depends only on (seed, start + i), so results do not depend on the batch size."""
    z = per_sample_normal(n, (2 * k,) + tuple(shape), seed, start)
    return z[:, 0], z[:, 1:k], z[:, k:]
