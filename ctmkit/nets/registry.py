"""The backbone registry: the table of constructors keyed by the config's `model.arch`, and the spec (arch +
constructor arguments) that a model card stores so a run folder can rebuild its network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..errors import UserError
from .diffusers_cond import DiffusersCondUNet
from .diffusers_sd3 import DiffusersSD3
from .diffusers_unet import DiffusersUNet, label_count
from .edm_unets import DhariwalUNet, SongUNet
from .mlp import MLP
from .unet import UNet


def _unet(**kw) -> UNet:
    kw["channel_mult"], kw["attn_resolutions"] = tuple(kw["channel_mult"]), tuple(kw["attn_resolutions"])
    return UNet(**kw)


BACKBONES: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "unet": _unet, "diffusers_unet2d": DiffusersUNet,
                                                  "diffusers_unet2d_cond": DiffusersCondUNet,
                                                  "diffusers_sd3": DiffusersSD3,
                                                  "edm_songunet": SongUNet, "edm_dhariwalunet": DhariwalUNet}
DATA_KIND = {"mlp": "vector", "unet": "image", "diffusers_unet2d": "image", "edm_songunet": "image",
             "edm_dhariwalunet": "image", "songunet": "image", "dhariwalunet": "image",
             "diffusers_unet2d_cond": "latent", "diffusers_sd3": "latent"}   # data kind per arch


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone: its registry key and constructor keyword arguments (JSON-serialisable)."""

    arch: str
    kwargs: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        if "config" in self.kwargs:          # a diffusers UNet2DModel: its class embeddings (less a null one)
            return label_count(self.kwargs["config"], self.kwargs.get("null_class"))
        return int(self.kwargs.get("num_classes", self.kwargs.get("label_dim", 0)))   # label_dim: EDM's U-Nets

    def to_dict(self) -> dict:
        return {"arch": self.arch, "kwargs": dict(self.kwargs)}

    def build(self) -> nn.Module:
        if self.arch not in BACKBONES:
            raise UserError(f"unknown backbone '{self.arch}'; known: {', '.join(BACKBONES)}")
        return BACKBONES[self.arch](**self.kwargs)


def _edm_unet_spec(arch: str, mcfg, shape: tuple, classes: int) -> BackboneSpec:
    """SongUNet (DDPM++ settings) or DhariwalUNet (ADM) from the model config: channels -> model_channels,
    num_res_blocks -> num_blocks; EDM-preconditioned like ctmkit's own UNet."""
    c, h, w = shape
    if h != w:
        raise UserError(f"model.arch={arch} needs square images, got {h}x{w}")
    kw = dict(img_resolution=h, in_channels=c, out_channels=c, label_dim=classes, model_channels=mcfg.channels,
              channel_mult=list(mcfg.channel_mult), num_blocks=mcfg.num_res_blocks,
              attn_resolutions=list(mcfg.attn_resolutions), dropout=mcfg.dropout)
    return BackboneSpec("edm_songunet" if arch == "songunet" else "edm_dhariwalunet", kw)


def auto_arch(arch: str, kind: str) -> str:
    """'auto' -> the backbone for this data kind (mlp for vectors, unet for images)."""
    return arch if arch != "auto" else ("mlp" if kind == "vector" else "unet")


def backbone_spec(mcfg, kind: str, shape: tuple, num_classes: int, data_name: str) -> BackboneSpec:
    """The backbone for data of `kind` and `shape` from a model config (`mcfg`: ctmkit.config.ModelConfig)."""
    arch = auto_arch(mcfg.arch, kind)
    if arch in DATA_KIND and DATA_KIND[arch] != kind:
        other = "unet" if DATA_KIND[arch] == "vector" else "mlp"
        raise UserError(f"model.arch={arch} needs {DATA_KIND[arch]} data, but '{data_name}' holds {kind}s; "
                        f"use arch={other}")
    classes = num_classes if mcfg.conditional else 0
    if arch in ("songunet", "dhariwalunet"):      # EDM's U-Nets (clean-room, same names and maths)
        return _edm_unet_spec(arch, mcfg, shape, classes)
    if arch == "mlp":
        return BackboneSpec("mlp", dict(dim=shape[0], hidden=mcfg.hidden, depth=mcfg.depth, emb_dim=mcfg.emb_dim,
                                        dropout=mcfg.dropout, num_classes=classes, fourier_scale=mcfg.fourier_scale))
    c, h, w = shape
    if h != w:
        raise UserError(f"the UNet needs square images, got {h}x{w}")
    return BackboneSpec("unet", dict(
        in_channels=c, resolution=h, model_channels=mcfg.channels, channel_mult=tuple(mcfg.channel_mult),
        num_res_blocks=mcfg.num_res_blocks, attn_resolutions=tuple(mcfg.attn_resolutions),
        dropout=mcfg.dropout, num_classes=classes, fourier_scale=mcfg.fourier_scale))
