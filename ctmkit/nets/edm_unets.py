"""EDM's two image U-Nets as ctmkit backbones: ``SongUNet`` (DDPM++ / NCSN++) and ``DhariwalUNet`` (ADM).

The architectures are those of Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
(NeurIPS 2022), which re-express Song et al.'s DDPM++/NCSN++ and Dhariwal & Nichol's ADM. This is an independent
implementation written from their description: the computation is the same, operation for operation, in float32
(custom conv with FIR up/down-sampling, GroupNorm with at most 32 groups of >= 4 channels, residual blocks with
additive or scale-shift conditioning, softmax attention computed in float32, the same embedding MLPs), and every
parameter and buffer carries the name EDM gives it (``map_noise.freqs``, ``map_layer0.weight``,
``enc.32x32_block0.conv0.weight``, ``enc.16x16_down.skip.resample_filter``, ``dec.32x32_aux_conv.weight``, ...).
So the state dict of an EDM network's ``model`` sub-module loads with ``load_state_dict(strict=False)`` and the only
missing keys are the ``s_*`` ones below; initial values follow EDM's schemes but do not matter once weights load.

ctmkit backbone protocol: ``forward(x, noise_t, noise_s=None, labels=None) -> Tensor``.

* ``noise_t [B]`` is EDM's ``noise_labels`` (the caller's preconditioning computes it, e.g. ``ln(sigma) / 4``); a
  single value is broadcast over the batch.
* ``noise_s [B]`` or None is the CTM's second time (Kim et al., ICLR 2024; docs/method.md section 2). It goes through
  its own copy of the noise embedding (``s_map_noise``) and two linear layers (``s_map_layer0``, SiLU,
  ``s_map_layer1``); the result is added to the embedding that the blocks consume, after EDM's last activation.
  ``s_map_layer1`` starts at zero (weight and bias), so at initialisation the output is the same for any ``noise_s``
  as without it. With ``noise_s`` None that path is skipped.
* ``labels`` are integer class indices ``[B]``, turned into one-hot vectors here (EDM takes one-hot vectors); a
  float ``[B, label_dim]`` tensor is taken as the class vectors themselves. The null label -1 gives the zero class
  vector (EDM's unconditional input); with ``label_dim > 0``, labels=None is refused. Label dropout
  (``label_dropout``) acts in training mode only.
* Augmentation labels: ``map_augment`` exists when ``augment_dim > 0`` so that EDM weights load, but ctmkit never
  augments the teacher's input, so the network always runs as with zero augmentation labels. That layer has no bias,
  so its contribution is then exactly zero and it is not evaluated at all (as in EDM's own sampler, which passes none).

Dropout inside the blocks is a parameter-free module with an ``active`` override (None follows ``.train()`` /
``.eval()``; True/False forces it), like ``ctmkit.nets.dropout.Dropout``. Fourier frequencies are drawn from fixed
seeds instead of the global random stream; a loaded teacher replaces the ``map_noise`` ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import Dropout

_T_FREQ_SEED, _S_FREQ_SEED = 0, 1   # seeds of the Fourier frequencies of the t and s embeddings


# ----------------------------------------------------------------------------------------------------------------
# Initialisation schemes.

@dataclass(frozen=True)
class Init:
    """How a weight (and its bias) is drawn: ``mode`` scaled by ``weight_gain`` / ``bias_gain``.

    Modes: ``xavier_uniform`` (bound sqrt(6 / (fan_in + fan_out))), ``kaiming_uniform`` (bound sqrt(3 / fan_in)),
    ``kaiming_normal`` (std sqrt(1 / fan_in)). The bias uses the weight's fans.
    """

    mode: str = "xavier_uniform"
    weight_gain: float = 1.0
    bias_gain: float = 0.0

    def draw(self, shape: Sequence[int], fan_in: int, fan_out: int, gain: float) -> Tensor:
        if gain == 0:
            return torch.zeros(*shape)
        if self.mode == "xavier_uniform":
            return (torch.rand(*shape) * 2 - 1) * (math.sqrt(6 / (fan_in + fan_out)) * gain)
        if self.mode == "kaiming_uniform":
            return (torch.rand(*shape) * 2 - 1) * (math.sqrt(3 / fan_in) * gain)
        if self.mode == "kaiming_normal":
            return torch.randn(*shape) * (math.sqrt(1 / fan_in) * gain)
        raise ValueError(f"unknown init mode {self.mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# Layers.

class EDMLinear(nn.Module):
    """``y = x W^T (+ b)`` with ``weight [out, in]`` and optional ``bias [out]``; runs in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: Init = Init()) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(init.draw((out_features, in_features), in_features, out_features,
                                             init.weight_gain))
        b = init.draw((out_features,), in_features, out_features, init.bias_gain) if bias else None
        self.bias = nn.Parameter(b) if b is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight.to(x.dtype).t()
        return y if self.bias is None else y + self.bias.to(x.dtype)


def fir_filter_2d(taps: Sequence[float]) -> Tensor:
    """Separable 2-D FIR kernel ``[1, 1, k, k]`` from 1-D taps, normalised to sum 1."""
    t = torch.as_tensor(list(taps), dtype=torch.float32)
    return torch.outer(t, t)[None, None] / t.sum().square()


def _upsample2(x: Tensor, filt: Tensor, pad: int) -> Tensor:
    """Per-channel 2x transposed convolution with ``4 * filt`` (gain 4 keeps the mean): ``[B,C,H,W] -> ~2x``."""
    c = x.shape[1]
    return F.conv_transpose2d(x, (filt * 4).repeat(c, 1, 1, 1), groups=c, stride=2, padding=pad)


def _downsample2(x: Tensor, filt: Tensor, pad: int) -> Tensor:
    """Per-channel stride-2 convolution with ``filt``: ``[B,C,H,W] -> ~half``."""
    c = x.shape[1]
    return F.conv2d(x, filt.repeat(c, 1, 1, 1), groups=c, stride=2, padding=pad)


class EDMConv2d(nn.Module):
    """Square ``kernel`` convolution (``kernel`` 0: none, only resampling) with optional 2x FIR up/down-sampling.

    ``resample_filter`` (the normalised 2-D filter) is a buffer only when ``up`` or ``down``. Unfused: resample,
    then convolve. ``fused_resample`` with a kernel: up-sampling is a transposed filter conv then the kernel conv with
    the paddings traded off; down-sampling is the kernel conv padded by both halves, then an unpadded filter stride.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init: Init = Init()) -> None:
        super().__init__()
        if up and down:
            raise ValueError("EDMConv2d: up and down are exclusive")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        w = init.draw((out_channels, in_channels, kernel, kernel), fan_in, fan_out, init.weight_gain) \
            if kernel else None
        self.weight = nn.Parameter(w) if w is not None else None
        b = init.draw((out_channels,), fan_in, fan_out, init.bias_gain) if kernel and bias else None
        self.bias = nn.Parameter(b) if b is not None else None
        self.register_buffer("resample_filter", fir_filter_2d(resample_filter) if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and self.up:
            x = _upsample2(x, f, max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and w is not None and self.down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = _downsample2(x, f, 0)
        else:
            if self.up:
                x = _upsample2(x, f, f_pad)
            if self.down:
                x = _downsample2(x, f, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x if self.bias is None else x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)


class EDMGroupNorm(nn.Module):
    """GroupNorm with ``min(num_groups, C // min_channels_per_group)`` groups and affine ``weight`` / ``bias``."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def multihead_self_attention(qkv: Tensor, heads: int) -> Tensor:
    """Pixel self-attention from a fused projection ``qkv [B, 3C, H, W] -> [B, C, H, W]``.

    The 3C channels are laid out as (head, channel within head, which of q/k/v), the last varying fastest. The
    logits ``q^T k / sqrt(C / heads)`` and their softmax over keys are computed in float32; the attention weights
    are cast back to the input dtype before they average the values.
    """
    b, c3, h, w = qkv.shape
    per_head = c3 // 3 // heads
    q, k, v = qkv.reshape(b * heads, per_head, 3, h * w).unbind(2)          # each [B*heads, per_head, HW]
    k = k / math.sqrt(per_head)
    logits = torch.bmm(q.to(torch.float32).transpose(1, 2), k.to(torch.float32))   # [B*heads, HW_q, HW_k]
    weights = logits.softmax(dim=2).to(q.dtype)
    out = torch.bmm(v, weights.transpose(1, 2))                             # [B*heads, per_head, HW_q]
    return out.reshape(b, c3 // 3, h, w)


@dataclass(frozen=True)
class BlockStyle:
    """What distinguishes the residual blocks of one architecture (shared by all its blocks)."""

    emb_channels: int
    dropout: float
    skip_scale: float                       # multiplies each residual sum
    eps: float                              # GroupNorm eps
    resample_filter: tuple = (1, 1)
    resample_proj: bool = False             # a 1x1 conv on the skip path of up/down blocks (else resampling only)
    adaptive_scale: bool = True             # scale-shift conditioning (ADM) vs additive before the norm (DDPM++)
    channels_per_head: int | None = None  # None: one attention head
    init: Init = field(default_factory=Init)
    init_zero: Init = field(default_factory=Init)
    init_attn: Init = field(default_factory=Init)

    def heads(self, channels: int) -> int:
        return 1 if self.channels_per_head is None else channels // self.channels_per_head


class EDMBlock(nn.Module):
    """Residual block ``x [B, in, H, W], emb [B, E] -> [B, out, H', W']`` with optional up/down-sampling and
    self-attention (EDM's UNetBlock, the union of DDPM++, NCSN++ and ADM blocks).

    ``h = conv0(silu(norm0(x)))`` (resampling inside conv0); conditioning ``a = affine(emb)``: adaptive
    ``silu(norm1(h) * (1 + scale) + shift)``, else ``silu(norm1(h + a))``; ``h = conv1(dropout(h))``; then
    ``(h + skip(x)) * skip_scale`` and, with attention, ``(proj(attn(qkv(norm2(h)))) + h) * skip_scale``.
    """

    def __init__(self, in_channels: int, out_channels: int, style: BlockStyle, up: bool = False, down: bool = False,
                 attention: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = style.heads(out_channels) if attention else 0
        self.skip_scale, self.adaptive_scale = style.skip_scale, style.adaptive_scale
        filt = style.resample_filter
        self.norm0 = EDMGroupNorm(in_channels, eps=style.eps)
        self.conv0 = EDMConv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=filt,
                               init=style.init)
        self.affine = EDMLinear(style.emb_channels, out_channels * (2 if style.adaptive_scale else 1),
                                init=style.init)
        self.norm1 = EDMGroupNorm(out_channels, eps=style.eps)
        self.drop = Dropout(style.dropout)
        self.conv1 = EDMConv2d(out_channels, out_channels, 3, init=style.init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if style.resample_proj or out_channels != in_channels else 0
            self.skip = EDMConv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=filt,
                                  init=style.init)
        if self.num_heads:
            self.norm2 = EDMGroupNorm(out_channels, eps=style.eps)
            self.qkv = EDMConv2d(out_channels, out_channels * 3, 1, init=style.init_attn)
            self.proj = EDMConv2d(out_channels, out_channels, 1, init=style.init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        cond = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = cond.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + cond))
        h = self.conv1(self.drop(h))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            att = multihead_self_attention(self.qkv(self.norm2(h)), self.num_heads)
            h = (self.proj(att) + h) * self.skip_scale
        return h


# ----------------------------------------------------------------------------------------------------------------
# Noise-level embeddings.

def _cos_sin(angles: Tensor, sin_first: bool) -> Tensor:
    parts = [angles.sin(), angles.cos()] if sin_first else [angles.cos(), angles.sin()]
    return torch.cat(parts, dim=1)


class PositionalNoiseEmbedding(nn.Module):
    """Transformer-style sinusoids of a scalar: ``[B] -> [B, num_channels]`` (no parameters).

    Frequencies ``max_positions ** -(i / n)`` for ``i < num_channels / 2``, with ``n = num_channels / 2 - 1`` when
    ``endpoint`` (DDPM++) else ``num_channels / 2`` (ADM). Cosines then sines, or sines first with ``sin_first``.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False,
                 sin_first: bool = False) -> None:
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions
        self.endpoint, self.sin_first = endpoint, sin_first

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponent
        return _cos_sin(torch.outer(x, freqs.to(x.dtype)), self.sin_first)


class FourierNoiseEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++): ``[B] -> [B, num_channels]``, angles ``2 pi x freqs``.

    ``freqs [num_channels / 2]`` is a buffer, N(0, scale^2) drawn from a fixed ``seed``.
    """

    def __init__(self, num_channels: int, scale: float = 16, sin_first: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.sin_first = sin_first
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(num_channels // 2, generator=gen) * scale)

    def forward(self, x: Tensor) -> Tensor:
        return _cos_sin(torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype)), self.sin_first)


# ----------------------------------------------------------------------------------------------------------------
# Shared backbone plumbing: the protocol, labels and the s path.

def _per_sample(noise: Tensor, batch: int) -> Tensor:
    """A noise condition as a float ``[B]`` vector (a single value is broadcast)."""
    noise = noise.reshape(-1)
    if not noise.is_floating_point():
        noise = noise.to(torch.float32)
    return noise.expand(batch) if noise.numel() == 1 and batch != 1 else noise


def _as_tuple(seq: Sequence) -> tuple:
    return tuple(seq)


class _EDMUNetBase(nn.Module):
    """The ctmkit protocol around an EDM U-Net: subclasses build ``map_*``, ``s_map_*``, ``enc`` and ``dec`` and
    define ``_t_embedding(noise_t, class_vectors)`` and ``_trunk(x, emb)``."""

    label_dim: int
    label_dropout: float

    def _add_s_path(self, noise_embedding: nn.Module, noise_channels: int, emb_channels: int, init: Init) -> None:
        """``s_map_noise`` -> ``s_map_layer0`` -> SiLU -> ``s_map_layer1`` (zero weight and bias)."""
        self.s_map_noise = noise_embedding
        self.s_map_layer0 = EDMLinear(noise_channels, emb_channels, init=init)
        self.s_map_layer1 = EDMLinear(emb_channels, emb_channels, init=Init(init.mode, 0.0, 0.0))

    def _s_embedding(self, noise_s: Tensor) -> Tensor:
        return self.s_map_layer1(F.silu(self.s_map_layer0(self.s_map_noise(noise_s))))

    def _class_vectors(self, labels: Tensor | None, batch: int, dtype: torch.dtype,
                       device: torch.device) -> Tensor | None:
        """``[B, label_dim]`` class vectors (one-hot of integer labels; zeros for the null label -1, EDM's null),
        label dropout applied in training mode; None for an unconditional network, which ignores labels. A
        conditional network refuses labels=None."""
        if not self.label_dim:
            return None
        if labels is None:
            raise ValueError(f"this network is conditioned on {self.label_dim} classes: pass labels [B] (int64; -1 "
                             "is the null label)")
        if labels.is_floating_point():
            if labels.dim() != 2 or labels.shape[1] != self.label_dim:
                raise ValueError(f"float labels must be class vectors [B, {self.label_dim}], got {tuple(labels.shape)}")
            vec = labels.to(device=device, dtype=dtype)
        else:
            idx = labels.reshape(-1).to(device=device, dtype=torch.long)
            vec = F.one_hot(idx.clamp_min(0), self.label_dim).to(dtype) * (idx >= 0)[:, None].to(dtype)
        if self.training and self.label_dropout:
            keep = torch.rand([vec.shape[0], 1], device=device) >= self.label_dropout
            vec = vec * keep.to(dtype)
        return vec

    def forward(self, x: Tensor, noise_t: Tensor, noise_s: Tensor | None = None,
                labels: Tensor | None = None) -> Tensor:
        """``x [B, C, H, W]``, ``noise_t [B]``, ``noise_s [B]``?, ``labels [B]`` int? -> ``[B, out_channels, H, W]``."""
        b = x.shape[0]
        noise_t = _per_sample(noise_t.to(x.device), b)
        emb = self._t_embedding(noise_t, self._class_vectors(labels, b, noise_t.dtype, x.device))
        if noise_s is not None:
            emb = emb + self._s_embedding(_per_sample(noise_s.to(x.device), b)).to(emb.dtype)
        return self._trunk(x, emb)

    @property
    def num_classes(self) -> int:
        return self.label_dim


# ----------------------------------------------------------------------------------------------------------------
# DDPM++ / NCSN++.

class SongUNet(_EDMUNetBase):
    """DDPM++ / NCSN++ U-Net (EDM's ``SongUNet``), same constructor arguments and defaults.

    DDPM++: ``embedding_type='positional', channel_mult_noise=1, encoder_type='standard', decoder_type='standard',
    resample_filter=(1, 1)``; NCSN++: ``'fourier', 2, 'residual', 'standard', (1, 3, 3, 1)``. Encoder ``skip`` feeds
    the down-sampled input image to each level through a 1x1 conv; ``residual`` keeps a down-sampled residual image
    path; decoder ``skip`` sums an output image up-sampled from every level. Blocks: additive conditioning, one
    attention head, skip scale sqrt(1/2), GroupNorm eps 1e-6. The embedding is ``silu(map_layer1(silu(map_layer0(
    swap(map_noise(t)) + map_label(onehot * sqrt(label_dim))))))`` where swap puts the sines first.

    ``last_layer()`` is the weight of ``dec.{R}x{R}_aux_conv`` (R = img_resolution), the 3x3 conv that writes the
    output at full resolution; with decoder ``skip`` it is the last of the per-level ``aux_conv`` layers, the one
    added last to the summed output.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)) -> None:
        super().__init__()
        for name, value, allowed in (("embedding_type", embedding_type, ("fourier", "positional")),
                                     ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                     ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in allowed:
                raise ValueError(f"SongUNet: {name} must be one of {allowed}, got {value!r}")
        channel_mult, attn_resolutions = _as_tuple(channel_mult), _as_tuple(attn_resolutions)
        resample_filter = _as_tuple(resample_filter)
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init = Init("xavier_uniform")
        style = BlockStyle(emb_channels, dropout, math.sqrt(0.5), 1e-6, resample_filter, resample_proj=True,
                           adaptive_scale=False, channels_per_head=None, init=init,
                           init_zero=Init("xavier_uniform", 1e-5), init_attn=Init("xavier_uniform", math.sqrt(0.2)))

        def noise_embedding(seed: int) -> nn.Module:
            if embedding_type == "positional":
                return PositionalNoiseEmbedding(noise_channels, endpoint=True, sin_first=True)
            return FourierNoiseEmbedding(noise_channels, sin_first=True, seed=seed)

        self.map_noise = noise_embedding(_T_FREQ_SEED)
        self.map_label = EDMLinear(label_dim, noise_channels, init=init) if label_dim else None
        self.map_augment = EDMLinear(augment_dim, noise_channels, bias=False, init=init) if augment_dim else None
        self.map_layer0 = EDMLinear(noise_channels, emb_channels, init=init)
        self.map_layer1 = EDMLinear(emb_channels, emb_channels, init=init)
        self._add_s_path(noise_embedding(_S_FREQ_SEED), noise_channels, emb_channels, init)

        levels = dict(img_resolution=img_resolution, model_channels=model_channels, channel_mult=channel_mult,
                      num_blocks=num_blocks, attn_resolutions=attn_resolutions, style=style)
        skips, cout = self._build_encoder(in_channels, encoder_type, **levels)
        self._build_decoder(out_channels, decoder_type, skips, cout, **levels)

    def _build_encoder(self, in_channels: int, encoder_type: str, img_resolution: int, model_channels: int,
                       channel_mult: tuple, num_blocks: int, attn_resolutions: tuple, style: BlockStyle):
        """``self.enc`` and its plan [(name, role)]; returns the channel counts of the skip tensors and the last."""
        self.enc, self._enc_plan = nn.ModuleDict(), []
        skips, cout, caux = [], in_channels, in_channels
        filt = style.resample_filter

        def add(name: str, module: nn.Module, role: str) -> None:
            self.enc[name] = module
            self._enc_plan.append((name, role))
            if role in ("conv", "block"):
                skips.append(module.out_channels)

        for level, mult in enumerate(channel_mult):
            tag = f"{img_resolution >> level}x{img_resolution >> level}"
            if level == 0:
                add(f"{tag}_conv", EDMConv2d(cout, model_channels, 3, init=style.init), "conv")
                cout = model_channels
            else:
                add(f"{tag}_down", EDMBlock(cout, cout, style, down=True), "block")
                if encoder_type == "skip":
                    add(f"{tag}_aux_down", EDMConv2d(caux, caux, 0, down=True, resample_filter=filt), "aux_down")
                    add(f"{tag}_aux_skip", EDMConv2d(caux, cout, 1, init=style.init), "aux_skip")
                if encoder_type == "residual":
                    add(f"{tag}_aux_residual", EDMConv2d(caux, cout, 3, down=True, resample_filter=filt,
                                                         fused_resample=True, init=style.init), "aux_residual")
                    caux = cout
            for idx in range(num_blocks):
                attn = (img_resolution >> level) in attn_resolutions
                add(f"{tag}_block{idx}", EDMBlock(cout, model_channels * mult, style, attention=attn), "block")
                cout = model_channels * mult
        return skips, cout

    def _build_decoder(self, out_channels: int, decoder_type: str, skips: list, cout: int, img_resolution: int,
                       model_channels: int, channel_mult: tuple, num_blocks: int, attn_resolutions: tuple,
                       style: BlockStyle) -> None:
        """``self.dec`` and its plan [(name, role)], role ``block``, ``cat`` (a block taking a skip first),
        ``aux_up``, ``aux_norm`` or ``aux_conv``."""
        self.dec, self._dec_plan = nn.ModuleDict(), []
        last = len(channel_mult) - 1

        def add(name: str, module: nn.Module, role: str) -> None:
            self.dec[name] = module
            self._dec_plan.append((name, role))

        for level in range(last, -1, -1):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == last:
                add(f"{tag}_in0", EDMBlock(cout, cout, style, attention=True), "block")
                add(f"{tag}_in1", EDMBlock(cout, cout, style), "block")
            else:
                add(f"{tag}_up", EDMBlock(cout, cout, style, up=True), "block")
            for idx in range(num_blocks + 1):
                attn = idx == num_blocks and res in attn_resolutions
                cin, cout = cout + skips.pop(), model_channels * channel_mult[level]
                add(f"{tag}_block{idx}", EDMBlock(cin, cout, style, attention=attn), "cat")
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last:
                    add(f"{tag}_aux_up", EDMConv2d(out_channels, out_channels, 0, up=True,
                                                   resample_filter=style.resample_filter), "aux_up")
                add(f"{tag}_aux_norm", EDMGroupNorm(cout, eps=1e-6), "aux_norm")
                add(f"{tag}_aux_conv", EDMConv2d(cout, out_channels, 3, init=style.init_zero), "aux_conv")

    def _t_embedding(self, noise_t: Tensor, class_vectors: Tensor | None) -> Tensor:
        emb = self.map_noise(noise_t)
        if class_vectors is not None:
            emb = emb + self.map_label(class_vectors * math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def _trunk(self, x: Tensor, emb: Tensor) -> Tensor:
        skips, image = [], x
        for name, role in self._enc_plan:
            module = self.enc[name]
            if role == "aux_down":
                image = module(image)
            elif role == "aux_skip":
                x = skips[-1] = x + module(image)
            elif role == "aux_residual":
                x = skips[-1] = image = (x + module(image)) / math.sqrt(2)
            else:
                x = module(x) if role == "conv" else module(x, emb)
                skips.append(x)
        out, head = None, None
        for name, role in self._dec_plan:
            module = self.dec[name]
            if role == "aux_up":
                out = module(out)
            elif role == "aux_norm":
                head = module(x)
            elif role == "aux_conv":
                head = module(F.silu(head))
                out = head if out is None else head + out
            else:
                x = module(torch.cat([x, skips.pop()], dim=1) if role == "cat" else x, emb)
        return out

    def last_layer(self) -> nn.Parameter:
        """Weight of ``dec.{R}x{R}_aux_conv``, the full-resolution output conv (see the class docstring)."""
        r = self.img_resolution
        return self.dec[f"{r}x{r}_aux_conv"].weight


# ----------------------------------------------------------------------------------------------------------------
# ADM.

class DhariwalUNet(_EDMUNetBase):
    """ADM U-Net (EDM's ``DhariwalUNet``), same constructor arguments and defaults.

    Blocks: scale-shift conditioning, attention heads of 64 channels (none where a block has < 64 channels), skip
    scale 1, GroupNorm eps 1e-5, down/up-sampling blocks whose skip path only resamples (filter (1, 1)). The
    embedding is ``silu(map_layer1(silu(map_layer0(map_noise(t)))) + map_label(onehot))`` with cosines first.
    ``last_layer()`` is ``out_conv.weight``.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0) -> None:
        super().__init__()
        channel_mult, attn_resolutions = _as_tuple(channel_mult), _as_tuple(attn_resolutions)
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = Init("kaiming_uniform", math.sqrt(1 / 3), math.sqrt(1 / 3))
        init_zero = Init("kaiming_uniform", 0.0, 0.0)
        style = BlockStyle(emb_channels, dropout, 1.0, 1e-5, (1, 1), resample_proj=False, adaptive_scale=True,
                           channels_per_head=64, init=init, init_zero=init_zero, init_attn=init)

        self.map_noise = PositionalNoiseEmbedding(model_channels)
        self.map_augment = EDMLinear(augment_dim, model_channels, bias=False, init=init_zero) if augment_dim else None
        self.map_layer0 = EDMLinear(model_channels, emb_channels, init=init)
        self.map_layer1 = EDMLinear(emb_channels, emb_channels, init=init)
        self.map_label = EDMLinear(label_dim, emb_channels, bias=False,
                                   init=Init("kaiming_normal", math.sqrt(label_dim))) if label_dim else None
        self._add_s_path(PositionalNoiseEmbedding(model_channels), model_channels, emb_channels, init)

        cout = self._build_trunk(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                 attn_resolutions, style)
        self.out_norm = EDMGroupNorm(cout)
        self.out_conv = EDMConv2d(cout, out_channels, 3, init=init_zero)

    def _build_trunk(self, img_resolution: int, in_channels: int, model_channels: int, channel_mult: tuple,
                     num_blocks: int, attn_resolutions: tuple, style: BlockStyle) -> int:
        """``self.enc`` and ``self.dec`` (and which decoder blocks take a skip first); returns the last width."""
        self.enc, self.dec, self._dec_cat = nn.ModuleDict(), nn.ModuleDict(), []
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = EDMConv2d(cout, model_channels * mult, 3, init=style.init)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = EDMBlock(cout, cout, style, down=True)
            for idx in range(num_blocks):
                block = EDMBlock(cout, model_channels * mult, style, attention=res in attn_resolutions)
                self.enc[f"{res}x{res}_block{idx}"] = block
                cout = model_channels * mult
        skips = [m.out_channels for m in self.enc.values()]
        for level in range(len(channel_mult) - 1, -1, -1):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = EDMBlock(cout, cout, style, attention=True)
                self.dec[f"{res}x{res}_in1"] = EDMBlock(cout, cout, style)
                self._dec_cat += [False, False]
            else:
                self.dec[f"{res}x{res}_up"] = EDMBlock(cout, cout, style, up=True)
                self._dec_cat.append(False)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * channel_mult[level]
                self.dec[f"{res}x{res}_block{idx}"] = EDMBlock(cin, cout, style, attention=res in attn_resolutions)
                self._dec_cat.append(True)
        return cout

    def _t_embedding(self, noise_t: Tensor, class_vectors: Tensor | None) -> Tensor:
        emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(noise_t))))
        if class_vectors is not None:
            emb = emb + self.map_label(class_vectors)
        return F.silu(emb)

    def _trunk(self, x: Tensor, emb: Tensor) -> Tensor:
        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, EDMBlock) else module(x)
            skips.append(x)
        for module, takes_skip in zip(self.dec.values(), self._dec_cat):
            x = module(torch.cat([x, skips.pop()], dim=1) if takes_skip else x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))

    def last_layer(self) -> nn.Parameter:
        """Weight of ``out_conv``, the conv that writes the output."""
        return self.out_conv.weight
