"""A diffusers `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x) as a ctmkit backbone F(z_in, noise_t, noise_s,
cond) on latents, with the CTM's second time input.

The condition is a `TextCond` (core/conditions.py): its prompt embeddings [B, L, D] are the UNet's
`encoder_hidden_states` (cross-attention); its null (the empty prompt) is just another embedding, so the backbone
needs no null handling of its own. s enters as for the pixel UNet (nets/diffusers_unet.py: SEmbedded): a
zero-initialised embedding added to the UNet's time embedding, so a student copied from the teacher starts as it.
Parameter names are the UNet's own under `unet.` plus `s_embed.`.

Not yet taken (one line each): SDXL's added conditions (`addition_embed_type`, pooled text embeddings and time
ids), class or image conditions (`class_embed_type`, `num_class_embeds`), and non-positional time embeddings.
"""

from __future__ import annotations

from torch import Tensor

from ..core.conditions import TextCond
from ..errors import UserError
from .diffusers_unet import SEmbedded, import_diffusers

UNSUPPORTED = {"addition_embed_type": "SDXL-style added conditions (pooled text embeddings, time ids)",
               "class_embed_type": "class embeddings", "num_class_embeds": "class embeddings",
               "encoder_hid_dim_type": "projected encoder states"}


class DiffusersCondUNet(SEmbedded):
    """forward(z_in [B, C, h, w], noise_t [B] (timesteps), noise_s [B] | None, cond: TextCond) -> [B, C, h, w].
    `unet`: a loaded UNet2DConditionModel of this config to wrap (a teacher's, so its weights are not built twice);
    None builds a fresh one (a run folder's network, whose weights load afterwards)."""

    def __init__(self, config: dict, unet=None) -> None:
        super().__init__()
        diffusers = import_diffusers()
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        check_cond_config(cfg)
        self.config = cfg
        self.attach_s_embedding(diffusers.UNet2DConditionModel(**cfg) if unet is None else unet, cfg)

    def forward(self, x: Tensor, noise_t: Tensor, noise_s: Tensor | None = None, labels=None) -> Tensor:
        if not isinstance(labels, TextCond):
            raise ValueError("this network is text-conditioned: pass a TextCond (teacher.encode_prompt(prompts)) "
                             f"as its condition, not {type(labels).__name__}")
        dtype = self.unet.conv_in.weight.dtype          # a frozen teacher may sit in bf16 (ctm.teacher_dtype)
        with self.s_input(noise_s, x.dtype):
            out = self.unet(x.to(dtype), noise_t.float(), encoder_hidden_states=labels.embeds.to(dtype)).sample
        return out[:, :self.channels].to(x.dtype)


def check_cond_config(cfg: dict) -> None:
    """UserError for a UNet2DConditionModel config ctmkit does not run yet (UNSUPPORTED; time embeddings other than
    positional, which cannot take fractional timesteps)."""
    for key, what in UNSUPPORTED.items():
        if cfg.get(key) is not None:
            raise UserError(f"UNet2DConditionModel with {key}={cfg[key]!r} ({what}) is not supported yet; ctmkit "
                            "takes text-conditioned UNets of the Stable Diffusion 1.x / 2.x kind")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise UserError(f"UNet2DConditionModel with time_embedding_type={cfg['time_embedding_type']!r} is not "
                        "supported (only 'positional' takes fractional timesteps)")
