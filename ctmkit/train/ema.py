"""Exponential moving averages of network weights: the CTM target network theta^- and the evaluation EMAs."""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """theta_ema <- rate * theta_ema + (1 - rate) * theta (buffers copied)."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - rate)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with gradients off (an EMA's starting point)."""
    m = copy.deepcopy(model).eval()
    m.requires_grad_(False)
    return m
