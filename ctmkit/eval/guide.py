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
    """The model has a null branch (label -1): a card that says so, a py: teacher's label_dropout > 0, or the exact
    labelled mixture."""
    card = getattr(model, "card", None)
    if card is not None:
        return card.null_branch
    if hasattr(model, "label_dropout"):               # a py: teacher without a card: its own attribute
        return model.num_classes > 0 and model.label_dropout > 0
    return getattr(model, "num_classes", 0) > 0


def scale_of(model) -> tuple[float, ...]:
    """The scale(s) a CTM was distilled for ((1.0,): unguided)."""
    return tuple(getattr(getattr(model, "card", None), "guidance_scale", (1.0,)))


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
        raise UserError(no_null_branch(model, w))
    return w


def no_null_branch(model, w: float) -> str:
    """Why `model` cannot be guided at w: it is not class-conditional, or has no null branch (how to get one)."""
    card = getattr(model, "card", None)
    kind = {"ctm": "CTM"}.get(getattr(card, "kind", "teacher"), getattr(card, "kind", "teacher"))
    if not (card.conditional if card is not None else getattr(model, "num_classes", 0) > 0):
        return f"--guidance {w:g} needs a class-conditional model; this {kind} is unconditional"
    how = ("distil it from a teacher that has one, with ctm.label_dropout > 0" if kind == "CTM" else
           "train it with label_dropout > 0, see `ctmkit train-teacher --help`; a diffusers teacher: name its null "
           "class, diffusers:DIR?null_class=K")
    return f"--guidance {w:g} needs a null branch (the label -1): this {kind} has none ({how})"


def guided_callables(model, w: float | None, is_ctm: bool) -> tuple[Callable | None, Callable]:
    """(jump G(x, t, s, labels) or None for a teacher, denoiser D(x, sigma, labels)) at scale w (see resolve_scale)."""
    w = resolve_scale(model, w)
    if not is_ctm:
        return None, guided(model, w)
    return _ctm_callable(model, w, model), _ctm_callable(model, w, model.denoise)


def guided_jump(model, w: float | None) -> Callable:
    """A CTM's jump G(x, t, s, labels) at scale w (see resolve_scale): the model itself at w = 1 (unguided)."""
    return _ctm_callable(model, resolve_scale(model, w), model)


def guided_part(model, w: float | None, fn: Callable) -> Callable:
    """A part of a CTM, fn(x, ..., labels, w=None) (its jump, denoiser or g), at scale w (see resolve_scale): fn
    itself, fed w (a range student), or the two-branch combination (a CTM with a null branch)."""
    return _ctm_callable(model, resolve_scale(model, w), fn)


def _ctm_callable(model, w: float, fn: Callable) -> Callable:
    """fn, a part of the CTM `model`, at the checked scale w."""
    if len(scale_of(model)) == 2:
        def fn_w(x, *args):
            return fn(x, *args, w=_full(w, x))

        return fn_w
    if scale_of(model)[0] != 1:
        return fn
    return guided(fn, w)


def _full(w: float, x) -> torch.Tensor:
    return torch.full((x.shape[0],), w, device=x.device, dtype=torch.float32)
