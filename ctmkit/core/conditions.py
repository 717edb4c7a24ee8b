"""Text conditions: what a prompt-conditioned (latent) teacher takes where a class-conditional one takes labels
(docs/method.md section 9).

A denoiser's third argument is its condition: int64 class labels [B] (-1 = null), None (unconditional), or a
`TextCond`, the prompt embeddings of a batch with their null condition carried along. The null condition of a text
model is the empty prompt's embedding (or a negative prompt's), the same row for every sample, so a `TextCond` holds
it once and classifier-free guidance (core/guidance.py) needs nothing but the condition itself:
`cond.null()` is the batch with every sample null, `cond.drop(mask)` nulls some samples (label dropout).
Samplers only pass the condition on, index it (`cond[idx]`) and move it (`cond.to(device)`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class TextCond:
    """A batch of text conditions: `embeds` [B, L, D] (the text encoders' token embeddings), `null_embeds` [L, D]
    (the empty or negative prompt's), and for models that also take a pooled embedding `pooled` [B, P] with
    `null_pooled` [P]."""

    embeds: Tensor
    null_embeds: Tensor
    pooled: Tensor | None = None
    null_pooled: Tensor | None = None

    def __post_init__(self) -> None:
        if self.embeds.ndim != 3 or tuple(self.null_embeds.shape) != tuple(self.embeds.shape[1:]):
            raise ValueError(f"TextCond needs embeds [B, L, D] and null_embeds [L, D], got "
                             f"{tuple(self.embeds.shape)} and {tuple(self.null_embeds.shape)}")
        if (self.pooled is None) != (self.null_pooled is None) or (
                self.pooled is not None and (self.pooled.ndim != 2 or len(self.pooled) != len(self.embeds)
                                             or self.null_pooled.shape != self.pooled.shape[1:])):
            raise ValueError("TextCond's pooled [B, P] and null_pooled [P] come together, one row per sample")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, idx) -> TextCond:
        """The conditions of some samples (any index of a batch dimension)."""
        pooled = None if self.pooled is None else self.pooled[idx]
        return replace(self, embeds=self.embeds[idx], pooled=pooled)

    def to(self, *args, **kwargs) -> TextCond:
        """Every tensor moved or cast (torch's Tensor.to arguments)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(*args, **kwargs)
        return TextCond(move(self.embeds), move(self.null_embeds), move(self.pooled), move(self.null_pooled))

    def drop(self, mask: Tensor) -> TextCond:
        """Samples where mask [B] (bool) is True take the null condition; the others keep theirs."""
        m = mask.to(self.embeds.device).reshape(-1, 1, 1)
        embeds = torch.where(m, self.null_embeds.to(self.embeds.dtype), self.embeds)
        pooled = None if self.pooled is None else torch.where(m[:, :, 0], self.null_pooled.to(self.pooled.dtype),
                                                              self.pooled)
        return replace(self, embeds=embeds, pooled=pooled)

    def null(self) -> TextCond:
        """The null condition for every sample of the batch."""
        return self.drop(torch.ones(len(self), dtype=torch.bool))
