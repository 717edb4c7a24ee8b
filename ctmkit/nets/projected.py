"""The projected discriminator of the CTM reference (`ctm.discriminator=projected`, docs/method.md section 3).

The reference (sony/ctm: code/cm/enc_dec_lib.py load_discriminator_and_d_feature_extractor and get_xl_feature,
code/pg_modules/projector.py, discriminator.py, blocks.py; the StyleGAN-XL / Projected GAN design of Sauer et al.)
runs each image through frozen pretrained feature networks (deit_base_distilled_patch16_224 and
tf_efficientnet_lite0: nets/feature_nets.py), each giving four feature maps, finest first, at resolutions
R, R/2, R/4, R/8. Fixed random projections, frozen like the networks, mix them:
- cross-channel mixing (CCM): a 1x1 conv per level to 64, 128, 256, 512 channels;
- cross-scale mixing (CSM): from the coarsest level up, h <- conv1x1(up2(h + CCM_i)) with bilinear x2 upsampling
  (align_corners True) and the 1x1 conv halving the channels (keeping 64 at the finest level): maps of
  64, 64, 128, 256 channels at 2R, R, R/2, R/4.
A trainable head per level (SingleDisc) turns each map into a grid of logits: spectral-normalised 4x4 stride-2
convs with BatchNorm and LeakyReLU(0.2) down to 8 x 8 (the channel plan of Projected GAN's table, keyed by the
power of two nearest to the map's side), then a spectral-normalised 4x4 conv to one channel (5 x 5 on an 8 x 8
map, 4 x 4 on the 7 x 7 left by 224-pixel inputs). The logits of every level and network are concatenated:
``D(x) [B, L]``; the hinge losses average over all of them (both reference networks give 64 per image, so this is
the reference's mean over networks of per-network means).

Only the heads are trained and only they are in the module's state dict (so in checkpoints): the feature networks
come from the user's files and the projections are rebuilt from `seed`, so a resumed run gets the same ones.
Any frozen multi-scale extractor can stand in for the reference's (`FeatureNet`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

NFC = {4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}   # Projected GAN's channels


@dataclass
class FeatureNet:
    """A frozen feature extractor: ``net(x [B, 3, size, size]) -> [4 maps [B, C_i, R_i, R_i]]``, finest first,
    R_i = 2 R_{i+1}; ``mean`` / ``std`` normalise its [0, 1] input (ImageNet's, or 0.5 / 0.5 for Inception-style
    networks)."""

    name: str
    net: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int = 224


class RandomProjection(nn.Module):
    """CCM + CSM (Projected GAN's proj_type 2, cout 64, expand): 4 maps -> 4 maps of 64, 64, 128, 256 channels at
    twice their resolution. Built with PyTorch's default (random) initialisation and never trained."""

    def __init__(self, channels: list[int], cout: int = 64) -> None:
        super().__init__()
        mid = [cout * 2 ** i for i in range(4)]
        self.ccm = nn.ModuleList(nn.Conv2d(c, m, 1) for c, m in zip(channels, mid))
        self.csm = nn.ModuleList(nn.Conv2d(m, m // 2 if i else m, 1) for i, m in enumerate(mid))
        self.channels = [cout, cout, 2 * cout, 4 * cout]

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        mixed = [ccm(x) for ccm, x in zip(self.ccm, maps)]
        out: list[Tensor] = [mixed[0]] * 4
        h = None
        for i in (3, 2, 1, 0):
            h = mixed[i] if h is None else h + mixed[i]
            h = self.csm[i](F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True))
            out[i] = h
        return out


class PatchHead(nn.Module):
    """One level's trainable head (the reference's SingleDisc, unconditional): ``[B, C, R, R] -> [B, n]`` logits."""

    def __init__(self, channels: int, resolution: int, ndf: int | None = None, end: int = 8) -> None:
        super().__init__()
        start = min(NFC, key=lambda r: abs(r - resolution))         # nearest key; ties to the smaller, as ref
        nfc = {r: ndf or c for r, c in NFC.items()}
        c, layers, res = channels, [], resolution
        while start > end:
            out = nfc[start // 2]
            layers += [spectral_norm(nn.Conv2d(c, out, 4, 2, 1)), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            c, start, res = out, start // 2, res // 2
        if res < 4:
            raise ValueError(f"a feature map of side {resolution} is too small for the projected discriminator's head")
        self.main = nn.Sequential(*layers, spectral_norm(nn.Conv2d(c, 1, 4, 1, 0, bias=False)))

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x).flatten(1)


class ProjectedDiscriminator(nn.Module):
    """``D(x [B, C, H, W] in [-1, 1], labels=None) -> logits [B, L]`` over frozen feature networks.

    Per network: ``augment`` (DiffAugment, drawn afresh for each network as in the reference), (x + 1) / 2, its
    mean / std, bilinear resize to its side, the frozen network and projection, then the trainable heads. With
    ``groups = g`` the heads see the g equal parts of the batch apart (BatchNorm statistics per part: real and fake
    apart, as the reference's separate calls). Labels are ignored (the reference's heads are unconditional).
    """

    def __init__(self, features: list[FeatureNet], seed: int = 0, ndf: int | None = None) -> None:
        super().__init__()
        frozen, heads = [], {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for fn in features:
                maps = _probe(fn)
                proj = RandomProjection([m.shape[1] for m in maps])
                frozen.append(nn.ModuleList([fn.net, proj]).eval().requires_grad_(False))
                heads[fn.name] = nn.ModuleList(PatchHead(c, 2 * m.shape[-1], ndf) for c, m in zip(proj.channels, maps))
        self.heads = nn.ModuleDict(heads)
        self.features = list(features)
        self.frozen = tuple(frozen)          # a tuple: not submodules, so neither trained nor in the state dict
        for fn in self.features:
            stats = torch.tensor([fn.mean, fn.std], dtype=torch.float32).view(2, 1, 3, 1, 1)
            self.register_buffer(f"norm_{fn.name}", stats, persistent=False)

    def frozen_to(self, device: torch.device) -> None:
        for m in self.frozen:
            m.to(device)

    def forward(self, x: Tensor, labels: Tensor | None = None, groups: int = 1, augment=None) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] % groups:
            raise ValueError(f"the projected discriminator needs images [B, 1 or 3, H, W], B divisible by {groups}, "
                             f"got {tuple(x.shape)}")
        logits = []
        for fn, (net, proj) in zip(self.features, self.frozen):
            if next(proj.parameters()).device != x.device:
                self.frozen_to(x.device)
            h = (augment(x) if augment is not None else x).expand(-1, 3, -1, -1)
            mean, std = getattr(self, f"norm_{fn.name}")
            h = F.interpolate(((h + 1) / 2 - mean) / std, size=(fn.size, fn.size), mode="bilinear",
                              align_corners=False)
            maps = proj(net(h))
            heads = self.heads[fn.name]
            parts = [torch.cat([hd(m) for hd, m in zip(heads, ms)], 1)
                     for ms in zip(*(m.chunk(groups) for m in maps))]
            logits.append(torch.cat(parts, 0))
        return torch.cat(logits, 1)


def _probe(fn: FeatureNet) -> list[Tensor]:
    """The network's maps for one blank image (to size the projection and heads); checks the 4-level layout."""
    with torch.no_grad():
        maps = list(fn.net.eval()(torch.zeros(1, 3, fn.size, fn.size, device=next(fn.net.parameters()).device)))
    sides = [m.shape[-1] for m in maps]
    if len(maps) != 4 or any(a != 2 * b for a, b in zip(sides, sides[1:])):
        raise ValueError(f"feature network {fn.name} must give 4 maps, each twice the side of the next; got {sides}")
    return maps
