"""LPIPS with average pooling: the CTM reference's distance for `ctm.distance=lpips` (docs/method.md section 3).

What the reference does (sony/ctm, code/cm/enc_dec_lib.py: load_feature_extractor builds piq's
`LPIPS(replace_pooling=True, reduction="none")`; code/cm/karras_diffusion.py: get_CTM_loss calls it): estimate and
target, in [-1, 1], are resized bilinearly to 224 x 224 when their side is below 256 (`F.interpolate(x, size=224,
mode="bilinear")`, align_corners False), mapped to [0, 1] by (x + 1) / 2 and passed to piq, which (piq 0.8,
piq/perceptual.py: ContentLoss, LPIPS) normalises them with the ImageNet mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225), runs torchvision's VGG16 `features` with every MaxPool2d replaced by AvgPool2d(2, 2), takes
relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (indices 3, 8, 15, 22, 29), unit-normalises each over channels
(eps 1e-10) and returns, per image,

    d(x, y) = sum_l mean_{h,w} sum_c w_lc (f_lchw(x) - f_lchw(y))^2,

w_l the LPIPS v0.1 linear heads. This module does the same with its own VGG16 stack (torchvision's layer indices,
so a torchvision state dict loads by name) and the heads shipped in weights/lpips_vgg_v0.1.safetensors (converted
from the `lpips` wheel, BSD licence: weights/NOTICE). The affine map (x + 1) / 2 then ImageNet mean / std equals
the `lpips` package's own ScalingLayer on [-1, 1] (shift -0.030, -0.088, -0.188; scale 0.458, 0.448, 0.450) up to
its rounding. Gray images are repeated over three channels. The backbone is frozen; gradients flow to the images.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pretrained import WeightFile, load_into

HEADS_FILE = Path(__file__).resolve().parent / "weights" / "lpips_vgg_v0.1.safetensors"
VGG16 = (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512)   # through relu5_3
TAPS = (3, 8, 15, 22, 29)                   # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EPS = 1e-10                                 # piq's (and lpips') eps of the channel normalisation

VGG_WEIGHTS = WeightFile(
    "ctm.lpips_vgg", "ctm.distance=lpips",
    "torchvision's VGG16 ImageNet weights, vgg16-397923af.pth (published at "
    "https://download.pytorch.org/models/vgg16-397923af.pth; a state dict with features.N.weight / features.N.bias, "
    ".pth or .safetensors)")


def vgg16_features(avg_pool: bool = True) -> nn.Sequential:
    """torchvision's `vgg16().features[:30]` (conv1_1 .. relu5_3, same indices), max pooling replaced by average
    pooling when `avg_pool` (piq's replace_pooling). Randomly initialised."""
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16:
        if v == "P":
            layers.append(nn.AvgPool2d(2, 2) if avg_pool else nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
            c = int(v)
    return nn.Sequential(*layers)


def lpips_heads() -> list[Tensor]:
    """The shipped LPIPS v0.1 VGG16 linear heads: 5 tensors [1, C, 1, 1], C = 64, 128, 256, 512, 512."""
    from safetensors.torch import load_file
    sd = load_file(str(HEADS_FILE))
    return [sd[f"lin{i}.model.1.weight"] for i in range(len(TAPS))]


class LPIPS(nn.Module):
    """``lpips(a [B, C, H, W], b [B, C, H, W]) -> Tensor[B]`` for images in [-1, 1], C = 1 or 3.

    ``size``: images with a side below 256 are resized to ``size`` x ``size`` first (the reference: 224). The
    VGG16 weights start random; `from_file` loads a user's torchvision state dict. Its state dict holds the VGG16
    weights only (``features.N.*``); the heads and the normalisation are fixed buffers.
    """

    def __init__(self, size: int = 224) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):             # the random init is overwritten: leave the stream be
            self.features = vgg16_features()
        for i, w in enumerate(lpips_heads()):
            self.register_buffer(f"head{i}", w.float(), persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.size = size
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str, size: int = 224) -> LPIPS:
        """LPIPS over the VGG16 weights in `path` (the value of ctm.lpips_vgg); UserError naming the key when the file
        is missing, unreadable or not a VGG16 state dict."""
        net = cls(size)
        sd = VGG_WEIGHTS.read(path)
        load_into(net, sd, VGG_WEIGHTS, path)
        return net

    def prepare(self, x: Tensor) -> Tensor:
        """[-1, 1] images -> VGG16 input: 3 channels, resized below 256, (x + 1) / 2 ImageNet-normalised."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS needs images [B, C, H, W] with C = 1 or 3, got {tuple(x.shape)}")
        x = x.float().expand(-1, 3, -1, -1)
        if x.shape[-2] < 256:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return ((x + 1) / 2 - self.mean) / self.std

    def taps(self, x: Tensor) -> list[Tensor]:
        """The five VGG16 activations, each unit-normalised over channels (float32)."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                f = x.float()
                out.append(f / (f.square().sum(1, keepdim=True).sqrt() + EPS))
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        fa, fb = self.taps(self.prepare(a)), self.taps(self.prepare(b))   # apart: identical inputs give exactly 0
        heads = [getattr(self, f"head{i}") for i in range(len(TAPS))]
        return sum(((x - y).square() * w).sum(1).mean((1, 2)) for x, y, w in zip(fa, fb, heads))
