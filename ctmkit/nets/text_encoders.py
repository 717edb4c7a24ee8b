"""Prompt encoders of latent text-to-image pipelines: prompts -> TextCond (core/conditions.py; docs/method.md
section 9), from the text encoder and tokenizer a diffusers pipeline folder holds (`text_encoder/`, `tokenizer/`).

Stable Diffusion 1.x / 2.x (StableDiffusionPipeline.encode_prompt with clip_skip None): the prompt is tokenised,
padded and truncated to the tokenizer's model_max_length, and its embedding is the CLIP text model's last hidden
state [L, D]; the null condition is the same for the negative prompt, the empty prompt by default. Each distinct
prompt of a call runs through the encoder once, and each negative prompt's embedding is kept after its first use, so
a sampler or a data preparation encodes once and reuses the TextCond at every step.

transformers is part of the `diffusers` optional extra; it is imported only here, when a prompt encoder is loaded.
Weights are read from the folder only (local_files_only; no remote code).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..core.conditions import TextCond
from ..errors import UserError

INSTALL_HINT = ("text-conditioned (latent) teachers need transformers: pip install 'ctmkit[diffusers]' "
                "(or pip install transformers)")
ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")     # the text encoder classes a folder may name
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return transformers


def load_component(folder: Path, name: str, allowed: tuple[str, ...], class_name: str):
    """One transformers component of a pipeline folder (`folder/name`, its class named by model_index.json and one
    of `allowed`), from local files only; UserError in one line otherwise."""
    if class_name not in allowed:
        raise UserError(f"diffusers teacher '{folder}': {name}/ is a {class_name}; ctmkit takes {' or '.join(allowed)}")
    cls = getattr(import_transformers(), class_name)
    try:
        return cls.from_pretrained(folder / name, local_files_only=True)
    except Exception as e:    # a foreign folder: any failure is the user's files, said in one line
        raise UserError(f"diffusers teacher '{folder}': cannot load {name}/ ({str(e).splitlines()[0]})") from None


class PromptEncoder:
    """A CLIP text encoder + tokenizer: `encoder(prompts, negative_prompt="") -> TextCond` (CPU, float32)."""

    def __init__(self, tokenizer, encoder) -> None:
        self.tokenizer, self.encoder = tokenizer, encoder.eval().requires_grad_(False)
        self.nulls: dict[str, Tensor] = {}     # negative prompt -> its embedding [L, D]

    @classmethod
    def from_pipeline(cls, folder: Path, index: dict) -> PromptEncoder:
        """The text_encoder/ and tokenizer/ of a pipeline folder whose model_index.json is `index`."""
        tokenizer = load_component(folder, "tokenizer", TOKENIZERS, index["tokenizer"][1])
        return cls(tokenizer, load_component(folder, "text_encoder", ENCODERS, index["text_encoder"][1]))

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> Tensor:
        """Prompts [N] -> the last hidden state [N, L, D], L = the tokenizer's model_max_length."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        mask = tokens.attention_mask if getattr(self.encoder.config, "use_attention_mask", False) else None
        return self.encoder(tokens.input_ids, attention_mask=mask)[0].float()

    def __call__(self, prompts: str | list[str], negative_prompt: str = "") -> TextCond:
        """Prompts [B] -> TextCond [B] whose null is the negative prompt's embedding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UserError("encode_prompt needs one or more prompts (strings)")
        rows = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        embeds = self.embed(list(rows))[torch.tensor([rows[p] for p in prompts])]
        if negative_prompt not in self.nulls:
            self.nulls[negative_prompt] = self.embed([negative_prompt])[0]
        return TextCond(embeds, self.nulls[negative_prompt])
