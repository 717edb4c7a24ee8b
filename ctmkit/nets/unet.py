"""Image backbone ``F_theta(c_in x, c_noise(t), c_noise(s), labels)`` for CTM (Kim et al., ICLR 2024).

A DDPM++/ADM-style U-Net: residual blocks with scale-shift conditioning on a noise embedding,
self-attention at chosen resolutions, skip connections from encoder to decoder. The embedding is
``t_embed(c_noise(t)) + s_embed(c_noise(s)) + label_embed(labels)``; ``s_embed`` is zero-initialised
so a student initialised from a teacher starts out ignoring ``s`` (docs/method.md section 2).
The EDM preconditioning (c_skip, c_out, c_in) lives outside, in the CTM wrapper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import Dropout
from .embed import TimeEmbedding, add_guidance_embedding, add_label_embedding


def _groups(ch: int) -> int:
    """Largest group count <= min(32, ch // 4) that divides ``ch``."""
    g = max(1, min(32, ch // 4))
    while ch % g:
        g -= 1
    return g


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with _groups(ch) groups and eps 1e-6 (shared with the image discriminator)."""
    return nn.GroupNorm(_groups(ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, scale-shift by the embedding, GroupNorm-SiLU-dropout-conv, plus skip.

    ``x [B, in_ch, H, W], emb [B, emb_dim] -> [B, out_ch, H, W]``.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # emb is already SiLU'd
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(x) + h) / math.sqrt(2)


class AttnBlock(nn.Module):
    """Multi-head self-attention over pixels (64-channel heads, 1 head when small): ``[B,C,H,W] -> same``."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.heads = max(1, ch // 64) if ch % 64 == 0 else 1
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # each [B, heads, HW, C/heads]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) / math.sqrt(2)


class ResAttnBlock(nn.Module):
    """A ResBlock followed by optional self-attention: ``x [B,in,H,W], emb [B,E] -> [B,out,H,W]``."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn: bool) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class Downsample(nn.Module):
    """Strided 3x3 conv: ``[B,C,H,W] -> [B,C,ceil(H/2),ceil(W/2)]``."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling to a given size (handles odd sizes) then 3x3 conv: ``[B,C,h,w] -> [B,C,*size]``."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """CTM image backbone: ``forward(x [B,C,H,W], noise_t [B], noise_s [B]?, labels [B]?) -> [B,C,H,W]``.

    ``noise_t``/``noise_s`` are EDM noise conditions ``c_noise = ln(sigma) / 4``; ``x`` is already scaled
    by ``c_in``. Level ``i`` runs at ``resolution / 2**i`` (rounded up for odd sizes); self-attention is
    used at levels whose resolution is in ``attn_resolutions`` and in the middle block.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        model_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.0,
        num_classes: int = 0,
        emb_mult: int = 4,
        fourier_scale: float = 1.0,
        guidance_embed: bool = False,
    ) -> None:
        super().__init__()
        if len(channel_mult) == 0:
            raise ValueError("UNet needs at least one level: channel_mult must be non-empty, e.g. (1, 2, 2)")
        self.in_channels = in_channels
        self.resolution = resolution
        self.num_classes = num_classes
        emb_dim = model_channels * emb_mult
        self.emb_dim = emb_dim

        self.t_embed = TimeEmbedding(emb_dim, fourier_scale=fourier_scale)
        self.s_embed = TimeEmbedding(emb_dim, zero_out=True, fourier_scale=fourier_scale)  # teacher->student init
        self.label_embed = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        self.w_embed = TimeEmbedding(emb_dim, zero_out=True) if guidance_embed else None   # range-guided students

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down, skip_chs, ch, res = self._encoder(model_channels, channel_mult, num_res_blocks, attn_resolutions,
                                                     dropout)
        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = AttnBlock(ch)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)
        self.up, ch = self._decoder(model_channels, channel_mult, num_res_blocks, attn_resolutions, dropout,
                                    skip_chs, ch, res)

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        # EDM-style init_zero: tiny output weights so F ~ 0 (g ~ c_skip x) at init.
        with torch.no_grad():
            self.conv_out.weight.mul_(1e-5)
            self.conv_out.bias.zero_()

    def _encoder(self, model_channels: int, channel_mult, num_res_blocks: int, attn_resolutions, dropout: float):
        """Encoder blocks, the channel count of every tensor pushed onto the skip stack, the last ch and res."""
        down = nn.ModuleList()
        skip_chs = [model_channels]
        ch, res = model_channels, self.resolution
        for level, mult in enumerate(channel_mult):
            out_ch = model_channels * mult
            for _ in range(num_res_blocks):
                down.append(ResAttnBlock(ch, out_ch, self.emb_dim, dropout, res in attn_resolutions))
                ch = out_ch
                skip_chs.append(ch)
            if level < len(channel_mult) - 1:
                down.append(Downsample(ch))
                skip_chs.append(ch)
                res = (res + 1) // 2
        return down, skip_chs, ch, res

    def _decoder(self, model_channels: int, channel_mult, num_res_blocks: int, attn_resolutions, dropout: float,
                 skip_chs: list[int], ch: int, res: int):
        """Decoder: num_res_blocks + 1 blocks per level, each consuming one skip; returns the blocks and last ch."""
        up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = model_channels * mult
            for _ in range(num_res_blocks + 1):
                in_ch = ch + skip_chs.pop()
                up.append(ResAttnBlock(in_ch, out_ch, self.emb_dim, dropout, res in attn_resolutions))
                ch = out_ch
            if level > 0:
                up.append(Upsample(ch))
                res = self.resolution
                for _ in range(level - 1):
                    res = (res + 1) // 2
        return up, ch

    def last_layer(self) -> nn.Parameter:
        """Weight of the final output conv (for the adaptive loss weights, docs/method.md section 3, step 8)."""
        return self.conv_out.weight

    def embed(self, noise_t: Tensor, noise_s: Tensor | None = None, labels: Tensor | None = None,
              w: Tensor | None = None) -> Tensor:
        """Embedding ``[B, emb_dim]`` from ``c_noise(t) [B]``, ``c_noise(s) [B]``?, ``labels [B]``?, guidance ``w``?."""
        emb = self.t_embed(noise_t)
        if noise_s is not None:
            emb = emb + self.s_embed(noise_s)
        return add_guidance_embedding(add_label_embedding(emb, self.label_embed, labels), self.w_embed, w)

    def forward(
        self, x: Tensor, noise_t: Tensor, noise_s: Tensor | None = None, labels: Tensor | None = None,
        w: Tensor | None = None,
    ) -> Tensor:
        """``x [B,C,H,W]``, ``noise_t [B]``, ``noise_s [B]``?, ``labels [B]`` int64?, ``w [B]``? -> ``[B,C,H,W]``."""
        b = x.shape[0]
        noise_t = noise_t.reshape(-1).expand(b) if noise_t.numel() == 1 else noise_t
        if noise_s is not None and noise_s.numel() == 1:
            noise_s = noise_s.reshape(-1).expand(b)
        emb = F.silu(self.embed(noise_t, noise_s, labels, w))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, ResAttnBlock) else block(h)
            skips.append(h)

        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)

        for block in self.up:
            if isinstance(block, ResAttnBlock):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:  # Upsample to the size of the next skip (handles odd sizes)
                h = block(h, (skips[-1].shape[-2], skips[-1].shape[-1]))

        return self.conv_out(F.silu(self.norm_out(h)))
