"""Noise-level embeddings shared by the CTM backbones (Kim et al., ICLR 2024, section 2).

Backbones receive ``c_noise(t) = ln(t) / 4`` (EDM) for the start time ``t`` and, for CTM, a second
``c_noise(s)`` for the end time ``s``; each goes through a Fourier embedding and a small MLP.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_FOURIER_SEED = 0  # fixed so that every instance (teacher, student, EMA copies) draws the same frequencies


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar: ``c_noise [B] -> [B, num_channels]`` = cat(cos, sin)."""

    freqs: Tensor

    def __init__(self, num_channels: int, scale: float = 1.0) -> None:
        super().__init__()
        if num_channels <= 0 or num_channels % 2:
            raise ValueError(f"FourierEmbedding needs a positive even num_channels, got {num_channels}")
        gen = torch.Generator().manual_seed(_FOURIER_SEED)
        self.register_buffer("freqs", torch.randn(num_channels // 2, generator=gen) * scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        """``c_noise [B]`` -> ``[B, num_channels]``."""
        angle = (2 * math.pi) * c_noise.reshape(-1, 1).to(self.freqs.dtype) * self.freqs  # [B, C/2]
        return torch.cat([angle.cos(), angle.sin()], dim=1)


class TimeEmbedding(nn.Module):
    """Fourier features then Linear-SiLU-Linear: ``c_noise [B] -> [B, emb_dim]``.

    ``zero_out=True`` zero-initialises the last Linear so the embedding is exactly 0 at init (used for
    the CTM ``s`` input, so a student copied from a teacher starts out ignoring ``s``).
    """

    def __init__(self, emb_dim: int, fourier_channels: int = 64, zero_out: bool = False,
                 fourier_scale: float = 1.0) -> None:
        super().__init__()
        self.fourier = FourierEmbedding(fourier_channels, fourier_scale)
        self.fc1 = nn.Linear(fourier_channels, emb_dim)
        self.fc2 = nn.Linear(emb_dim, emb_dim)
        if zero_out:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, c_noise: Tensor) -> Tensor:
        """``c_noise [B]`` -> ``[B, emb_dim]``."""
        h = self.fourier(c_noise).to(self.fc1.weight.dtype)
        return self.fc2(nn.functional.silu(self.fc1(h)))


def add_label_embedding(emb: Tensor, table: nn.Embedding | None, labels: Tensor | None) -> Tensor:
    """emb + the class embedding of each sample's label (int [B]); the null label -1 (classifier-free guidance,
    core/guidance.py) adds nothing. A class-conditional network refuses labels=None (an unconditional one ignores
    labels)."""
    if table is None:
        return emb
    if labels is None:
        raise ValueError(f"this network is conditioned on {table.num_embeddings} classes: pass labels [B] (int64; "
                         "-1 is the null label)")
    labels = labels.reshape(-1).long()
    keep = labels >= 0
    e = table(labels.clamp_min(0))
    return emb + (e if bool(keep.all()) else torch.where(keep[:, None], e, torch.zeros_like(e)))


def add_guidance_embedding(emb: Tensor, table: nn.Module | None, w: Tensor | None) -> Tensor:
    """emb + the embedding of each sample's guidance scale w [B] (a CTM distilled for a range of scales,
    ctm.guidance=[lo, hi]); w=None adds nothing. A network without a w input refuses one."""
    if w is None:
        return emb
    if table is None:
        raise ValueError("this network has no guidance-scale input (it was not distilled for a range of scales)")
    return emb + table(w.reshape(-1).expand(emb.shape[0]).float()).to(emb.dtype)
