"""CTM training losses (docs/method.md section 3): DSM (EDM), the CTM soft-consistency loss, GAN losses,
distances, and the adaptive weights from last-layer gradient norms. Pure functions."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .precond import bcast


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def dsm_loss(denoiser: Callable, x0: Tensor, sigma: Tensor, noise: Tensor, sigma_data: float,
             labels: Tensor | None = None, target: Callable | None = None) -> Tensor:
    """Denoising score matching, CTM step 6 / EDM eq. 2: mean lambda(sigma) |D(x0 + sigma z, sigma) - x0|^2.
    `target(x, sigma, labels)` replaces x0 as the regression target (guided distillation: the guided teacher's
    denoiser D_w, docs/method.md section 8)."""
    x = x0 + bcast(sigma, x0) * noise
    d = denoiser(x, sigma, labels)
    if target is not None:
        with torch.no_grad():
            x0 = target(x, sigma, labels).to(x0.dtype)
    per = ((d.float() - x0) ** 2).flatten(1).mean(1)
    return (edm_weight(sigma, sigma_data) * per).mean()


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Pseudo-Huber distance per sample, sqrt(|a - b|^2 + c^2) - c (Song & Dhariwal 2023): Tensor[B]."""
    return ((a.float() - b.float()) ** 2).flatten(1).sum(1).add(c * c).sqrt() - c


def l2(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per sample: Tensor[B]."""
    return ((a.float() - b.float()) ** 2).flatten(1).mean(1)


def default_huber_c(dim: int) -> float:
    """c = 0.00054 sqrt(d) (Song & Dhariwal 2023, improved consistency training)."""
    return 0.00054 * math.sqrt(dim)


def make_distance(name: str, dim: int, huber_c: float = 0.0,
                  feature: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """The CTM distance d(a, b) -> Tensor[B]: 'huber', 'l2', or 'feature' (L2 between feature(a), feature(b))."""
    if name == "huber":
        c = huber_c if huber_c > 0 else default_huber_c(dim)
        return lambda a, b: pseudo_huber(a, b, c)
    if name == "l2":
        return l2
    if name == "feature":
        if feature is None:
            raise ValueError("distance 'feature' needs a feature network")
        return lambda a, b: l2(feature(a), feature(b))
    raise ValueError(f"unknown distance {name!r}; choose huber, l2 or feature")


def ctm_pair(G: Callable, G_target: Callable, x_t: Tensor, x_u: Tensor, t: Tensor, u: Tensor, s: Tensor,
             sigma_min: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CTM step 5, both sides transported to sigma_min by the target network theta^-:
    estimate = G_{theta^-}(G_theta(x_t, t, s), s, sigma_min)   (gradient flows through G_{theta^-} into G_theta)
    target   = G_{theta^-}(G_{sg(theta)}(x_u, u, s), s, sigma_min)   (no grad)."""
    estimate = G_target(G(x_t, t, s, labels), s, sigma_min, labels)
    with torch.no_grad():
        target = G_target(G(x_u, u, s, labels), s, sigma_min, labels)
    return estimate, target


def gan_d_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean()


def gan_g_loss(d_fake: Tensor) -> Tensor:
    """Generator loss -mean D(fake) (docs/method.md section 3, step 7)."""
    return -d_fake.mean()


def last_layer_grad(loss: Tensor, last_layer: Tensor) -> Tensor:
    """grad of a loss w.r.t. the last layer's weight, without touching .grad (the graph is kept)."""
    return torch.autograd.grad(loss, last_layer, retain_graph=True)[0]


def adaptive_weight_from_grads(g_ctm: Tensor, g_x: Tensor, lo: float, hi: float) -> Tensor:
    """lambda_X = ||g_CTM|| / (||g_X|| + 1e-4), detached and clamped (docs/method.md section 3, step 8)."""
    return (g_ctm.norm() / (g_x.norm() + 1e-4)).clamp(lo, hi).detach()
