"""Likelihood of a data set under a loaded model, in the data's own units (docs/method.md section 5)."""

from __future__ import annotations

import math

import torch

from ..core.likelihood import log_likelihood
from ..errors import UserError
from ..progress import progress_bar


def data_nll(model, data, n: int = 256, batch_size: int = 256, rtol: float = 1e-5, atol: float = 1e-5,
             exact: bool | None = None, seed: int = 0, progress: bool | None = True) -> dict:
    """NLL of the first n items of a Dataset under a loaded model (CTM: its denoiser g(x, t, t)), in the data's own
    units: nats/dim for continuous data; bits/dim with uniform dequantisation for 8-bit images.

    A class-conditional model is given each item's label: the figure is then log p(x | y) (reported as
    "conditional": true), which is below the unconditional log p(x) by at most log(num_classes) per sample."""
    card, norm = model.card, data.normalizer
    denoiser = model.denoise if card.is_ctm else model
    x = data[torch.arange(min(n, len(data)))]     # only these items are read
    d = x[0].numel()
    conditional = card.conditional
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
    for i in progress_bar(range(0, x.shape[0], batch_size), desc="likelihood", enabled=progress):
        lab = None if labels is None else labels[i:i + batch_size]
        lls.append(log_likelihood(denoiser, x[i:i + batch_size], lab, card.sigma_min, card.sigma_max, exact,
                                  rtol=rtol, atol=atol, generator=g))
    ll = torch.cat(lls) + log_jac
    out = {"n": int(x.shape[0]), "dim": d, "nats_per_dim": float(-ll.mean() / d),
           "nats_per_sample": float(-ll.mean()), "nats_per_sample_std": float(ll.std()) if len(ll) > 1 else 0.0,
           "conditional": conditional, "divergence": "exact" if (d <= 16 if exact is None else exact) else "hutchinson"}
    if uint8:
        out["bits_per_dim"] = out["nats_per_dim"] / math.log(2)
    return out
