"""MLP backbone for vector data: F(x, c_noise(t), c_noise(s), labels) with residual blocks.

Time t and (for CTM students) time s enter through Fourier embeddings added together (docs/method.md section 2);
the s embedding's last layer starts at zero, so a student copied from a teacher starts as that teacher."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dropout import Dropout
from .embed import TimeEmbedding, add_guidance_embedding, add_label_embedding


class ResBlock(nn.Module):
    """h + W2 SiLU(W1 SiLU(LN h) + P emb): a pre-norm residual block conditioned on the embedding."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1, self.emb = nn.Linear(hidden, hidden), nn.Linear(emb_dim, hidden)
        self.fc2, self.drop = nn.Linear(hidden, hidden), Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        a = torch.nn.functional.silu(self.fc1(torch.nn.functional.silu(self.norm(h))) + self.emb(emb))
        return h + self.fc2(self.drop(a))


class MLP(nn.Module):
    """Backbone for x [B, D]: forward(x, noise_t [B], noise_s [B] | None, labels [B] | None, w [B] | None) -> [B, D].
    `guidance_embed`: a zero-initialised embedding of the guidance scale w (a range-guided CTM student)."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, emb_dim: int = 128, dropout: float = 0.0,
                 num_classes: int = 0, fourier_scale: float = 1.0, guidance_embed: bool = False):
        super().__init__()
        self.t_embed = TimeEmbedding(emb_dim, fourier_scale=fourier_scale)
        self.s_embed = TimeEmbedding(emb_dim, zero_out=True, fourier_scale=fourier_scale)
        self.w_embed = TimeEmbedding(emb_dim, zero_out=True) if guidance_embed else None
        self.label_embed = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden, emb_dim, dropout) for _ in range(depth))
        self.out_norm, self.out = nn.LayerNorm(hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor, noise_t: Tensor, noise_s: Tensor | None = None,
                labels: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        emb = self.t_embed(noise_t)
        if noise_s is not None:
            emb = emb + self.s_embed(noise_s)
        emb = add_guidance_embedding(add_label_embedding(emb, self.label_embed, labels), self.w_embed, w)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(torch.nn.functional.silu(self.out_norm(h)))

    def last_layer(self) -> nn.Parameter:
        return self.out.weight
