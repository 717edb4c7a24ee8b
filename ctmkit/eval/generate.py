"""Sampling a loaded model in batches with per-sample seeds, and writing samples in the data's own space."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.sampling import gamma_sample, heun_sample, per_sample_normal, sample_schedule, two_jump_sample
from ..core.schedules import karras_sigmas
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


def check_two_jump(two_jump, is_ctm: bool, sampler: str, sigma_min: float, sigma_max: float) -> Tensor:
    """The N-point training grid of a two-jump request (i1, i2, N), after checking it: Tensor[N] float64."""
    i1, i2, n_grid = two_jump
    if not is_ctm or sampler == "heun":
        raise UserError("--two-jump needs a CTM model and its gamma sampler")
    if n_grid < 3:
        raise UserError(f"the two-jump sampler needs a training grid of at least 3 points, got {n_grid}")
    if not 0 < i2 <= i1 < n_grid - 1:
        raise UserError(f"--two-jump I1,I2 needs 0 < I2 <= I1 < {n_grid - 1} (indices of the {n_grid}-point training "
                        f"grid t_0 = {sigma_max:g} > ... > t_{n_grid - 1} = {sigma_min:g}), got {i1},{i2}")
    return karras_sigmas(n_grid, sigma_min, sigma_max)


def generate(model, n: int, nfe: int | None, gamma: float, seed: int, labels: Tensor | None, batch_size: int = 500,
             sampler: str = "auto", progress: bool | None = True, ts=None, two_jump=None) -> Tensor:
    """Model-space samples [n, ...] from a teacher (Heun) or a CTM (gamma-sampling, or Heun with its denoiser);
    noise is per-sample seeded, so results do not depend on batch_size. `ts`: custom times t_0 > ... > t_K
    instead of the default schedule for `nfe` (gamma-sampling jumps between them; Heun steps along them).
    `two_jump` (i1, i2, N): the reference's two-jump sampler on the N-point training grid (a CTM, NFE 2)."""
    card = model.card
    sigmas = None if ts is None else check_times(ts, card.sigma_min, card.sigma_max)
    if sigmas is not None:
        nfe = len(sigmas) - 1
    shape, is_ctm = card.shape, card.is_ctm
    if two_jump is not None:
        grid = check_two_jump(two_jump, is_ctm, sampler, card.sigma_min, card.sigma_max)
        sampler, nfe = "two_jump", 2
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
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    out = []
    with torch.no_grad():
        for start in progress_bar(range(0, n, batch_size), desc=f"sampling {sampler} nfe={nfe}", enabled=progress):
            b = min(batch_size, n - start)
            z = per_sample_normal(b, (nfe,) + shape, seed, start).to(device)  # [b, nfe, ...]: initial + re-noising
            lab = labels[start:start + b].to(device) if labels is not None else None
            if sampler == "two_jump":
                x = two_jump_sample(model, z[:, 0], grid, two_jump[0], two_jump[1], lab, z[:, 1])
            elif sampler == "gamma":
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
