"""The reference's frozen feature networks for the projected discriminator (nets/projected.py), built with timm's
model definitions (the optional `projected` extra) and weights from files the user names; nothing downloads.

As in the reference (sony/ctm: code/feature_networks/pretrained_builder.py _make_pretrained, _make_efficientnet,
_make_vit; code/feature_networks/vit.py _make_vit_b16_backbone, forward_vit; constants.py for the input
normalisation), on 224 x 224 inputs:
- `tf_efficientnet_lite0` (inputs normalised with mean = std = 0.5): the stem and blocks 0-1, block 2, blocks 3-4,
  blocks 5-6: maps of 24, 40, 112, 320 channels at 56, 28, 14, 7;
- `deit_base_distilled_patch16_224` (ImageNet mean / std): the tokens after blocks 2, 5, 8 and 11 (before the final
  norm, class and distillation tokens dropped) as 14 x 14 maps, through a randomly initialised, frozen readout:
  1x1 convs to 96, 192, 384, 768 channels followed by a x4 transposed conv, a x2 transposed conv, nothing, and a
  stride-2 3x3 conv: maps at 56, 28, 14, 7. The readout's random weights are rebuilt from the run's seed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UserError
from .lpips import IMAGENET_MEAN, IMAGENET_STD
from .pretrained import WeightFile, load_into
from .projected import FeatureNet

USE = "ctm.discriminator=projected"
DEIT_WEIGHTS = WeightFile(
    "ctm.disc_deit", USE,
    "ImageNet weights of deit_base_distilled_patch16_224 (timm's deit_base_distilled_patch16_224.fb_in1k: "
    "model.safetensors at https://huggingface.co/timm/deit_base_distilled_patch16_224.fb_in1k, or Facebook's "
    "deit_base_distilled_patch16_224-df68dfff.pth at https://dl.fbaipublicfiles.com/deit/)")
EFFNET_WEIGHTS = WeightFile(
    "ctm.disc_effnet", USE,
    "ImageNet weights of tf_efficientnet_lite0 (timm's tf_efficientnet_lite0.in1k: model.safetensors at "
    "https://huggingface.co/timm/tf_efficientnet_lite0.in1k, or tf_efficientnet_lite0-0aa007d2.pth at "
    "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/)")


def import_timm():
    """timm, or one UserError saying what to install (timm imports torchvision when it is imported)."""
    try:
        import timm
    except (ImportError, RuntimeError, OSError, AttributeError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{USE} builds its feature networks with timm's model definitions, which cannot be imported "
                        f"({why}): pip install 'timm>=1.0' and the torchvision build that matches your torch (timm "
                        f"imports torchvision)") from None
    return timm


class EfficientNetFeatures(nn.Module):
    """A timm EfficientNet split into the reference's four stages: ``x -> [4 maps]``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        b = net.blocks
        stem = [net.conv_stem, net.bn1, getattr(net, "act1", nn.Identity())]   # timm >= 0.9: bn1 holds the act
        self.stages = nn.ModuleList([nn.Sequential(*stem, *b[0:2]), nn.Sequential(*b[2:3]),
                                     nn.Sequential(*b[3:5]), nn.Sequential(*b[5:])])

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class ViTFeatures(nn.Module):
    """A timm ViT / DeiT (patch 16) read after blocks `hooks` through the reference's random readout."""

    def __init__(self, vit: nn.Module, hooks=(2, 5, 8, 11), channels=(96, 192, 384, 768)) -> None:
        super().__init__()
        self.vit, self.hooks, w, c = vit, list(hooks), vit.embed_dim, channels
        self.readout = nn.ModuleList([
            nn.Sequential(nn.Conv2d(w, c[0], 1), nn.ConvTranspose2d(c[0], c[0], 4, stride=4)),
            nn.Sequential(nn.Conv2d(w, c[1], 1), nn.ConvTranspose2d(c[1], c[1], 2, stride=2)),
            nn.Sequential(nn.Conv2d(w, c[2], 1)),
            nn.Sequential(nn.Conv2d(w, c[3], 1), nn.Conv2d(c[3], c[3], 3, stride=2, padding=1))])

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = self.vit.forward_intermediates(x, indices=self.hooks, norm=False, output_fmt="NCHW",
                                              intermediates_only=True)
        return [r(m) for r, m in zip(self.readout, maps)]


def reference_feature_nets(deit: str, effnet: str, seed: int = 0) -> list[FeatureNet]:
    """The reference's two feature networks with the user's weights (`deit`, `effnet`: the values of ctm.disc_deit
    and ctm.disc_effnet), frozen, on the CPU. Random parts (timm's init before loading, the ViT readout) come from a
    generator seeded with `seed`, leaving the global random stream as it was."""
    deit_sd, eff_sd = DEIT_WEIGHTS.read(deit), EFFNET_WEIGHTS.read(effnet)
    timm = import_timm()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = timm.create_model("deit_base_distilled_patch16_224", pretrained=False)
        load_into(vit, deit_sd, DEIT_WEIGHTS, deit)
        eff = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        load_into(eff, eff_sd, EFFNET_WEIGHTS, effnet)
        nets = [FeatureNet("deit_base_distilled_patch16_224", ViTFeatures(vit), IMAGENET_MEAN, IMAGENET_STD),
                FeatureNet("tf_efficientnet_lite0", EfficientNetFeatures(eff), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    for fn in nets:
        fn.net.eval().requires_grad_(False)
    return nets
