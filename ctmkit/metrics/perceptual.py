"""A perceptual feature map for the CTM loss (`ctm.distance=feature`): the paper measures d(estimate, target) with
LPIPS (`ctm.distance=lpips`, nets/lpips.py, which needs a VGG16 weight file); this stand-in needs none: the
Inception-v3 network that ships with the `fid` extra (the FID network, docs/method.md section 3) used in LPIPS's
way, without LPIPS's learned per-channel weights.

Images in model space [N, C, H, W] (C = 1 replicated to RGB) are resized bilinearly to `size` (>= 75, Inception's
smallest input; the FID side 299 is costly), run through the network's layers, and at four depths (pool1, mixed_2,
mixed_7, mixed_10) the activations are unit-normalised over channels and scaled by 1 / sqrt(H W). The concatenation
is the feature vector, so the mean squared difference of two vectors is, up to a constant, LPIPS's sum over
layers of spatially averaged squared differences. Gradients flow to the images; the network is frozen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .fid import load_inception

TAPS = ("pool1", "mixed_2", "mixed_7", "mixed_10")


class InceptionFeatureMap:
    """features(images [N, C, H, W] in [-1, 1]) -> Tensor[N, F] (float32, differentiable in the images)."""

    def __init__(self, size: int = 139, device: str | torch.device = "cpu") -> None:
        if size < 75:
            raise UserError(f"the feature distance needs an input side >= 75 (Inception-v3), got {size}")
        net = load_inception(str(torch.device(device)))
        self.layers = list(net.net.layers.named_children())
        for p in net.parameters():
            p.requires_grad = False
        self.size = size

    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"the feature distance needs images [N, C, H, W] with C = 1 or 3, got "
                            f"{tuple(images.shape)}")
        h = images.float().expand(-1, 3, -1, -1)
        h = F.interpolate(h, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = []
        for name, layer in self.layers:
            if name == "pool2":     # the final 8x8 average pool fits only 299-pixel inputs
                break
            h = layer(h)
            if name in TAPS:
                unit = h / (h.norm(dim=1, keepdim=True) + 1e-10)
                out.append(unit.flatten(1) / math.sqrt(h.shape[2] * h.shape[3]))
        return torch.cat(out, 1)
