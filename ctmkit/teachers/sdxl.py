"""Stable Diffusion XL teachers (docs/method.md section 9): `diffusers:DIR` for a StableDiffusionXLPipeline folder as
`save_pretrained` writes it: `unet/` (a UNet2DConditionModel with SDXL's added conditions, addition_embed_type
"text_time"), `vae/` (AutoencoderKL), `scheduler/`, `text_encoder/` (CLIPTextModel, CLIP-L) with `tokenizer/`, and
`text_encoder_2/` (CLIPTextModelWithProjection, OpenCLIP-G) with `tokenizer_2/`.

The UNet, its scheduler and the VAE are read as for Stable Diffusion 1.x / 2.x (teachers/latent.py:
load_unet_pipeline, the same VP conversion); the condition is a TextCond with pooled embeddings from
`teacher.encode_prompt` (nets/text_encoders.py: SDXLPromptEncoder): both encoders' penultimate hidden states
concatenated along features, and text_encoder_2's projection as the pooled embedding. The backbone
(nets/diffusers_cond.py) passes the pooled embeddings and the time ids (H, W, 0, 0, H, W) of the image size as the
UNet's added conditions, the pipeline's defaults. The null condition follows the pipeline's
`force_zeros_for_empty_prompt` (model_index.json, true by default): zeros for the empty negative prompt.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..io.card import read_json_object
from ..nets.text_encoders import SDXL_CLIPS
from .latent import COMPONENTS as SD_COMPONENTS
from .latent import LatentTeacher, check_components, load_unet_pipeline

COMPONENTS = SD_COMPONENTS | {"text_encoder": "CLIP-L, a CLIPTextModel",
                              "text_encoder_2": "OpenCLIP-G, a CLIPTextModelWithProjection",
                              "tokenizer_2": "text_encoder_2's CLIP tokenizer"}


def is_sdxl(index: dict) -> bool:
    """model_index.json of an SDXL pipeline: its class is StableDiffusionXL..., or it names a text_encoder_2."""
    return str(index.get("_class_name", "")).startswith("StableDiffusionXL") or "text_encoder_2" in index


def load_sdxl(folder: Path, index: dict) -> LatentTeacher:
    """An SDXL pipeline folder (model_index.json read as `index`) -> its LatentTeacher (CPU, eval mode, `.card`)."""
    check_components(folder, index, COMPONENTS)
    return load_unet_pipeline(folder, index, text_facts(folder, index))


def text_facts(folder: Path, index: dict) -> dict:
    """What the card keeps of SDXL's text conditioning: the encoders' classes, the embedding shape [L, D_1 + D_2]
    (L the tokenizers' model_max_length, the same for both), the pooled width P (text_encoder_2's projection_dim),
    the null prompt and force_zeros_for_empty_prompt; a wrong class or a missing or inconsistent size: one line."""
    where = f"diffusers teacher '{folder}'"
    for n, allowed in zip(("", "_2"), SDXL_CLIPS):
        if index[f"text_encoder{n}"][1] not in allowed:
            raise UserError(f"{where}: its text_encoder{n} is a {index[f'text_encoder{n}'][1]}; an SDXL pipeline "
                            f"has a {' or '.join(allowed)} there")
    encs = [read_json_object(folder / f"text_encoder{n}" / "config.json", where) for n in ("", "_2")]
    toks = [read_json_object(folder / f"tokenizer{n}" / "tokenizer_config.json", where) for n in ("", "_2")]
    if any("hidden_size" not in e for e in encs) or "projection_dim" not in encs[1] \
            or any("model_max_length" not in t for t in toks):
        raise UserError(f"{where}: the text encoders' configs need hidden_size (text_encoder_2's also "
                        "projection_dim) and the tokenizers' tokenizer_config.json model_max_length")
    length = int(toks[0]["model_max_length"])
    if int(toks[1]["model_max_length"]) != length:
        raise UserError(f"{where}: its tokenizers pad to {length} and {toks[1]['model_max_length']} tokens; SDXL "
                        "concatenates both encoders' states token by token, so they must agree")
    encoders = [{"encoder": index[f"text_encoder{n}"][1], "tokenizer": index[f"tokenizer{n}"][1]} for n in ("", "_2")]
    return {"encoders": encoders, "embeds": [length, sum(int(e["hidden_size"]) for e in encs)],
            "pooled": int(encs[1]["projection_dim"]), "null_prompt": "",
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}
