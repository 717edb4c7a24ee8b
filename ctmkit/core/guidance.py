"""Classifier-free guidance (Ho & Salimans 2022; docs/method.md section 8).

The guided denoiser, with the null condition: the label -1 (NULL_LABEL, per sample) for class labels, the empty
(or negative) prompt's embedding for a text condition (core/conditions.py: TextCond.null):
    D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null))
w = 1 is plain conditional sampling (the null branch is skipped, so unguided numbers stay bitwise), w = 0
unconditional (the diffusers `guidance_scale` convention).

The same combination applied to a CTM jump is guidance on the jump's denoiser part g: with
G(x, t, s) = (s/t) x + (1 - s/t) g and weights that sum to one,
    G_null + w (G_c - G_null) = (s/t) x + (1 - s/t) (g_null + w (g_c - g_null)).
For s < t this is a heuristic (the jump of the guided ODE is not the guided jump); bench/RESULTS.md measures it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .conditions import TextCond
from .precond import bcast

NULL_LABEL = -1


def null_labels(labels: Tensor | TextCond) -> Tensor | TextCond:
    """The null condition for every sample of a condition batch: labels [B] -> -1s, a TextCond -> its null."""
    if isinstance(labels, TextCond):
        return labels.null()
    return torch.full_like(labels, NULL_LABEL)


def check_scale(w: float) -> float:
    """A guidance scale: a finite number >= 0 (ValueError otherwise)."""
    w = float(w)
    if not w >= 0 or w == float("inf"):
        raise ValueError(f"the guidance scale must be a number >= 0, got {w:g}")
    return w


def is_unguided(w) -> bool:
    """True for w = 1 (a float, or a tensor of ones): the plain conditional model."""
    return bool((torch.as_tensor(w) == 1).all())


def combine(out_c: Tensor, out_null: Tensor, w: float | Tensor) -> Tensor:
    """out_null + w (out_c - out_null); w a float or a per-sample Tensor[B]."""
    if torch.is_tensor(w):
        w = bcast(w.to(out_c.device, out_c.dtype), out_c)
    return out_null + w * (out_c - out_null)


def guided(fn: Callable, w: float | Tensor) -> Callable:
    """The guided version of fn(*args, labels) (a denoiser D(x, sigma, labels) or a CTM jump G(x, t, s, labels)):
    fn itself at w = 1, else the two-branch combination above. Needs a condition: labels (class indices, -1 = null)
    or a TextCond."""
    if is_unguided(w):
        return fn
    if not torch.is_tensor(w):
        check_scale(w)

    def fn_w(*args):
        *head, labels = args
        if labels is None:
            raise ValueError("guidance needs a condition: class labels (int64 [B]; -1 is the null label) or a "
                             "TextCond (a text teacher's encode_prompt)")
        return combine(fn(*head, labels), fn(*head, null_labels(labels)), w)

    return fn_w
