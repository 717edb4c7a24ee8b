"""The inputs of `ctmkit edit`, read and checked against the model before any work: the inputs themselves (any data
SPEC, in the data's own units), the inpainting mask, the labels and the jump schedule. Every refusal is one
UserError line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.sampling import sample_schedule
from ..data import load_data
from ..data.normalize import Normalizer
from ..errors import UserError
from .generate import check_times


def expected_shape(task: str, card, factor: int | None) -> tuple[int, ...]:
    """The model-space shape of one input of `task`: the model's, the low-resolution one (superres) or one channel
    (colorize); refuses a task the model cannot run."""
    shape = tuple(card.shape)
    if task in ("superres", "colorize") and card.data.kind != "image":
        raise UserError(f"--task {task} needs an image model; this one takes vectors of shape {shape}")
    if task == "colorize":
        if shape[0] != 3:
            raise UserError(f"--task colorize needs an RGB model (3 channels); this one has {shape[0]}")
        return (1, *shape[1:])
    if task == "superres":
        if shape[1] % factor or shape[2] % factor:
            raise UserError(f"--factor {factor} does not divide the model's image size {shape[1]}x{shape[2]}")
        return (shape[0], shape[1] // factor, shape[2] // factor)
    return shape


def read_inputs(spec: str, card, task: str, factor: int | None, limit: int | None
                ) -> tuple[np.ndarray, Tensor, Tensor | None, str]:
    """(the inputs as read [M, ...] in the data's own layout, model space [M, ...], their labels or None, their
    layout: ND, NHW, NHWC or NCHW)."""
    data = load_data(spec, n=limit)
    if len(data) == 0:
        raise UserError(f"'{spec}' holds no inputs")
    raw = np.asarray(data.raw(np.arange(len(data))).numpy())
    want = expected_shape(task, card, factor)
    norm = Normalizer.from_dict(card.data.normalizer)
    if data.kind != card.data.kind:
        raise UserError(f"'{spec}' holds {data.kind}s, but the model takes {card.data.kind}s of shape {card.shape}")
    if data.kind == "image":
        lo, hi = float(raw.min()), float(raw.max())
        if lo < norm.lo or hi > norm.hi:
            raise UserError(f"the inputs' values span [{lo:g}, {hi:g}], outside the model's data range "
                            f"[{norm.lo:g}, {norm.hi:g}]: give them in the data's own units")
        norm = Normalizer("image", data.normalizer.layout, norm.dtype, lo=norm.lo, hi=norm.hi)
    if tuple(data.shape) != want:
        what = {"superres": f"images of 1/{factor} the model's size", "colorize": "1-channel (luminance) images"}
        raise UserError(f"the inputs have shape {tuple(data.shape)} (channels first); --task {task} needs {want}"
                        + (f" ({what[task]})" if task in what else ""))
    if task == "interpolate" and len(raw) % 2:
        raise UserError(f"--task interpolate takes the inputs in pairs; '{spec}' holds {len(raw)}")
    return raw, norm.to_model(raw), data.labels, data.normalizer.layout


def read_mask(path: str, raw: np.ndarray, layout: str) -> Tensor:
    """The inpainting mask (1 = known) from a .npy or a grey image file, in the inputs' data layout (`layout`),
    broadcast to them: a bool model-space tensor [M, ...]."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"mask file '{path}' does not exist")
    if p.suffix.lower() == ".npy":
        try:
            m = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"cannot read mask '{path}' ({e})") from None
        if m.dtype == bool:
            m = m.astype(np.uint8)
        if m.size == 0 or not np.isin(m, (0, 1)).all():
            raise UserError(f"mask '{path}' must hold 0 (unknown) and 1 (known) only")
    else:
        from PIL import Image
        try:
            m = (np.asarray(Image.open(p).convert("L")) > 127).astype(np.uint8)
        except OSError as e:
            raise UserError(f"cannot read mask '{path}' as an image ({e})") from None
    if layout == "NHWC" and m.ndim == 2:          # [H, W] covers every channel of [N, H, W, C] images
        m = m[..., None]
    try:
        full = np.broadcast_to(m, raw.shape)
    except ValueError:
        raise UserError(f"the mask's shape {m.shape} does not broadcast to the inputs' shape {raw.shape} "
                        "(data layout)") from None
    if layout == "ND":
        return torch.from_numpy(full.copy()).bool()
    as_image = Normalizer("image", layout, "float32", lo=0.0, hi=1.0)    # the inputs' layout -> [M, C, H, W]
    return as_image.to_model_batch(torch.from_numpy(full.astype(np.float32))) > 0


def resolve_labels(spec: str | None, num_classes: int, data_labels: Tensor | None, m: int) -> Tensor | None:
    """Labels [M] for a conditional model: --labels (one for all, or one per input), else the inputs' own; None
    for an unconditional model."""
    if num_classes == 0:
        if spec:
            raise UserError("--labels given, but the model is not class-conditional")
        return None
    if spec:
        try:
            vals = torch.tensor([int(v) for v in spec.split(",") if v.strip()])
        except ValueError:
            raise UserError(f"--labels must be comma-separated integers, got '{spec}'") from None
        if len(vals) not in (1, m):
            raise UserError(f"--labels needs one class or one per input ({m}), got {len(vals)}")
        vals = vals.expand(m) if len(vals) == 1 else vals
    elif data_labels is not None:
        vals = torch.as_tensor(data_labels[:m], dtype=torch.int64)
    else:
        raise UserError(f"the model is class-conditional ({num_classes} classes) and the inputs carry no labels: "
                        f"give --labels")
    bad = [int(v) for v in vals if not 0 <= v < num_classes]
    if bad:
        raise UserError(f"label {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    return vals.clone()


def edit_schedule(task: str, card, nfe: int | None, ts, t0: float | None) -> Tensor:
    """The jump times: --ts (checked against the model's sigma range), else the Karras grid of `nfe` jumps from
    sigma_max (sdedit: from t0, which must lie in the model's range) to sigma_min."""
    lo, hi = card.sigma_min, card.sigma_max
    if ts is not None:
        return check_times(ts, lo, hi)
    nfe = nfe or ((4 if task not in ("invert", "interpolate") else 1) if card.is_ctm else 18)
    if task == "sdedit":
        if not lo < t0 <= hi * (1 + 1e-6):
            raise UserError(f"--t0 {t0:g} is outside the model's sigma range ({lo:g}, {hi:g}]")
        return sample_schedule(nfe, lo, min(t0, hi))
    return sample_schedule(nfe, lo, hi)
