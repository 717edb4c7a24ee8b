"""`ctmkit edit`'s engine: zero-shot edits (core/editing.py) of model-space inputs, in batches with per-sample seeds
(draw j of input i is sample i * N + j: results do not depend on the batch size or the number of processes), and
the output: OUT.npz in the data's own space + a PNG grid of input / observation / result for images."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.editing import (
    block_mean,
    colorize,
    edit_noise,
    heun_jump,
    inpaint,
    inversion_schedule,
    invert,
    sdedit,
    slerp,
    superres,
)
from ..core.sampling import gamma_sample, sample_schedule
from ..io.atomic import atomic_write_bytes
from .generate import model_device, sharded
from .guide import guided_callables
from .report import save_image_grid


@dataclass
class Edit:
    """One edit request, model space. `inputs` [M, ...]: the model's shape, except superres (block means
    [M, C, H/F, W/F]) and colorize (luminance [M, 1, H, W]); `mask` bool, broadcast to [M, ...] (inpaint);
    `sigmas` the jump schedule (sdedit: from t0 down); `n` draws per input (interpolate: points per pair);
    `labels` [M] (conditional models); `inv_steps` Heun steps of the inversion (invert, interpolate); `guidance`
    the classifier-free guidance scale (None: the model's own, eval/guide.py)."""

    task: str
    inputs: Tensor
    sigmas: Tensor
    gamma: float = 0.0
    n: int = 1
    seed: int = 0
    mask: Tensor | None = None
    factor: int = 1
    labels: Tensor | None = None
    inv_steps: int = 64
    guidance: float | None = None


def run_edit(model, edit: Edit, batch_size: int = 256, progress: bool | None = True) -> dict:
    """{"samples": [M * n, ...] (interpolate: [M / 2 * n, ...]), "observation": [M, C, H, W] (images, for the
    picture), "noise": [M, ...] (invert, interpolate)}, model space, on the CPU."""
    card = model.card
    is_ctm = card.is_ctm
    den = model.denoise if is_ctm else model
    jump = model if is_ctm else heun_jump(model, 1)
    if edit.guidance is not None:          # guided jumps and denoiser (the inversion too)
        jump, den = guided_callables(model, edit.guidance, is_ctm)
        jump = jump if is_ctm else heun_jump(den, 1)
    device = model_device(model)
    out: dict = {}
    starts = None
    if edit.task in ("invert", "interpolate"):
        inv = inversion_schedule(edit.inv_steps, card.sigma_min, card.sigma_max)
        chunks = list(_chunks(edit.inputs, edit.labels, batch_size))
        out["noise"] = torch.cat(list(sharded(chunks, lambda c: invert(den, c[0].to(device), inv, None if c[1] is None
                                                                       else c[1].to(device)).cpu(),
                                              f"inverting ({edit.inv_steps} Heun steps)", progress)))
    if edit.task == "interpolate":
        za, zb = out["noise"][0::2], out["noise"][1::2]
        starts = slerp(za, zb, torch.linspace(0, 1, edit.n)).flatten(0, 1)      # [pairs * n, ...]
    total = (len(edit.inputs) // 2 if edit.task == "interpolate" else len(edit.inputs)) * edit.n
    k = len(edit.sigmas) - 1

    def batch(start: int) -> Tensor:
        b = min(batch_size, total - start)
        z, step, obs = (v.to(device) for v in edit_noise(b, k, card.shape, edit.seed, start))
        which = torch.arange(start, start + b) // edit.n
        if starts is not None:
            z, which = starts[start:start + b].to(device), which * 2     # the path's noise; labels of input a
        return _edit_batch(jump, edit, card, which, z, step, obs, device, out.get("noise")).cpu()

    with torch.no_grad():     # under torchrun batch j runs on rank j mod world; every rank gets every batch
        batches = list(sharded(range(0, total, batch_size), batch, f"edit {edit.task} nfe={k}", progress))
    out["samples"] = torch.cat(batches) if batches else torch.zeros(0, *card.shape)
    if card.data.kind == "image":
        out["observation"] = observation(edit, out.get("noise"))
    return out


def _edit_batch(jump, edit: Edit, card, which: Tensor, z, step, obs, device, noise) -> Tensor:
    """The samples of items `which` (indices of their inputs) from their noise z, step and obs."""
    lab = None if edit.labels is None else edit.labels[which].to(device)
    kw = {"labels": lab, "step_noise": step, "sigma_min": card.sigma_min}
    x = edit.inputs[which].to(device) if edit.task != "interpolate" else None
    sig, gamma = edit.sigmas, edit.gamma
    if edit.task == "inpaint":
        mask = edit.mask.expand(len(edit.inputs), *edit.mask.shape[1:])[which].to(device)
        return inpaint(jump, z, sig, x, mask, gamma, obs_noise=obs, **kw)
    if edit.task == "superres":
        return superres(jump, z, sig, x, edit.factor, gamma, obs_noise=obs, **kw)
    if edit.task == "colorize":
        return colorize(jump, z, sig, x, gamma, obs_noise=obs, **kw)
    if edit.task == "sdedit":
        return sdedit(jump, x, z, sig, gamma, **kw)
    if edit.task == "invert":
        z = noise[which].to(device)
    return gamma_sample(jump, z, sig, gamma, **kw)


def observation(edit: Edit, noise: Tensor | None) -> Tensor:
    """What the model was given, one image per input at the model's size [M, C, H, W] (model space): the masked
    input (inpaint), the low-resolution input enlarged (superres), the luminance (colorize, grey), the guide noised
    to t0 with draw 0's noise (sdedit), the noise / 3 (invert), input b of each pair (interpolate)."""
    x = edit.inputs
    if edit.task == "inpaint":
        return torch.where(edit.mask.expand_as(x), x, torch.zeros(()))
    if edit.task == "superres":
        return x.repeat_interleave(edit.factor, 2).repeat_interleave(edit.factor, 3)
    if edit.task == "colorize":
        return x.expand(-1, 3, -1, -1)
    if edit.task == "sdedit":
        z = torch.stack([edit_noise(1, len(edit.sigmas) - 1, x.shape[1:], edit.seed, i * edit.n)[0][0]
                         for i in range(len(x))])
        return x + float(edit.sigmas[0]) * z
    if edit.task == "invert":
        return (noise / 3).clamp(-1, 1)
    return x[1::2]


def shown_inputs(edit: Edit) -> Tensor:
    """The inputs as a picture at the model's size (low-resolution inputs enlarged, luminance as grey RGB)."""
    if edit.task in ("superres", "colorize"):
        return observation(edit, None)
    return edit.inputs[0::2] if edit.task == "interpolate" else edit.inputs


def save_edit_grid(edit: Edit, result: dict, path: Path, rows: int = 16, cols: int = 8) -> None:
    """One row per input (interpolate: per pair): input, observation, then up to `cols` results."""
    n = edit.n
    first, second = shown_inputs(edit), result["observation"]
    samples = result["samples"].reshape(-1, n, *result["samples"].shape[1:])
    m, shown = min(rows, len(first)), min(cols, n)
    tiles = [torch.cat([first[i:i + 1], second[i:i + 1], samples[i, :shown]]) for i in range(m)]
    save_image_grid(torch.cat(tiles), path, nrow=2 + shown)


def write_edit(out: Path, card, edit: Edit, result: dict, raw_inputs: np.ndarray) -> list[Path]:
    """OUT.npz: samples (data space, input-major), inputs (as read), labels (conditional models, per sample), noise
    (invert, interpolate: model space, per input), lambdas (interpolate); + OUT.png for images."""
    arrays = {"samples": card.to_data(result["samples"]), "inputs": np.asarray(raw_inputs)}
    if edit.labels is not None:
        per = edit.labels[0::2] if edit.task == "interpolate" else edit.labels
        arrays["labels"] = per.repeat_interleave(edit.n).numpy().astype(np.int64)
    if "noise" in result:
        arrays["noise"] = result["noise"].numpy().astype(np.float32)
    if edit.task == "interpolate":
        arrays["lambdas"] = np.linspace(0, 1, edit.n)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(out), buf.getvalue())
    written = [Path(out)]
    if "observation" in result:
        save_edit_grid(edit, result, Path(out).with_suffix(".png"))
        written.append(Path(out).with_suffix(".png"))
    return written


def _chunks(x: Tensor, labels: Tensor | None, size: int):
    for i in range(0, len(x), size):
        yield x[i:i + size], None if labels is None else labels[i:i + size]


EXAMPLE_INPUTS, EXAMPLE_DRAWS, EXAMPLE_NFE = 16, 4, 4


def edit_examples(model, data, out: Path, classifier=None) -> dict:
    """Zero-shot edits of 16 data items (seed 3) as `ctmkit edit` makes them, NFE 4, gamma 1, 4 draws each, the
    items' own labels for a class-conditional model: the bottom half inpainted (OUT/edit_inpaint.png) and
    super-resolution x2 (OUT/edit_superres.png, when 2 divides the size). Returns per task the RMS error of the
    draws against the originals over the pixels the observation hides (model space) and, with a `classifier`
    (logits of model-space images), the share of draws it assigns to the original's class."""
    idx = data.subset(min(EXAMPLE_INPUTS, len(data)), torch.Generator().manual_seed(3))
    x = data[idx]
    labels = None if data.labels is None else data.labels[idx]
    cond = labels if model.card.num_classes else None
    top = torch.zeros(1, *x.shape[1:], dtype=torch.bool)
    top[..., : x.shape[2] // 2, :] = True
    sigmas = sample_schedule(EXAMPLE_NFE, model.card.sigma_min, model.card.sigma_max)
    tasks = {"inpaint": (x, top, 1, ~top)}
    if x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0:
        tasks["superres"] = (block_mean(x, 2), None, 2, torch.ones_like(top))
    result = {"nfe": EXAMPLE_NFE, "gamma": 1.0, "inputs": len(x), "draws": EXAMPLE_DRAWS}
    for task, (inputs, mask, factor, hidden) in tasks.items():
        edit = Edit(task, inputs, sigmas, 1.0, EXAMPLE_DRAWS, 0, mask, factor, cond)
        res = run_edit(model, edit, progress=False)
        save_edit_grid(edit, res, out / f"edit_{task}.png", rows=len(x), cols=EXAMPLE_DRAWS)
        s = res["samples"]
        err = (s - x.repeat_interleave(EXAMPLE_DRAWS, 0))[hidden.expand_as(x).repeat_interleave(EXAMPLE_DRAWS, 0)]
        row = {"rms_hidden": float(err.pow(2).mean().sqrt())}
        if classifier is not None and labels is not None:
            with torch.no_grad():
                hits = classifier(s).argmax(1) == labels.repeat_interleave(EXAMPLE_DRAWS)
            row["class_agreement"] = float(hits.float().mean())
        result[task] = row
    return result
