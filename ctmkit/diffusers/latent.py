"""Latent text-to-image CTM students in a `ctmkit export` (docs/method.md section 9): the student as a full UNet
(a LoRA student's adapters merged into a copy of its base weights), and the teacher pipeline's VAE, text encoder and
tokenizer, which CTMPipeline saves beside it (safetensors), so that the export needs the teacher's folder no more.
The card's latent record then names the export itself (folder "."; io/export.py reads it as the export's path)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from ..errors import UserError
from ..io.card import ModelCard, read_json_object
from ..nets.text_encoders import PromptEncoder
from ..nets.vae import LatentVAE

SELF = "."              # the latent record's folder in an export: the export's own root
GRID_PROMPTS = 8        # the sample grid of the model card: the data's first prompts


def latent_components(card: ModelCard) -> dict:
    """vae, text_encoder and tokenizer of the pipeline folder a latent student's card names (float32, CPU)."""
    lat = card.latent
    if lat.get("denoiser") != "UNet2DConditionModel" or lat["text"].get("pooled"):
        what = "an SDXL pipeline's" if lat.get("denoiser") == "UNet2DConditionModel" else f"a {lat.get('denoiser')}"
        raise UserError(f"ctmkit export takes latent students of UNet (Stable Diffusion 1/2-class) pipelines; this "
                        f"one's denoiser is {what}, not exported yet")
    folder = Path(lat["folder"])
    index = read_json_object(folder / "model_index.json", f"the pipeline of this model, '{folder}'")
    encoder = PromptEncoder.from_pipeline(folder, index)
    vae = LatentVAE.from_pipeline(folder, lat["vae"])
    return {"vae": vae.vae, "text_encoder": encoder.encoder, "tokenizer": encoder.tokenizer}


def full_student(model: nn.Module) -> tuple[ModelCard, dict]:
    """(card, state dict) of a loaded latent student as a full student whose pipeline is the export itself: a LoRA
    student's adapters merged into its base weights (peft's merge; the model is changed in place)."""
    card = model.card
    latent = {k: v for k, v in card.latent.items() if k != "lora"}
    if "lora" not in card.latent:
        state = model.state_dict()
    else:
        from ..nets.lora import lora_layers
        for layer in lora_layers(model):
            layer.merge()
        state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    return dataclasses.replace(card, latent={**latent, "folder": SELF}), state


def grid_prompts(card: ModelCard) -> list[str]:
    """The model card's grid prompts: the first of the training data's prompts.json, else the empty prompt."""
    try:
        prompts = json.loads((Path(card.data.spec) / "prompts.json").read_text())
    except (OSError, ValueError, TypeError):
        prompts = []
    prompts = [p for p in prompts if isinstance(p, str)] if isinstance(prompts, list) else []
    return prompts[:GRID_PROMPTS] or [""]
