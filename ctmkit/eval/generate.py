"""Sampling a loaded model in batches with per-sample seeds, and writing samples in the data's own space."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.sampling import gamma_sample, heun_sample, per_sample_normal, sample_schedule, two_jump_sample
from ..core.schedules import karras_sigmas
from ..errors import UserError
from ..io.atomic import atomic_file
from ..io.card import ModelCard
from ..progress import progress_bar
from .guide import guided_callables
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
             sampler: str = "auto", progress: bool | None = True, ts=None, two_jump=None,
             guidance: float | None = None) -> Tensor:
    """Model-space samples [n, ...] from a teacher (Heun) or a CTM (gamma-sampling, or Heun with its denoiser);
    noise is per-sample seeded, so it does not depend on batch_size (results agree to float round-off). `ts`:
    custom times t_0 > ... > t_K instead of the default schedule for `nfe` (gamma-sampling jumps between them; Heun
    steps along them).
    `two_jump` (i1, i2, N): the reference's two-jump sampler on the N-point training grid (a CTM, NFE 2).
    `guidance`: the classifier-free guidance scale w (eval/guide.py; None: the model's own, 1 for an unguided one,
    which samples it exactly as without guidance)."""
    lab = None if labels is None else (lambda start, b: labels[start:start + b])
    out = list(generate_batches(model, n, nfe, gamma, seed, lab, batch_size, sampler, progress, ts, two_jump,
                                guidance=guidance))
    return torch.cat(out)


def generate_batches(model, n: int, nfe: int | None, gamma: float, seed: int, labels=None, batch_size: int = 500,
                     sampler: str = "auto", progress: bool | None = True, ts=None, two_jump=None, transform=None,
                     guidance: float | None = None):
    """`generate` one batch at a time (bounded memory): yields model-space batches on the CPU, in order.
    `labels(start, b)` gives the labels of samples start .. start + b - 1 (None: unconditional). `transform(x)`:
    applied to each batch by the process that made it (under torchrun, before the gather), yielded instead.
    `guidance`: see `generate` (a UserError, before any sampling, where the model cannot be guided at that scale)."""
    card = model.card
    nets = guided_callables(model, guidance, card.is_ctm)     # (jump, denoiser): the model's own at w = 1
    sigmas = None if ts is None else check_times(ts, card.sigma_min, card.sigma_max)
    if sigmas is not None:
        nfe = len(sigmas) - 1
    shape, is_ctm = card.shape, card.is_ctm
    grid = None
    if two_jump is not None:
        grid = check_two_jump(two_jump, is_ctm, sampler, card.sigma_min, card.sigma_max)
        sampler, nfe = "two_jump", 2
    sampler, nfe = _check_sampler(sampler, nfe, gamma, is_ctm)
    device = model_device(model)

    def batch(start: int) -> Tensor:
        b = min(batch_size, n - start)
        z = per_sample_normal(b, (nfe,) + shape, seed, start).to(device)  # [b, nfe, ...]: start + re-noise
        lab = labels(start, b).to(device) if labels is not None else None
        mine = _sample_batch(model, nets, z, lab, sampler, nfe, gamma, sigmas, grid, two_jump).cpu()
        return mine if transform is None else transform(mine)

    with torch.no_grad():
        yield from sharded(range(0, n, batch_size), batch, f"sampling {sampler} nfe={nfe}", progress)


def sharded(items, fn, desc: str, progress: bool | None = True):
    """fn(item) for each of `items`, yielded in order. Under torchrun item k runs on rank k mod world (with the
    shapes one process uses) and every rank gets every result (one all_gather_object a round); alone, in turn."""
    rank, world = _shard()
    for r in progress_bar(range(0, len(items), world), desc=desc, enabled=progress and rank == 0):
        mine = fn(items[r + rank]) if r + rank < len(items) else None
        if world == 1:
            yield mine
            continue
        got = [None] * world
        torch.distributed.all_gather_object(got, mine)     # every rank gets the round's results, in order
        yield from (x for x in got if x is not None)


def _shard() -> tuple[int, int]:
    """(rank, world) of a torchrun job whose process group is up, else (0, 1): sampling splits its batches over
    the ranks (per-sample seeds: the samples do not depend on the number of processes)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _check_sampler(sampler: str, nfe: int | None, gamma: float, is_ctm: bool) -> tuple[str, int]:
    if sampler == "auto":
        sampler = "gamma" if is_ctm else "heun"
    if sampler == "gamma" and not is_ctm:
        raise UserError("--sampler gamma needs a CTM model; a teacher samples with heun")
    nfe = (1 if sampler == "gamma" else 35) if nfe is None else nfe
    if nfe < 1:
        raise UserError(f"--nfe must be >= 1, got {nfe}")
    if not 0 <= gamma <= 1:
        raise UserError(f"--gamma must be in [0, 1], got {gamma}")
    return sampler, nfe


def _sample_batch(model, nets: tuple, z: Tensor, lab, sampler: str, nfe: int, gamma: float, sigmas, grid,
                  two_jump) -> Tensor:
    """One batch; nets = (jump, denoiser) from guided_callables (the model and its denoiser when unguided)."""
    card = model.card
    smin, smax = card.sigma_min, card.sigma_max
    jump, den = nets
    if sampler == "two_jump":
        return two_jump_sample(jump, z[:, 0], grid, two_jump[0], two_jump[1], lab, z[:, 1])
    if sampler == "gamma":
        sched = sample_schedule(nfe, smin, smax) if sigmas is None else sigmas
        return gamma_sample(jump, z[:, 0], sched, gamma, labels=lab, step_noise=z[:, 1:],
                            sigma_min=None if sigmas is None else smin)   # gamma's offset: the model's sigma_min
    return heun_sample(den, z[:, 0], sigmas, nfe=nfe, labels=lab, sigma_max=smax, sigma_min=smin)


def sample_bytes(card: ModelCard, n: int, labelled: bool) -> int:
    """Bytes of n samples written as .npz in the data's own dtype (+ int64 labels), headers aside."""
    item = 1 if card.data.normalizer.get("dtype") == "uint8" else 4
    per = int(np.prod(card.shape)) * item + (8 if labelled else 0)
    return n * per


def check_disk(out: Path, need: int) -> None:
    """UserError when the folder of `out` has less free space than `need` bytes (with 1 % and 16 MB to spare)."""
    free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
    if need * 1.01 + 16e6 > free:
        raise UserError(f"the samples need about {_size(need)} in '{out.parent}', which has {_size(free)} free; "
                        "ask for fewer (--num-samples) or write elsewhere")


def _size(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} PB"


def stream_samples(batches, n: int, labels, card: ModelCard, out: Path, grid_max: int = 256) -> list[Path]:
    """Write `batches` (model space, in order) to FILE.npz as they come, in the data's own space (bounded memory:
    one batch at a time), with labels(start, b) when given; a PNG of the first `grid_max` beside it (images, 2-D).
    FILE.png alone: only the grid (the first `grid_max` samples are drawn)."""
    out = Path(out)
    first, written, start = [], [], 0
    if out.suffix == ".npz":
        with atomic_file(out) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("samples.npy", "w", force_zip64=True) as member:
                for x in batches:
                    data = card.to_data(x)     # what ModelCard.to_data gives a user of gamma_sample
                    if start == 0:
                        _npy_header(member, (n, *data.shape[1:]), data.dtype)
                    member.write(np.ascontiguousarray(data).tobytes())
                    if sum(len(v) for v in first) < grid_max:
                        first.append(x[:grid_max])
                    start += x.shape[0]
            if labels is not None:
                with zf.open("labels.npy", "w", force_zip64=True) as member:
                    _npy_header(member, (n,), np.dtype(np.int64))
                    for s in range(0, n, 1 << 20):
                        member.write(labels(s, min(1 << 20, n - s)).numpy().astype(np.int64).tobytes())
        written.append(out)
    else:
        for x in batches:
            first.append(x)
            if sum(len(v) for v in first) >= grid_max:
                break
    return written + _preview(torch.cat(first)[:grid_max] if first else None, card, out.with_suffix(".png"))


def sample_files(card: ModelCard, out: Path) -> list[Path]:
    """The files `stream_samples` writes for `out`: FILE.npz and the PNG beside it (images and 2-D vectors), or
    FILE.png alone."""
    out = Path(out)
    preview = [out.with_suffix(".png")] if has_preview(card) else []
    return ([out] if out.suffix == ".npz" else []) + preview


def has_preview(card: ModelCard) -> bool:
    """Samples of this model get a picture: a grid of images, or a scatter plot of 2-D vectors."""
    return card.data.kind == "image" or tuple(card.shape) == (2,)


def _npy_header(f, shape: tuple, dtype) -> None:
    np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(int(v) for v in shape)})


def _preview(x: Tensor | None, card: ModelCard, png: Path) -> list[Path]:
    if x is None or not has_preview(card):
        return []
    if card.data.kind == "image":
        save_image_grid(x, png)
    else:
        save_scatter([("samples", x.cpu().numpy())], png)
    return [png]


def model_device(model) -> torch.device:
    """The device of a model's parameters (the CPU for a parameter-free denoiser such as an exact mixture)."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")
