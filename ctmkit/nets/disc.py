"""Trainable discriminators and DiffAugment for the optional CTM GAN loss (CTM_SPEC section 3 item 7).

The paper uses frozen feature networks with projected heads; their weights are not available offline,
so these are small discriminators trained from scratch, with projection class conditioning
(Miyato & Koyama, 2018) and DiffAugment (Zhao et al., 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from ctmkit.nets.unet import _norm


def _maybe_sn(layer: nn.Module, use: bool) -> nn.Module:
    return _sn(layer) if use else layer


class _ProjectionHead(nn.Module):
    """``h [B, F], labels [B]? -> logits [B]`` = linear(h) + <embed(labels), h>."""

    def __init__(self, features: int, num_classes: int, spectral: bool) -> None:
        super().__init__()
        self.out = _maybe_sn(nn.Linear(features, 1), spectral)
        self.embed = _maybe_sn(nn.Embedding(num_classes, features), spectral) if num_classes > 0 else None

    def forward(self, h: Tensor, labels: Tensor | None) -> Tensor:
        logits = self.out(h).squeeze(1)
        if self.embed is not None and labels is not None:
            logits = logits + (self.embed(labels.long()) * h).sum(dim=1)
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
            layers += [nn.Conv2d(ch, out_ch, 4, stride=2, padding=1), _norm(out_ch), nn.LeakyReLU(0.2)]
            ch, res = out_ch, res // 2  # 4x4 stride-2 pad-1 conv: floor(res / 2)
        self.body = nn.Sequential(*layers)
        features = min(4 * channels, 512)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(ch * res * res, features), nn.LeakyReLU(0.2))
        self.head = _ProjectionHead(features, num_classes, spectral=False)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """``x [B, C, H, W]``, ``labels [B]`` or None -> ``[B]``."""
        return self.head(self.fc(self.body(x)), labels)


def _rand(x: Tensor, generator: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)


def _randint(x: Tensor, generator: torch.Generator | None, low: int, high: int, n: int) -> Tensor:
    return torch.randint(low, high, (n,), generator=generator, device=x.device)


def _color(x: Tensor, gen: torch.Generator | None) -> Tensor:
    b = x.shape[0]
    x = x + (_rand(x, gen, b, 1, 1, 1) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, gen, b, 1, 1, 1) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, gen, b, 1, 1, 1) + 0.5) + mean  # contrast


def _translation(x: Tensor, gen: torch.Generator | None, ratio: float = 0.125) -> Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = _randint(x, gen, -sh, sh + 1, b)
    tx = _randint(x, gen, -sw, sw + 1, b)
    padded = F.pad(x, [sw, sw, sh, sh])  # zero padding
    iy = (torch.arange(h, device=x.device)[None, :] + ty[:, None] + sh)[:, :, None].expand(b, h, w)
    ix = (torch.arange(w, device=x.device)[None, :] + tx[:, None] + sw)[:, None, :].expand(b, h, w)
    bi = torch.arange(b, device=x.device)[:, None, None].expand(b, h, w)
    return padded.permute(0, 2, 3, 1)[bi, iy, ix].permute(0, 3, 1, 2)  # [B, C, H, W]


def _cutout(x: Tensor, gen: torch.Generator | None, ratio: float = 0.5) -> Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    y0 = _randint(x, gen, 0, h + (1 - ch % 2), b) - ch // 2  # top-left corner; may hang off the edge
    x0 = _randint(x, gen, 0, w + (1 - cw % 2), b) - cw // 2
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= y0[:, None]) & (ys < y0[:, None] + ch)  # [B, H]
    in_x = (xs >= x0[:, None]) & (xs < x0[:, None] + cw)  # [B, W]
    keep = ~(in_y[:, :, None] & in_x[:, None, :])  # [B, H, W]
    return x * keep[:, None].to(x.dtype)


_AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(
    x: Tensor, generator: torch.Generator | None = None, policy: str = "color,translation,cutout"
) -> Tensor:
    """Differentiable augmentation (DiffAugment): ``x [B, C, H, W] -> [B, C, H, W]``.

    ``policy`` is a comma-separated subset of ``color``, ``translation`` (up to 1/8 of the size, zero
    padded) and ``cutout`` (a half-size square zeroed). All randomness comes from ``generator``, which
    must live on ``x.device``; the same generator state gives the same output.
    """
    for name in (p.strip() for p in policy.split(",")):
        if not name:
            continue
        if name not in _AUGMENTS:
            raise ValueError(
                f"unknown DiffAugment policy {name!r}; use a comma-separated subset of {sorted(_AUGMENTS)}"
            )
        x = _AUGMENTS[name](x, generator)
    return x
