"""LoRA students of a diffusers UNet (docs/method.md section 9, `ctm.lora_rank=R`): low-rank adapters (Hu et al. 2022,
through peft) on the UNet's attention and projection layers, trained with the zero-initialised s embedding while
every other weight stays the teacher's and frozen.

Adapted layers (LORA_TARGETS): the attention projections to_q, to_k, to_v, to_out.0 (self- and cross-attention),
the transformer blocks' proj_in / proj_out and their feed-forward layers ff.net.0.proj (GEGLU) and ff.net.2; the
convolutions of the ResNet blocks are not adapted. lora_alpha = rank (scale 1); B starts at zero, so a LoRA student
starts as the network it adapts. The adapters can be switched off (`adapters_off`): the same module is then the
teacher again (the s embedding is bypassed by the teacher, which passes no s), so the big weights sit in memory once.

peft is an optional extra (with diffusers), imported only here and only when a LoRA network is built.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from ..errors import UserError
from .diffusers_cond import DiffusersCondUNet
from .diffusers_unet import import_diffusers

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
INSTALL_HINT = "ctm.lora_rank needs peft: pip install peft"


def is_trained(name: str) -> bool:
    """A parameter name (of a CTM or backbone) that a LoRA student trains: its adapters and its s embedding."""
    return "lora_" in name or "s_embed." in name


def add_lora(backbone: nn.Module, rank: int) -> nn.Module:
    """Inject rank-`rank` adapters into backbone.unet (in place) and make the adapters and backbone.s_embed the only
    parameters that need gradients; returns the backbone."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, lora_dropout=0.0,
                        init_lora_weights=True)
    backbone.requires_grad_(False)
    inject_adapter_in_model(config, backbone.unet)
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
    """A LoRA student's backbone rebuilt for loading its trained tensors: the UNet of the pipeline folder its card
    names (the teacher's weights), its s embedding and the adapters (load_model, io/runs.py)."""
    where = f"the pipeline of this LoRA student, '{folder}'"
    try:
        unet = import_diffusers().UNet2DConditionModel.from_pretrained(Path(folder) / "unet", local_files_only=True)
    except Exception as e:      # moved or broken: one line naming the folder
        raise UserError(f"cannot load the unet/ of {where} ({str(e).splitlines()[0]}); a LoRA student keeps only "
                        "its adapters and reads the rest from the teacher's folder") from None
    backbone = DiffusersCondUNet(spec.kwargs["config"], unet)
    return add_lora(backbone, rank).requires_grad_(False)
