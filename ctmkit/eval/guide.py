"""Which callables sample a model at guidance scale w (core/guidance.py; docs/method.md section 8), with one clear
error where it cannot be done:

- a teacher (or the exact labelled mixture): Heun on the guided denoiser D_w, which needs a null branch (w = 1 aside);
- a CTM distilled unguided: guided jumps G_w and the guided denoiser g_w(x, t, t) (a null branch needed);
- a CTM distilled for one scale W: its own jumps, at w = W only;
- a CTM distilled for a range [lo, hi]: its jumps with the scale fed to its w input, lo <= w <= hi.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core.guidance import check_scale, guided
from ..errors import UserError


def null_branch(model) -> bool:
    """The model has a null branch (label -1): a card that says so, or the exact labelled mixture."""
    card = getattr(model, "card", None)
    if card is not None:
        return card.null_branch
    return getattr(model, "num_classes", 0) > 0


def scale_of(model) -> tuple[float, ...]:
    """The scale(s) a CTM was distilled for ((1.0,): unguided)."""
    card = getattr(model, "card", None)
    return (1.0,) if card is None else card.guidance_scale


def resolve_scale(model, w: float | None) -> float:
    """The scale to sample at: w, checked against the model; None = the model's own (1 unguided, W for a one-scale
    student; a range student needs one)."""
    trained = scale_of(model)
    if w is None:
        if len(trained) == 2:
            raise UserError(f"this CTM was distilled for guidance scales {trained[0]:g}..{trained[1]:g}: give "
                            "--guidance W in that range")
        return trained[0]
    try:
        w = check_scale(w)
    except ValueError as e:
        raise UserError(str(e)) from None
    if len(trained) == 2 and not trained[0] <= w <= trained[1]:
        raise UserError(f"--guidance {w:g} is outside this CTM's trained range {trained[0]:g}..{trained[1]:g}")
    if len(trained) == 1 and trained[0] != 1 and w != trained[0]:
        raise UserError(f"this CTM was distilled for guidance {trained[0]:g} only; --guidance {w:g} needs a CTM "
                        f"distilled for it (ctm.guidance={w:g}) or for a range (ctm.guidance=[lo, hi])")
    if len(trained) == 1 and trained[0] == 1 and w != 1 and not null_branch(model):
        raise UserError(f"--guidance {w:g} needs a model with a null branch (trained with label_dropout > 0, see "
                        "`ctmkit train-teacher --help`, or diffusers:DIR?null_class=K); this one has none")
    return w


def guided_callables(model, w: float | None, is_ctm: bool) -> tuple[Callable | None, Callable]:
    """(jump G(x, t, s, labels) or None for a teacher, denoiser D(x, sigma, labels)) at scale w (see resolve_scale)."""
    w = resolve_scale(model, w)
    if not is_ctm:
        return None, guided(model, w)
    if len(scale_of(model)) == 2:
        def jump(x, t, s, labels):
            return model(x, t, s, labels, w=_full(w, x))

        def denoise(x, sigma, labels):
            return model.denoise(x, sigma, labels, w=_full(w, x))

        return jump, denoise
    if scale_of(model)[0] != 1:
        return model, model.denoise
    return guided(model, w), guided(model.denoise, w)


def _full(w: float, x) -> torch.Tensor:
    return torch.full((x.shape[0],), w, device=x.device, dtype=torch.float32)
