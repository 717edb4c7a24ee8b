"""`CTMModel`: a ctmkit CTM (any backbone of nets/registry.py: ctmkit's MLP / UNet, EDM's SongUNet / DhariwalUNet, a
diffusers UNet2DModel) as a diffusers `ModelMixin` / `ConfigMixin`: safetensors weights and a JSON config holding
the ModelCard (io/card.py), from which the network is rebuilt; no code is stored or run from the folder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from ..io.card import ModelCard
from ..io.runs import build_model


@dataclass
class CTMModelOutput(BaseOutput):
    """sample: g(x_t, t, s), the CTM's estimate whose jump G(x_t, t, s) = (s/t) x_t + (1 - s/t) g the scheduler
    takes (CTMScheduler.step)."""

    sample: torch.Tensor


class CTMModel(ModelMixin, ConfigMixin):
    """forward(sample x_t [B, C, H, W], timestep t, target_timestep s, class_labels [B] | None) -> g(x_t, t, s); t and
    s are EDM sigmas (floats or Tensor[B]); class labels are int64 class indices (-1: the null label). `card`: the
    ModelCard as a model.json dict; the CTM itself is `.ctm` (with `.card`, as `ctmkit.load_model` returns it)."""

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, card: dict) -> None:
        super().__init__()
        model_card = ModelCard.from_dict(card)
        self.ctm = build_model(model_card, "the model's config.json")
        self.ctm.card = model_card

    @property
    def card(self) -> ModelCard:
        return self.ctm.card

    def forward(self, sample: torch.Tensor, timestep, target_timestep, class_labels: torch.Tensor | None = None,
                w: torch.Tensor | None = None, return_dict: bool = True):
        """g(x_t, t, s) (w [B]: the guidance scale of a student distilled for a range of scales)."""
        with self.precision(sample):
            g = self.ctm.g(sample, timestep, target_timestep, class_labels, w)
        return CTMModelOutput(sample=g) if return_dict else (g,)

    def precision(self, sample: torch.Tensor):
        """Weights in bf16 / fp16: the backbone's matrix products run in that dtype (autocast) while the sample,
        the noise levels and the preconditioning stay float32, as in ctmkit's mixed-precision training."""
        dtype = self.dtype
        return torch.autocast(sample.device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))
