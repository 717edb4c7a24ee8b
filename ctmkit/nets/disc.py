"""The small trainable discriminators of the CTM GAN loss (docs/method.md section 3, step 7): `ctm.discriminator=small`,
the default.

The paper's discriminator trains heads on frozen pretrained feature networks (projected.py, from weight files the
user brings); these are small discriminators trained from scratch, with projection class conditioning
(Miyato & Koyama, 2018); DiffAugment (Zhao et al., 2020) on their inputs lives in augment.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from ctmkit.nets.unet import group_norm


def _maybe_sn(layer: nn.Module, use: bool) -> nn.Module:
    return _sn(layer) if use else layer


class _ProjectionHead(nn.Module):
    """``h [B, F], labels [B]? -> logits [B]`` = linear(h) + <embed(labels), h> (nothing for the null label -1)."""

    def __init__(self, features: int, num_classes: int, spectral: bool) -> None:
        super().__init__()
        self.out = _maybe_sn(nn.Linear(features, 1), spectral)
        self.embed = _maybe_sn(nn.Embedding(num_classes, features), spectral) if num_classes > 0 else None

    def forward(self, h: Tensor, labels: Tensor | None) -> Tensor:
        logits = self.out(h).squeeze(1)
        if self.embed is not None and labels is not None:
            lab = labels.long()
            proj = (self.embed(lab.clamp_min(0)) * h).sum(dim=1)
            keep = lab >= 0                                 # the null label -1 (guidance): no projection term
            logits = logits + (proj if bool(keep.all()) else torch.where(keep, proj, torch.zeros_like(proj)))
        return logits


class VectorDiscriminator(nn.Module):
    """MLP discriminator with LeakyReLU(0.2): ``x [B, D], labels [B]? -> logits [B]``."""

    def __init__(
        self, dim: int, hidden: int = 256, depth: int = 3, num_classes: int = 0, spectral: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = dim
        for _ in range(max(1, depth)):
            layers += [_maybe_sn(nn.Linear(d, hidden), spectral), nn.LeakyReLU(0.2)]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = _ProjectionHead(hidden, num_classes, spectral)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """``x [B, D]``, ``labels [B]`` or None -> ``[B]``."""
        return self.head(self.body(x.flatten(1)), labels)


class ImageDiscriminator(nn.Module):
    """Conv discriminator: 4x4 stride-2 convs (GroupNorm, LeakyReLU(0.2)) down to <= 4x4, then linear.

    ``x [B, C, H, W], labels [B]? -> logits [B]``; channels double per level up to ``8 * channels``.
    """

    def __init__(self, in_channels: int, resolution: int, channels: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1), nn.LeakyReLU(0.2)]
        ch, res = channels, resolution
        while res > 4:
            out_ch = min(2 * ch, 8 * channels)
            layers += [nn.Conv2d(ch, out_ch, 4, stride=2, padding=1), group_norm(out_ch), nn.LeakyReLU(0.2)]
            ch, res = out_ch, res // 2  # 4x4 stride-2 pad-1 conv: floor(res / 2)
        self.body = nn.Sequential(*layers)
        features = min(4 * channels, 512)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(ch * res * res, features), nn.LeakyReLU(0.2))
        self.head = _ProjectionHead(features, num_classes, spectral=False)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """``x [B, C, H, W]``, ``labels [B]`` or None -> ``[B]``."""
        return self.head(self.fc(self.body(x)), labels)
