"""Exact denoisers, the ground truth that CTM is tested against (docs/method.md section 1).

For x_0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t = x_0 + t z, the marginal is sum_k w_k N(mu_k, (s_k^2 + t^2) I) and
    D(x, t) = E[x_0 | x_t = x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + t^2) (x - mu_k)),
with responsibilities r_k(x) proportional to w_k N(x; mu_k, (s_k^2 + t^2) I) (log-sum-exp, float64).
A finite data set is the mixture with s_k = 0: its optimal (memorising) denoiser.

A labelled mixture gives each component a class c_k: D(x, t, c) is the denoiser of the components of class c
(weights w_k [c_k = c], renormalised) and D(x, t, -1) that of the whole mixture (the null label of classifier-free
guidance, core/guidance.py), so the guided ODE is known to any accuracy.

Given observed coordinates x_O = y_O, the unobserved ones x_U follow sum_k w'_k N(mu_kU, s_k^2 I) with
w'_k ∝ w_k N(y_O; mu_kO, s_k^2 I) (isotropic components factor over coordinates): `conditional_*`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _sigma64(sigma: Tensor | float, x: Tensor) -> Tensor:
    """A float or Tensor[] / Tensor[B] noise level as float64 Tensor[B] on x's device."""
    t = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def _log_normal_iso(x: Tensor, means: Tensor, var: Tensor) -> Tensor:
    """log N(x; mu_k, var_k I) for x [B, D], means [K, D], var [B, K] -> [B, K] (float64)."""
    d = x.shape[1]
    sq = (x * x).sum(1, keepdim=True) - 2 * x @ means.T + (means * means).sum(1)[None]
    return -0.5 * sq.clamp_min(0) / var - 0.5 * d * torch.log(2 * math.pi * var)


def _mixture_denoise(x: Tensor, t: Tensor, means: Tensor, stds: Tensor, log_w: Tensor) -> Tensor:
    """Exact E[x_0 | x_t = x] of an isotropic mixture; x [B, D] float64, t [B] float64, log-weights [K] or per
    sample [B, K] (unnormalised) -> [B, D]."""
    t2 = (t * t)[:, None]                                      # [B, 1]
    var = stds[None] ** 2 + t2                                 # [B, K] variance of component k at level t
    lw = log_w if log_w.ndim == 2 else log_w[None]
    logits = lw + _log_normal_iso(x, means, var)               # [B, K]
    r = torch.softmax(logits, dim=1)                           # responsibilities r_k(x)
    shrink = stds[None] ** 2 / var                             # s_k^2 / (s_k^2 + t^2)
    # sum_k r_k (mu_k + shrink_k (x - mu_k)) = sum_k r_k (1 - shrink_k) mu_k + (sum_k r_k shrink_k) x
    return (r * (1 - shrink)) @ means + (r * shrink).sum(1, keepdim=True) * x


class GaussianMixture:
    """Isotropic Gaussian mixture sum_k w_k N(mu_k, s_k^2 I) with an exact denoiser, sampler and log-density.

    means [K, D], stds [K] (>= 0), weights [K] (normalised here), classes [K] (int >= 0, optional: a labelled
    mixture, every class in 0..C-1 present). Calling it is the denoiser protocol."""

    def __init__(self, means, stds, weights, classes=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        if self.means.ndim != 2 or self.stds.shape != (self.means.shape[0],) or w.shape != self.stds.shape:
            raise ValueError(f"GaussianMixture needs means [K, D], stds [K], weights [K]; got "
                             f"{tuple(self.means.shape)}, {tuple(self.stds.shape)}, {tuple(w.shape)}")
        if (self.stds < 0).any() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("GaussianMixture needs stds >= 0 and non-negative weights with a positive sum")
        self.weights = w / w.sum()
        self.log_w = self.weights.log()
        self.classes = None if classes is None else torch.as_tensor(classes, dtype=torch.int64)
        if self.classes is not None and (self.classes.shape != w.shape or (self.classes < 0).any()
                                         or set(self.classes.tolist()) != set(range(int(self.classes.max()) + 1))):
            raise ValueError("GaussianMixture classes need one integer >= 0 per component, using every class "
                             "0..C-1")

    @property
    def num_classes(self) -> int:
        """C for a labelled mixture, else 0."""
        return 0 if self.classes is None else int(self.classes.max()) + 1

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def __call__(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Exact denoiser D(x, sigma, c) = E[x_0 | x_t = x, c], x [B, D] -> [B, D] in x's dtype. An unlabelled
        mixture ignores labels; a labelled one needs them (int [B], -1 = the whole mixture)."""
        t = _sigma64(sigma, x)
        dev = x.device
        out = _mixture_denoise(x.double(), t, self.means.to(dev), self.stds.to(dev), self.class_log_w(labels, dev))
        return out.to(x.dtype)

    def class_log_w(self, labels: Tensor | None, device=None) -> Tensor:
        """log w_k [K] (unlabelled), or per sample [B, K] with -inf off the sample's class (-1: all components)."""
        if self.classes is None:
            return self.log_w.to(device)
        if labels is None:
            raise ValueError(f"this mixture has {self.num_classes} classes: pass labels [B] (-1 = the null label, "
                             "the whole mixture)")
        labels = torch.as_tensor(labels).reshape(-1, 1).to(device, torch.int64)
        cls = self.classes.to(device)[None]
        if ((labels < -1) | (labels >= self.num_classes)).any():
            raise ValueError(f"labels must be in -1..{self.num_classes - 1}")
        keep = (labels < 0) | (cls == labels)
        return torch.where(keep, self.log_w.to(device)[None], torch.tensor(-torch.inf, dtype=torch.float64,
                                                                            device=device))

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32,
               with_labels: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """n samples [n, D] (component, then mean + std * z; computed in float64, returned as `dtype`); with
        `with_labels`, also their classes [n] int64 (a labelled mixture)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means[k] + self.stds[k, None] * z).to(dtype)
        return (x, self.classes[k]) if with_labels else x

    def log_prob(self, x: Tensor, sigma: float = 0.0) -> Tensor:
        """log p_sigma(x) of the mixture convolved with N(0, sigma^2 I) (sigma=0: the data density): [B] float64."""
        var = (self.stds[None] ** 2 + sigma**2).expand(x.shape[0], -1).to(x.device)
        logits = self.log_w.to(x.device)[None] + _log_normal_iso(x.double(), self.means.to(x.device), var)
        return torch.logsumexp(logits, 1)

    def to_dict(self) -> dict:
        d = {"means": self.means.tolist(), "stds": self.stds.tolist(), "weights": self.weights.tolist()}
        return d if self.classes is None else {**d, "classes": self.classes.tolist()}

    # ---- the exact posterior of unobserved coordinates (zero-shot editing's ground truth) -------------------------
    def conditional_log_weights(self, y: Tensor, known: Tensor) -> Tensor:
        """log w'_k of p(x_U | x_O = y_O) = sum_k w'_k N(mu_kU, s_k^2 I), w'_k ∝ w_k N(y_O; mu_kO, s_k^2 I):
        y [B, D] (entries where `known` is False are ignored), known bool [D] -> [B, K] float64."""
        known = self._known(known)
        if (self.stds <= 0).any():
            raise ValueError("the exact conditional needs stds > 0 (a Dirac component has no density)")
        yo = y.double().cpu()[:, known]
        var = (self.stds[None] ** 2).expand(y.shape[0], -1)
        return torch.log_softmax(self.log_w[None] + _log_normal_iso(yo, self.means[:, known], var), 1)

    def conditional_sample(self, y: Tensor, known: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact draws of x given x_O = y_O for each row of y [B, D] -> [B, n, D] float64 (known entries = y)."""
        known = self._known(known)
        logw = self.conditional_log_weights(y, known)
        k = torch.multinomial(logw.exp(), n, replacement=True, generator=generator)      # [B, n]
        z = torch.randn(y.shape[0], n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + self.stds[k][..., None] * z
        return torch.where(known, y.double().cpu()[:, None], x)

    def conditional_log_prob(self, x: Tensor, y: Tensor, known: Tensor) -> Tensor:
        """log p(x_U | x_O = y_O) of x [B, D] (its known entries are ignored) for each row of y [B, D]: [B] float64."""
        known = self._known(known)
        logw = self.conditional_log_weights(y, known)
        var = (self.stds[None] ** 2).expand(x.shape[0], -1)
        return torch.logsumexp(logw + _log_normal_iso(x.double().cpu()[:, ~known], self.means[:, ~known], var), 1)

    def _known(self, known: Tensor) -> Tensor:
        known = torch.as_tensor(known).cpu().reshape(-1).bool()
        if known.shape != (self.dim,):
            raise ValueError(f"the mask of known coordinates needs {self.dim} entries, got {known.numel()}")
        return known


class EmpiricalDenoiser:
    """Optimal denoiser of a finite data set x_i (Dirac mixture): D(x, t) = sum_i softmax_i(-|x - x_i|^2 / 2t^2) x_i.

    data [N, ...]; works for vectors and images (flattened inside). A reference teacher for small sets."""

    def __init__(self, data: Tensor, chunk: int = 512):
        self.shape = tuple(data.shape[1:])
        self.points = data.reshape(data.shape[0], -1).double()
        self.zeros = torch.zeros(self.points.shape[0], dtype=torch.float64)
        self.log_w = torch.full_like(self.zeros, -math.log(self.points.shape[0]))
        self.chunk = chunk

    def __call__(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        t = _sigma64(sigma, x)
        flat = x.reshape(x.shape[0], -1).double()
        pts, z, lw = self.points.to(x.device), self.zeros.to(x.device), self.log_w.to(x.device)
        out = [_mixture_denoise(flat[i:i + self.chunk], t[i:i + self.chunk], pts, z, lw)
               for i in range(0, x.shape[0], self.chunk)]
        return torch.cat(out).reshape(x.shape).to(x.dtype)
