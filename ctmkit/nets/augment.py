"""DiffAugment (Zhao et al., 2020) for discriminator inputs: colour, translation and cutout, with the
randomness from a passed-in generator (docs/method.md section 3, step 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    x: Tensor, generator: torch.Generator | None = None, policy: str = "color,translation,cutout",
    cutout_ratio: float = 0.5,
) -> Tensor:
    """Differentiable augmentation (DiffAugment): ``x [B, C, H, W] -> [B, C, H, W]``.

    ``policy`` is a comma-separated subset of ``color``, ``translation`` (up to 1/8 of the size, zero
    padded) and ``cutout`` (a square of ``cutout_ratio`` times the size zeroed; 0.5 by default, 0.2 in the CTM
    reference code). All randomness comes from ``generator``, which must live on ``x.device``; the same
    generator state gives the same output.
    """
    for name in (p.strip() for p in policy.split(",")):
        if not name:
            continue
        if name not in _AUGMENTS:
            raise ValueError(
                f"unknown DiffAugment policy {name!r}; use a comma-separated subset of {sorted(_AUGMENTS)}"
            )
        x = _cutout(x, generator, cutout_ratio) if name == "cutout" else _AUGMENTS[name](x, generator)
    return x
