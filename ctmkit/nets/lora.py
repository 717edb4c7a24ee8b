"""LoRA students of a diffusers UNet or SD3 transformer (docs/method.md section 9, `ctm.lora_rank=R`): low-rank
adapters (Hu et al. 2022, through peft) on the denoiser's attention and projection layers, trained with the
zero-initialised s embedding while every other weight stays the teacher's and frozen.

Adapted layers (LORA_TARGETS, by the denoiser's class): in a UNet2DConditionModel the attention projections to_q,
to_k, to_v, to_out.0 (self- and cross-attention), the transformer blocks' proj_in / proj_out and their feed-forward
layers ff.net.0.proj (GEGLU) and ff.net.2; the convolutions of the ResNet blocks are not adapted. In an
SD3Transformer2DModel the joint attention's projections of the image and the text stream (to_q, to_k, to_v,
to_out.0; add_q_proj, add_k_proj, add_v_proj, to_add_out) and both streams' feed-forward layers (ff.*, ff_context.*);
not the AdaLN modulations, the embedders or the output projection. lora_alpha = rank (scale 1); B starts at zero, so
a LoRA student starts as the network it adapts. The adapters can be switched off (`adapters_off`): the same module
is then the teacher again (the s embedding is bypassed by the teacher, which passes no s), so the big weights sit in
memory once.

peft is an optional extra (with diffusers), imported only here and only when a LoRA network is built.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from ..errors import UserError
from .diffusers_cond import DiffusersCondUNet
from .diffusers_sd3 import DiffusersSD3
from .diffusers_unet import import_diffusers

LORA_TARGETS = {"UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                         "ff.net.2"],
                "SD3Transformer2DModel": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                          "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                                          "ff_context.net.0.proj", "ff_context.net.2"]}
BACKBONES = {"diffusers_unet2d_cond": ("unet", "UNet2DConditionModel", DiffusersCondUNet),    # spec.arch ->
             "diffusers_sd3": ("transformer", "SD3Transformer2DModel", DiffusersSD3)}         # folder, class, wrapper
INSTALL_HINT = "ctm.lora_rank needs peft: pip install peft"


def is_trained(name: str) -> bool:
    """A parameter name (of a CTM or backbone) that a LoRA student trains: its adapters and its s embedding."""
    return "lora_" in name or name.startswith("s_embed.") or ".s_embed." in name     # not SD3's pos_embed.


def lora_targets(backbone: nn.Module) -> list[str]:
    """The layer names adapted in a diffusers backbone (SEmbedded), by its denoiser's class."""
    return LORA_TARGETS[type(backbone.denoiser).__name__]


def add_lora(backbone: nn.Module, rank: int) -> nn.Module:
    """Inject rank-`rank` adapters into backbone.denoiser (in place) and make the adapters and backbone.s_embed the
    only parameters that need gradients; returns the backbone."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=lora_targets(backbone), lora_dropout=0.0,
                        init_lora_weights=True)
    backbone.requires_grad_(False)
    inject_adapter_in_model(config, backbone.denoiser)
    for name, p in backbone.named_parameters():
        p.requires_grad_(is_trained(name))
    return backbone


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The layers of `module` that peft adapted."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(layers: list[nn.Module]):
    """Within: the adapted layers compute their base layers alone (the teacher's weights)."""
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


@contextlib.contextmanager
def checkpointing_off(unet: nn.Module):
    """Within: no gradient checkpointing in a diffusers model that has it on (for a call whose weights are swapped in
    for that call only, which a recomputation in the backward pass would not see)."""
    on = bool(getattr(unet, "is_gradient_checkpointing", False))
    if on:
        unet.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if on:
            unet.enable_gradient_checkpointing()


def lora_backbone(spec, folder: str | Path, rank: int) -> nn.Module:
    """A LoRA student's backbone rebuilt for loading its trained tensors: the UNet or transformer of the pipeline
    folder its card names (the teacher's weights), its s embedding and the adapters (load_model, io/runs.py)."""
    name, class_name, wrapper = BACKBONES[spec.arch]
    where = f"the pipeline of this LoRA student, '{folder}'"
    try:
        model = getattr(import_diffusers(), class_name).from_pretrained(Path(folder) / name, local_files_only=True)
    except Exception as e:      # moved or broken: one line naming the folder
        raise UserError(f"cannot load the {name}/ of {where} ({str(e).splitlines()[0]}); a LoRA student keeps only "
                        "its adapters and reads the rest from the teacher's folder") from None
    backbone = wrapper(**{**spec.kwargs, name: model})       # config (an SDXL UNet's vae_scale_factor), the model
    return add_lora(backbone, rank).requires_grad_(False)
