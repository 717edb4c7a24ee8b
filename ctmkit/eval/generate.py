"""Sampling a loaded model in batches with per-sample seeds, and writing samples in the data's own space."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.sampling import gamma_sample, heun_sample, per_sample_normal, sample_schedule
from ..data import Normalizer
from ..errors import UserError
from ..io.atomic import atomic_write_bytes
from ..io.card import ModelCard
from ..progress import progress_bar
from .report import save_image_grid, save_scatter


def check_times(ts, sigma_min: float, sigma_max: float) -> Tensor:
    """Custom sampling times t_0 > t_1 > ... > t_K (NFE = K) within [sigma_min, sigma_max]: Tensor[K+1] float64."""
    ts = torch.as_tensor([float(v) for v in ts], dtype=torch.float64)
    if len(ts) < 2:
        raise UserError("--ts needs at least two times, e.g. 80,0.002 (one jump)")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise UserError(f"--ts must be strictly decreasing, got {ts.tolist()}")
    lo, hi = sigma_min * (1 - 1e-6), sigma_max * (1 + 1e-6)
    if float(ts.min()) < lo or float(ts.max()) > hi:
        raise UserError(f"--ts must lie in the model's sigma range [{sigma_min:g}, {sigma_max:g}], got {ts.tolist()}")
    return ts


def generate(model, n: int, nfe: int | None, gamma: float, seed: int, labels: Tensor | None, batch_size: int = 500,
             sampler: str = "auto", progress: bool | None = True, ts=None) -> Tensor:
    """Model-space samples [n, ...] from a teacher (Heun) or a CTM (gamma-sampling, or Heun with its denoiser);
    noise is per-sample seeded, so results do not depend on batch_size. `ts`: custom times t_0 > ... > t_K
    instead of the default schedule for `nfe` (gamma-sampling jumps between them; Heun steps along them)."""
    card = model.card
    sigmas = None if ts is None else check_times(ts, card.sigma_min, card.sigma_max)
    if sigmas is not None:
        nfe = len(sigmas) - 1
    shape, is_ctm = card.shape, card.is_ctm
    if sampler == "auto":
        sampler = "gamma" if is_ctm else "heun"
    if sampler == "gamma" and not is_ctm:
        raise UserError("--sampler gamma needs a CTM model; a teacher samples with heun")
    nfe = (1 if sampler == "gamma" else 35) if nfe is None else nfe
    if nfe < 1:
        raise UserError(f"--nfe must be >= 1, got {nfe}")
    if not 0 <= gamma <= 1:
        raise UserError(f"--gamma must be in [0, 1], got {gamma}")
    smin, smax = card.sigma_min, card.sigma_max
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in progress_bar(range(0, n, batch_size), desc=f"sampling {sampler} nfe={nfe}", enabled=progress):
            b = min(batch_size, n - start)
            z = per_sample_normal(b, (nfe,) + shape, seed, start).to(device)  # [b, nfe, ...]: initial + re-noising
            lab = labels[start:start + b].to(device) if labels is not None else None
            if sampler == "gamma":
                sched = sample_schedule(nfe, smin, smax) if sigmas is None else sigmas
                x = gamma_sample(model, z[:, 0], sched, gamma, labels=lab, step_noise=z[:, 1:],
                                 sigma_min=None if sigmas is None else smin)   # gamma's offset: the model's sigma_min
            else:
                den = model.denoise if is_ctm else model
                x = heun_sample(den, z[:, 0], sigmas, nfe=nfe, labels=lab, sigma_max=smax, sigma_min=smin)
            out.append(x.cpu())
    return torch.cat(out)


def write_samples(x: Tensor, labels: Tensor | None, card: ModelCard, out: Path) -> list[Path]:
    """Write samples in the data's own space: FILE.npz (samples, labels) and, for images or 2-D data, a PNG."""
    out = Path(out)
    if out.suffix not in (".npz", ".png"):
        raise UserError(f"--out must end in .npz or .png, got '{out.name}'")
    if not out.parent.exists():
        raise UserError(f"output folder '{out.parent}' does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"output folder '{out.parent}' is not writable")
    written = []
    if out.suffix == ".npz":
        data = Normalizer.from_dict(card.data.normalizer).to_data(x.cpu())
        buf = io.BytesIO()
        arrays = {"samples": data} | ({"labels": labels.numpy()} if labels is not None else {})
        np.savez(buf, **arrays)
        atomic_write_bytes(out, buf.getvalue())
        written.append(out)
    png = out.with_suffix(".png")
    if card.data.kind == "image":
        save_image_grid(x[:256], png)
        written.append(png)
    elif x.shape[1] == 2:
        save_scatter([("samples", x.cpu().numpy())], png)
        written.append(png)
    return written
