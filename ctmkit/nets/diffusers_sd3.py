"""A diffusers `SD3Transformer2DModel` (Stable Diffusion 3 / 3.5, an MM-DiT) as a ctmkit backbone F(z_in, noise_t,
noise_s, cond) on latents, with the CTM's second time input.

The transformer runs as StableDiffusion3Pipeline calls it: `hidden_states` the latents, `timestep` tau T (the flow's
noise level times num_train_timesteps, core/precond.py: FlowPrecond.noise), `encoder_hidden_states` the condition's
prompt embeddings [B, L, D] (CLIP-L + CLIP-G and T5 tokens, nets/text_encoders.py: SD3PromptEncoder) and
`pooled_projections` its pooled embeddings [B, P]; it predicts the velocity. s enters as for the UNets
(nets/diffusers_unet.py: SEmbedded): a zero-initialised embedding added to the output of the transformer's timestep
embedder (`time_text_embed.timestep_embedder`, which the pooled text projection is then added to), so a student
copied from the teacher starts as it. Parameter names are the transformer's own under `transformer.` plus
`s_embed.`.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.conditions import TextCond
from .diffusers_unet import SEmbedded, import_diffusers


class DiffusersSD3(SEmbedded):
    """forward(z_in [B, C, h, w], noise_t [B] (timesteps tau T), noise_s [B] | None, cond: TextCond with pooled)
    -> the velocity [B, C, h, w]. `transformer`: a loaded SD3Transformer2DModel of this config to wrap (a teacher's);
    None builds a fresh one (a run folder's network, whose weights load afterwards)."""

    MODEL = "transformer"

    def __init__(self, config: dict, transformer=None) -> None:
        super().__init__()
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        self.config = cfg
        self.transformer = (import_diffusers().SD3Transformer2DModel(**cfg) if transformer is None
                            else transformer)
        self.channels = int(cfg.get("in_channels", 16))
        embed = self.transformer.time_text_embed
        self.hook_s_embedding(embed.time_proj, embed.timestep_embedder)

    def forward(self, x: Tensor, noise_t: Tensor, noise_s: Tensor | None = None, labels=None) -> Tensor:
        if not isinstance(labels, TextCond) or labels.pooled is None:
            raise ValueError("this network is text-conditioned with pooled embeddings: pass the TextCond of "
                             f"teacher.encode_prompt(prompts) as its condition, not {type(labels).__name__}")
        dtype = self.transformer.pos_embed.proj.weight.dtype     # a frozen teacher may sit in bf16 (teacher_dtype)
        with self.s_input(noise_s, x.dtype):
            out = self.transformer(hidden_states=x.to(dtype), timestep=noise_t.float(),
                                   encoder_hidden_states=labels.embeds.to(dtype),
                                   pooled_projections=labels.pooled.to(dtype), return_dict=False)[0]
        return out.to(x.dtype)

    def last_layer(self) -> nn.Parameter:
        return self.transformer.proj_out.weight
