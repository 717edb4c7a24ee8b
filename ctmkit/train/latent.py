"""CTM students of latent text-to-image teachers (docs/method.md section 9): the student, the teacher it shares a
module with when it is a LoRA student, and the trained tensors that such a student's target network, EMAs and
checkpoints hold.

A full student is the teacher's UNet or SD3 transformer (weights copied) plus the zero-initialised s embedding,
drawn from train.seed, so it starts as the teacher in the form ctm.student_precond picks. A LoRA student
(ctm.lora_rank=R, nets/lora.py) is the teacher's own module with adapters injected: only the adapters and the s
embedding train; the teacher is the same module with the adapters off (and no s), so the denoiser's weights sit in
memory once. Its target network theta^- and EMAs are copies of the trained tensors alone (`Trained`), run on the
shared module by torch.func.functional_call (`TargetNet`). The frozen weights take ctm.teacher_dtype (bf16 on CUDA
devices that support it by default).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..core.precond import CTM, make_precond
from ..errors import UserError
from ..nets.lora import adapters_off, add_lora, checkpointing_off, lora_layers

log = logging.getLogger(__name__)


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """ctm.teacher_dtype resolved: 'auto' is bfloat16 on a CUDA device that supports it, else float32."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """A frozen denoiser's weights in `dtype`. Nothing is done when they already are; diffusers' `to(dtype)` warns
    about modules to keep in float32 on every cast, even when the model names none (SD's UNet), so torch's own `to`
    casts such a model, and diffusers' (warning included) one that names some."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if all(t.dtype == dtype for t in tensors):
        return
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(dtype)
    else:
        nn.Module.to(module, dtype)


class Trained(nn.Module):
    """The tensors a LoRA student trains (its adapters and s embedding), by their names in the network. Built on a
    live network it holds that network's own Parameters (no copy); `frozen_copy` of it copies them alone (theta^-,
    the EMAs). state_dict / load_state_dict use the network's parameter names."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.values = nn.ParameterList([p for _, p in named])

    def tensors(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.values))

    def state_dict(self, *args, **kwargs) -> OrderedDict:
        return OrderedDict((n, p.detach()) for n, p in zip(self.names, self.values))

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        if sorted(state) != sorted(self.names):
            raise RuntimeError(f"the checkpoint's {len(state)} trained tensors are not this LoRA student's "
                               f"{len(self.names)}")
        with torch.no_grad():
            for n, p in zip(self.names, self.values):
                p.copy_(state[n])
        return None


class TargetNet:
    """G_{theta^-}(x, t, s, cond) of a LoRA student: the shared network run with the target's trained tensors in
    place of the online ones for this call (gradient checkpointing off: a recomputation in the backward pass would
    see the online tensors)."""

    def __init__(self, net: CTM, target: Trained) -> None:
        self.net, self.target = net, target

    def __call__(self, *args) -> Tensor:
        with checkpointing_off(self.net.backbone.denoiser):
            return functional_call(self.net, self.target.tensors(), args)


class SharedTeacher:
    """The teacher D(z, sigma, cond) of a LoRA student: the shared module with its adapters off (its `.card`, and
    the denoiser protocol)."""

    def __init__(self, teacher, layers: list[nn.Module]) -> None:
        self.teacher, self.layers, self.card = teacher, layers, teacher.card

    def __call__(self, x: Tensor, sigma, cond) -> Tensor:
        with adapters_off(self.layers):
            return self.teacher(x, sigma, cond)


def latent_student(run, init: bool) -> tuple[CTM, nn.Module, object]:
    """(the student, what it trains: itself or its Trained tensors, the teacher to distil from) of a CTMRun on a
    latent teacher, with ctm.teacher_dtype applied to the frozen weights (after the student's copy)."""
    cfg, teacher = run.cfg, run.teacher
    c = cfg.ctm
    if not init or c.student_dropout >= 0 and c.lora_rank:
        raise UserError("a latent text-to-image student starts as its teacher: keep ctm.init_from_teacher=true (and "
                        "ctm.student_dropout=-1 with ctm.lora_rank)")
    dtype = teacher_dtype(c.teacher_dtype, run.device)
    precond = make_precond(run.precond, cfg.model.sigma_data)
    if not c.lora_rank:
        net = CTM(run.spec.build(), cfg.model.sigma_data, precond)
        shared = {k: v for k, v in teacher.state_dict().items() if ".s_embed." not in k}   # s: drawn from the seed
        missing = net.load_state_dict(shared, strict=False)
        assert not missing.unexpected_keys and all(".s_embed." in k for k in missing.missing_keys), missing
        cast_frozen(teacher.backbone.denoiser, dtype)
        return net, net, teacher
    backbone = teacher.backbone
    for m in backbone.s_embed.modules():                          # the s embedding from train.seed, last layer 0
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    nn.init.zeros_(backbone.s_embed.linear_2.weight)
    nn.init.zeros_(backbone.s_embed.linear_2.bias)
    add_lora(backbone, c.lora_rank)
    for p in backbone.parameters():                               # frozen weights in the teacher's dtype
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    net = CTM(backbone, cfg.model.sigma_data, precond)
    return net, Trained(net), SharedTeacher(teacher, lora_layers(backbone))


def lora_last_layer(net: CTM) -> nn.Parameter:
    """The adaptive weights' reference layer of a LoRA student (its denoiser's output layer is frozen): the last
    adapter B matrix of a UNet's decoder (up_blocks), of a transformer's last block, else the s embedding's last
    layer."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad and "lora_B" in n]
    up = [p for n, p in named if ".up_blocks." in n] or [p for n, p in named if ".transformer_blocks." in n]
    return up[-1] if up else net.backbone.s_embed.linear_2.weight
