"""A diffusers `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x, SDXL) as a ctmkit backbone F(z_in, noise_t,
noise_s, cond) on latents, with the CTM's second time input.

The condition is a `TextCond` (core/conditions.py): its prompt embeddings [B, L, D] are the UNet's
`encoder_hidden_states` (cross-attention); its null (the empty prompt) is just another embedding, so the backbone
needs no null handling of its own. An SDXL UNet (`addition_embed_type="text_time"`) also takes SDXL's added
conditions, as StableDiffusionXLPipeline passes them: `text_embeds` the condition's pooled embeddings [B, P] and
`time_ids` (original size, crop top-left, target size) = (H, W, 0, 0, H, W), H x W the image size of the latents,
(h, w) times the VAE's scale factor (`vae_scale_factor`, kept in the backbone's spec), the pipeline's defaults.
s enters as for the pixel UNet (nets/diffusers_unet.py: SEmbedded): a zero-initialised embedding added to the UNet's
time embedding (before the added conditions' embedding joins it), so a student copied from the teacher starts as it.
Parameter names are the UNet's own under `unet.` plus `s_embed.`.

Not taken (one line each): other added conditions (`addition_embed_type` text, image ...: Kandinsky's), class or
image conditions (`class_embed_type`, `num_class_embeds`), and non-positional time embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.conditions import TextCond
from ..errors import UserError
from .diffusers_unet import SEmbedded, import_diffusers

UNSUPPORTED = {"class_embed_type": "class embeddings", "num_class_embeds": "class embeddings",
               "encoder_hid_dim_type": "projected encoder states"}
TEXT_TIME = "text_time"         # SDXL's added conditions: pooled text embeddings and time ids


class DiffusersCondUNet(SEmbedded):
    """forward(z_in [B, C, h, w], noise_t [B] (timesteps), noise_s [B] | None, cond: TextCond) -> [B, C, h, w].
    `unet`: a loaded UNet2DConditionModel of this config to wrap (a teacher's, so its weights are not built twice);
    None builds a fresh one (a run folder's network, whose weights load afterwards). `vae_scale_factor`: image pixels
    per latent pixel, for an SDXL UNet's time ids (required by one, unused otherwise)."""

    def __init__(self, config: dict, unet=None, vae_scale_factor: int | None = None) -> None:
        super().__init__()
        diffusers = import_diffusers()
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        check_cond_config(cfg)
        self.config = cfg
        self.vae_scale_factor = None
        if cfg.get("addition_embed_type") == TEXT_TIME:
            if not isinstance(vae_scale_factor, int) or vae_scale_factor < 1:
                raise ValueError(f"an SDXL UNet needs its VAE's scale factor: vae_scale_factor={vae_scale_factor!r}")
            self.vae_scale_factor = vae_scale_factor
        self.attach_s_embedding(diffusers.UNet2DConditionModel(**cfg) if unet is None else unet, cfg)

    def forward(self, x: Tensor, noise_t: Tensor, noise_s: Tensor | None = None, labels=None) -> Tensor:
        if not isinstance(labels, TextCond):
            raise ValueError("this network is text-conditioned: pass a TextCond (teacher.encode_prompt(prompts)) "
                             f"as its condition, not {type(labels).__name__}")
        dtype = self.unet.conv_in.weight.dtype          # a frozen teacher may sit in bf16 (ctm.teacher_dtype)
        with self.s_input(noise_s, x.dtype):
            out = self.unet(x.to(dtype), noise_t.float(), encoder_hidden_states=labels.embeds.to(dtype),
                            added_cond_kwargs=self.added_conditions(x, labels, dtype)).sample
        return out[:, :self.channels].to(x.dtype)

    def added_conditions(self, x: Tensor, cond: TextCond, dtype: torch.dtype) -> dict | None:
        """An SDXL UNet's added_cond_kwargs: the pooled embeddings and the time ids of x's image size (None for
        a UNet without added conditions)."""
        if self.vae_scale_factor is None:
            return None
        if cond.pooled is None:
            raise ValueError("this SDXL UNet takes pooled text embeddings: pass the TextCond of "
                             "teacher.encode_prompt(prompts), which carries them")
        h, w = (int(n) * self.vae_scale_factor for n in x.shape[-2:])
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=x.device).expand(len(x), 6)  # exact
        return {"text_embeds": cond.pooled.to(dtype), "time_ids": ids}


def check_cond_config(cfg: dict) -> None:
    """UserError for a UNet2DConditionModel config ctmkit does not run (UNSUPPORTED; added conditions other than
    SDXL's; time embeddings other than positional, which cannot take fractional timesteps)."""
    for key, what in UNSUPPORTED.items():
        if cfg.get(key) is not None:
            raise UserError(f"UNet2DConditionModel with {key}={cfg[key]!r} ({what}) is not supported yet; ctmkit "
                            "takes text-conditioned UNets of the Stable Diffusion 1.x / 2.x and SDXL kinds")
    if cfg.get("addition_embed_type") not in (None, TEXT_TIME):
        raise UserError(f"UNet2DConditionModel with addition_embed_type={cfg['addition_embed_type']!r} is not "
                        f"supported yet; ctmkit takes none or {TEXT_TIME!r} (SDXL's pooled text embeddings and time "
                        "ids)")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise UserError(f"UNet2DConditionModel with time_embedding_type={cfg['time_embedding_type']!r} is not "
                        "supported (only 'positional' takes fractional timesteps)")
