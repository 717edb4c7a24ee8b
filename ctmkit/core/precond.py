"""Preconditioning and the CTM jump (docs/method.md section 2; Karras et al. 2022 Table 1; Kim et al. 2024).

    g(x_t, t, s) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t), c_noise(s), labels)
    G(x_t, t, s) = (s / t) x_t + (1 - s / t) g(x_t, t, s)

EDM's preconditioning is ctmkit's own; foreign teachers keep theirs (docs/method.md section 7): a discrete-time VP
network (diffusers DDPM/DDIM: epsilon, v or sample prediction) or a rectified flow (velocity prediction), each a
`Precond` that turns the backbone's output into the denoiser D(x, sigma) in the EDM convention x = x0 + sigma n and
feeds s to the backbone with the same noise-label function as t.
"""

from __future__ import annotations

import functools
import math

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


class EDMPrecond:
    """EDM Table 1 (ctmkit's own networks): denoise = edm_precond, noise label c_noise."""

    spec = None   # the card's value for it (no entry)

    def __init__(self, sigma_data: float) -> None:
        self.sigma_data = sigma_data

    def noise(self, sigma: Tensor) -> Tensor:
        return c_noise(sigma)

    def __call__(self, backbone: nn.Module, x: Tensor, t: Tensor, noise_s: Tensor | None, labels) -> Tensor:
        return edm_precond(backbone, x, t, noise_s, labels, self.sigma_data)


def vp_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """sigma_i = sqrt((1 - alpha_bar_i) / alpha_bar_i) of a discrete VP schedule: Tensor[T] float64, increasing."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - a) / a).sqrt()


class VPPrecond:
    """A discrete-time VP network eps/v/x0-hat(x_vp, tau) (diffusers DDPM/DDIM), in the EDM convention:
    x_vp = x / sqrt(1 + sigma^2) (= sqrt(alpha_bar) x), tau = the fractional training timestep of sigma (linear
    interpolation of log sigma_i over the training timesteps i), and
        epsilon:       D = x - sigma eps
        v_prediction:  D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) v
        sample:        D = x0_hat."""

    def __init__(self, alphas_cumprod, prediction: str = "epsilon") -> None:
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction type {prediction!r}")
        self.log_sigmas = vp_sigmas(alphas_cumprod).log()
        self.prediction = prediction
        self.spec = {"kind": "vp", "prediction": prediction,
                     "alphas_cumprod": [float(v) for v in torch.as_tensor(alphas_cumprod, dtype=torch.float64)]}

    @property
    def sigma_range(self) -> tuple[float, float]:
        return float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp())

    def noise(self, sigma: Tensor) -> Tensor:
        """The fractional timestep tau(sigma), clamped to [0, T - 1] (exact integers at the training sigmas)."""
        ls, log_s = self.log_sigmas.to(sigma.device), sigma.double().log()
        hi = torch.searchsorted(ls, log_s).clamp(1, len(ls) - 1)
        w = ((log_s - ls[hi - 1]) / (ls[hi] - ls[hi - 1])).clamp(0, 1)
        return ((hi - 1).double() + w).float()

    def __call__(self, backbone: nn.Module, x: Tensor, t: Tensor, noise_s: Tensor | None, labels) -> Tensor:
        tt = bcast(t.double(), x)
        out = backbone((x / (1 + tt**2).sqrt()).to(x.dtype), self.noise(t), noise_s, labels).double()
        if self.prediction == "epsilon":
            d = x - tt * out
        elif self.prediction == "v_prediction":
            d = x / (1 + tt**2) - tt / (1 + tt**2).sqrt() * out
        else:
            d = out
        return d.to(x.dtype)


class FlowPrecond:
    """A rectified flow x_f = (1 - tau) x0 + tau n with velocity prediction v = n - x0 (diffusers
    FlowMatchEulerDiscreteScheduler), in the EDM convention: sigma = tau / (1 - tau), x_f = x / (1 + sigma), the
    network's timestep tau T (T = num_train_timesteps), and D = x_f - tau v."""

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.T = int(num_train_timesteps)
        self.spec = {"kind": "flow", "num_train_timesteps": self.T}

    def noise(self, sigma: Tensor) -> Tensor:
        return (sigma.double() / (1 + sigma.double()) * self.T).float()

    def __call__(self, backbone: nn.Module, x: Tensor, t: Tensor, noise_s: Tensor | None, labels) -> Tensor:
        tt = bcast(t.double(), x)
        tau = tt / (1 + tt)
        x_f = x / (1 + tt)
        v = backbone(x_f.to(x.dtype), self.noise(t), noise_s, labels).double()
        return (x_f - tau * v).to(x.dtype)


class EDMNetPrecond:
    """The preconditionings of NVIDIA EDM's network pickles (Karras et al. 2022, Table 1; docs/method.md section 7)
    around an EDM U-Net F, in EDM's own float32 arithmetic:
        D(x, sigma) = c_skip x + c_out F(c_in x, c_noise(sigma))
        vp:    c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2 + 1), c_noise (M - 1) t_VP(sigma),
               t_VP(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d
        ve:    c_skip 1, c_out sigma,  c_in 1,                 c_noise ln(sigma / 2)
        iddpm: c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2 + 1), c_noise M - 1 - argmin_j |u_j - sigma|, F's first C
               channels (the network also outputs a variance)
    (EDM's own EDMPrecond is ctmkit's EDMPrecond.) The student's s goes through the same c_noise."""

    def __init__(self, kind: str, img_channels: int, **p) -> None:
        if kind not in ("vp", "ve", "iddpm"):
            raise ValueError(f"unknown EDM preconditioning {kind!r}")
        self.kind, self.channels, self.p = kind, int(img_channels), dict(p)
        self.spec = {"kind": f"edm_{kind}", "img_channels": self.channels, **self.p}
        if kind == "iddpm":
            self.u = iddpm_levels(int(p["M"]), float(p["C_1"]), float(p["C_2"]))

    def noise(self, sigma: Tensor) -> Tensor:
        sigma, p = sigma.float(), self.p
        if self.kind == "vp":
            t = ((p["beta_min"] ** 2 + 2 * p["beta_d"] * (1 + sigma**2).log()).sqrt() - p["beta_min"]) / p["beta_d"]
            return (p["M"] - 1) * t
        if self.kind == "ve":
            return (0.5 * sigma).log()
        index = (sigma.reshape(-1, 1) - self.u.to(sigma.device).reshape(1, -1)).abs().argmin(1)
        return p["M"] - 1 - index.float()

    def __call__(self, backbone: nn.Module, x: Tensor, t: Tensor, noise_s: Tensor | None, labels) -> Tensor:
        x, sig = x.float(), bcast(t.float(), x)
        c_in = 1 if self.kind == "ve" else 1 / (sig**2 + 1).sqrt()
        c_out = sig if self.kind == "ve" else -sig
        f = backbone(c_in * x, self.noise(t), noise_s, labels)
        return x + c_out * f[:, :self.channels].float()


def iddpm_levels(M: int, C_1: float, C_2: float) -> Tensor:
    """iDDPM's M + 1 noise levels u_j (Nichol & Dhariwal 2021 as EDM tabulates them): u_M = 0 and
    u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j - 1) / abar(j), C_1) - 1), abar(j) = sin^2(pi j / (2 M (C_2 + 1)))."""
    def abar(j: int) -> Tensor:
        return (0.5 * math.pi * torch.tensor(j) / M / (C_2 + 1)).sin() ** 2
    u = torch.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (abar(j - 1) / abar(j)).clip(min=C_1) - 1).sqrt()
    return u


def predicts_noise(spec: dict | None) -> bool:
    """True for a preconditioning whose network predicts the noise (c_out proportional to sigma: diffusers epsilon,
    EDM's VP / VE / iDDPM): its x0 error is the network's error times sigma."""
    if spec is None:
        return False
    return (spec.get("kind") == "vp" and spec.get("prediction", "epsilon") == "epsilon") or \
        spec.get("kind") in ("edm_vp", "edm_ve", "edm_iddpm")


def make_precond(spec: dict | None, sigma_data: float = 0.5):
    """The preconditioning a model card names: None = EDM (ctmkit's networks), {'kind': 'vp', ...}, {'kind': 'flow',
    ...}; ValueError otherwise."""
    if spec is None:
        return EDMPrecond(sigma_data)
    kind = spec.get("kind")
    if kind == "vp":
        return VPPrecond(spec["alphas_cumprod"], spec.get("prediction", "epsilon"))
    if kind == "flow":
        return FlowPrecond(spec.get("num_train_timesteps", 1000))
    if kind in ("edm_vp", "edm_ve", "edm_iddpm"):
        return EDMNetPrecond(kind[4:], **{k: v for k, v in spec.items() if k != "kind"})
    raise ValueError(f"unknown preconditioning {kind!r}")


class EDMDenoiser(nn.Module):
    """Preconditioned denoiser D(x, sigma) around a backbone: EDM's c_skip x + c_out F(c_in x, c_noise(sigma)) by
    default, or a foreign teacher's own form (`precond`, see make_precond).

    The teacher of CTM. Satisfies the denoiser protocol ``denoiser(x, sigma, labels=None) -> x0_hat``."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, precond=None):
        super().__init__()
        self.backbone, self.sigma_data = backbone, sigma_data
        self.precond = precond or EDMPrecond(sigma_data)

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        return self.precond(self.backbone, x, as_sigma(sigma, x), None, labels)

    def last_layer(self) -> nn.Parameter:
        """The backbone's output-layer weight (for adaptive loss weights)."""
        return self.backbone.last_layer()


class CTM(nn.Module):
    """Consistency Trajectory Model: ``model(x_t, t, s) = G(x_t, t, s)``; ``denoise(x, sigma) = g(x, sigma, sigma)``.

    g is EDM-preconditioned on t, with the backbone's second time input fed c_noise(s) (docs/method.md section 2);
    a student of a foreign teacher keeps the teacher's preconditioning (`precond`) and its noise label for s."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, precond=None):
        super().__init__()
        self.backbone, self.sigma_data = backbone, sigma_data
        self.precond = precond or EDMPrecond(sigma_data)

    def g(self, x_t: Tensor, t: Tensor | float, s: Tensor | float, labels: Tensor | None = None,
          w: Tensor | None = None) -> Tensor:
        """g_theta(x_t, t, s) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t), c_noise(s), labels); w [B]: the
        guidance scale of a student distilled for a range of scales (its backbone's w input)."""
        t, s = as_sigma(t, x_t), as_sigma(s, x_t)
        backbone = self.backbone if w is None else functools.partial(self.backbone, w=w)
        return self.precond(backbone, x_t, t, self.precond.noise(s), labels)

    def forward(self, x_t: Tensor, t: Tensor | float, s: Tensor | float, labels: Tensor | None = None,
                w: Tensor | None = None) -> Tensor:
        """G_theta(x_t, t, s) = (s/t) x_t + (1 - s/t) g_theta(x_t, t, s)."""
        t, s = as_sigma(t, x_t), as_sigma(s, x_t)
        return ctm_jump(x_t, t, s, self.g(x_t, t, s, labels, w))

    def denoise(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None,
                w: Tensor | None = None) -> Tensor:
        """D_theta(x, sigma) = g_theta(x, sigma, sigma): the CTM as a denoiser (the protocol)."""
        return self.g(x, sigma, sigma, labels, w)

    def last_layer(self) -> nn.Parameter:
        return self.backbone.last_layer()
