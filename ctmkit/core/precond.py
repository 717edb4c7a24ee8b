"""EDM preconditioning and the CTM jump (docs/method.md section 2; Karras et al. 2022 Table 1; Kim et al. 2024).

    g(x_t, t, s) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t), c_noise(s), labels)
    G(x_t, t, s) = (s / t) x_t + (1 - s / t) g(x_t, t, s)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def c_skip(t: Tensor, sigma_data: float) -> Tensor:
    """EDM c_skip = sigma_data^2 / (t^2 + sigma_data^2)."""
    return sigma_data**2 / (t**2 + sigma_data**2)


def c_out(t: Tensor, sigma_data: float) -> Tensor:
    """EDM c_out = t sigma_data / sqrt(t^2 + sigma_data^2)."""
    return t * sigma_data / (t**2 + sigma_data**2).sqrt()


def c_in(t: Tensor, sigma_data: float) -> Tensor:
    """EDM c_in = 1 / sqrt(t^2 + sigma_data^2)."""
    return 1 / (t**2 + sigma_data**2).sqrt()


def c_noise(t: Tensor) -> Tensor:
    """EDM c_noise = ln(t) / 4."""
    return t.log() / 4


def ctm_jump(x_t: Tensor, t: Tensor, s: Tensor, g: Tensor) -> Tensor:
    """CTM's jump G(x_t, t, s) = (s/t) x_t + (1 - s/t) g (docs/method.md section 2); t, s broadcast per sample."""
    ratio = bcast(s / t, x_t)
    return ratio * x_t + (1 - ratio) * g


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample Tensor[B] to broadcast against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def edm_precond(backbone: nn.Module, x: Tensor, t: Tensor, noise_s: Tensor | None, labels: Tensor | None,
               sigma_data: float) -> Tensor:
    """EDM Table 1 around a backbone F: c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t), noise_s, labels).

    noise_s is the second time input (c_noise(s) for a CTM, None for a plain EDM denoiser)."""
    f = backbone(bcast(c_in(t, sigma_data), x) * x, c_noise(t), noise_s, labels)
    return bcast(c_skip(t, sigma_data), x) * x + bcast(c_out(t, sigma_data), x) * f


def as_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """A float or Tensor[] / Tensor[B] noise level as Tensor[B] on x's device (float32)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.to(x.device, torch.float32)


class EDMDenoiser(nn.Module):
    """EDM-preconditioned denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise(sigma)) around a backbone.

    The teacher of CTM. Satisfies the denoiser protocol ``denoiser(x, sigma, labels=None) -> x0_hat``."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.backbone, self.sigma_data = backbone, sigma_data

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        return edm_precond(self.backbone, x, as_sigma(sigma, x), None, labels, self.sigma_data)

    def last_layer(self) -> nn.Parameter:
        """The backbone's output-layer weight (for adaptive loss weights)."""
        return self.backbone.last_layer()


class CTM(nn.Module):
    """Consistency Trajectory Model: ``model(x_t, t, s) = G(x_t, t, s)``; ``denoise(x, sigma) = g(x, sigma, sigma)``.

    g is EDM-preconditioned on t, with the backbone's second time input fed c_noise(s) (docs/method.md section 2)."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.backbone, self.sigma_data = backbone, sigma_data

    def g(self, x_t: Tensor, t: Tensor | float, s: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """g_theta(x_t, t, s) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t), c_noise(s), labels)."""
        t, s = as_sigma(t, x_t), as_sigma(s, x_t)
        return edm_precond(self.backbone, x_t, t, c_noise(s), labels, self.sigma_data)

    def forward(self, x_t: Tensor, t: Tensor | float, s: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """G_theta(x_t, t, s) = (s/t) x_t + (1 - s/t) g_theta(x_t, t, s)."""
        t, s = as_sigma(t, x_t), as_sigma(s, x_t)
        return ctm_jump(x_t, t, s, self.g(x_t, t, s, labels))

    def denoise(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """D_theta(x, sigma) = g_theta(x, sigma, sigma): the CTM as a denoiser (the protocol)."""
        return self.g(x, sigma, sigma, labels)

    def last_layer(self) -> nn.Parameter:
        return self.backbone.last_layer()
