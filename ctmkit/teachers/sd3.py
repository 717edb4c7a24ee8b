"""Stable Diffusion 3 teachers (docs/method.md section 9): `diffusers:DIR` for a StableDiffusion3Pipeline folder as
`save_pretrained` writes it: `transformer/` (SD3Transformer2DModel), `vae/` (AutoencoderKL with its scaling and
shift factors), `scheduler/` (FlowMatchEulerDiscreteScheduler), `text_encoder/` and `text_encoder_2/` (CLIP-L and
CLIP-G, CLIPTextModelWithProjection) with `tokenizer/` and `tokenizer_2/`, and `text_encoder_3/` (T5EncoderModel)
with `tokenizer_3/`, or without these two (saved with text_encoder_3=None: zeros in T5's place, as diffusers does).

The transformer predicts the velocity of a rectified flow z_tau = (1 - tau) z0 + tau n on the VAE's latents; the
teacher is D(z, sigma, cond) in the EDM convention through core/precond.py: FlowPrecond, the same conversion as a
pixel flow teacher's (teachers/foreign.py): sigma = tau / (1 - tau), the transformer's timestep tau T. The
scheduler's `shift` (or its resolution-dependent dynamic shifting) only moves the sampling grid of tau (the timesteps
it passes are the shifted tau times T), so D does not depend on it; the card keeps the scheduler's config for
samplers that want the pipeline's schedule. `cond` is a TextCond with pooled embeddings from
`teacher.encode_prompt` (nets/text_encoders.py: SD3PromptEncoder). Flux (FluxTransformer2DModel) and other
transformers are refused in one line.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..io.card import read_json_object
from ..nets.diffusers_sd3 import DiffusersSD3
from ..nets.diffusers_unet import unet_config_from
from ..nets.registry import BackboneSpec
from ..nets.text_encoders import MAX_SEQUENCE_LENGTH
from .foreign import scheduler_precond
from .latent import LatentTeacher, check_channels, check_components, listed, load_model, vae_facts, with_card

COMPONENTS = {"transformer": "the SD3Transformer2DModel", "vae": "the AutoencoderKL",
              "scheduler": "its FlowMatchEulerDiscreteScheduler",
              "text_encoder": "CLIP-L, a CLIPTextModelWithProjection", "tokenizer": "CLIP-L's tokenizer",
              "text_encoder_2": "CLIP-G, a CLIPTextModelWithProjection", "tokenizer_2": "CLIP-G's tokenizer"}
T5_COMPONENTS = {"text_encoder_3": "T5, a T5EncoderModel", "tokenizer_3": "T5's tokenizer"}


def load_sd3(folder: Path, index: dict) -> LatentTeacher:
    """A transformer pipeline folder (model_index.json read as `index`) -> its LatentTeacher (CPU, eval mode,
    `.card`); only SD3Transformer2DModel pipelines are taken."""
    where = f"diffusers teacher '{folder}'"
    name = index["transformer"][1]
    if name != "SD3Transformer2DModel":
        raise UserError(f"{where}: its transformer is a {name}, which ctmkit does not support yet; it takes "
                        "SD3Transformer2DModel (Stable Diffusion 3) and UNet2DConditionModel (Stable Diffusion 1.x / "
                        "2.x) pipelines")
    check_components(folder, index, COMPONENTS | (T5_COMPONENTS if listed(index, "text_encoder_3") else {}))
    cfg = read_json_object(folder / "transformer" / "config.json", where)
    vae, text = vae_facts(folder), text_facts(folder, index, cfg)
    check_channels(where, "transformer", cfg, vae)
    schedule = read_json_object(folder / "scheduler" / "scheduler_config.json", where)
    if schedule.get("_class_name") != "FlowMatchEulerDiscreteScheduler" or schedule.get("invert_sigmas"):
        raise UserError(f"{where}: its scheduler is a {schedule.get('_class_name')}"
                        f"{' with invert_sigmas' if schedule.get('invert_sigmas') else ''}; an SD3 transformer "
                        "predicts a flow's velocity: ctmkit takes FlowMatchEulerDiscreteScheduler")
    precond, sigma_min, sigma_max = scheduler_precond(folder / "scheduler")
    transformer = load_model(folder, "transformer", "SD3Transformer2DModel")
    config = unet_config_from(transformer)
    teacher = LatentTeacher(DiffusersSD3(config, transformer), precond, folder, index)
    facts = {"denoiser": "SD3Transformer2DModel", "vae": vae, "text": text,
             "scheduler": {k: v for k, v in schedule.items() if not k.startswith("_")}}   # sampling only, not D
    return with_card(teacher, BackboneSpec("diffusers_sd3", {"config": config}), (sigma_min, sigma_max), facts,
                     config.get("sample_size") or 128)


def text_facts(folder: Path, index: dict, cfg: dict) -> dict:
    """What the card keeps of SD3's text conditioning: the encoders (classes; T5 as None when the folder has none),
    the embedding shape [L, D] at the default max_sequence_length (L = CLIP's model_max_length + it, D = the
    transformer's joint_attention_dim), the pooled width P and the null prompt; inconsistent widths: one line."""
    where = f"diffusers teacher '{folder}'"
    clips = [read_json_object(folder / f"text_encoder{n}" / "config.json", where) for n in ("", "_2")]
    tok = read_json_object(folder / "tokenizer" / "tokenizer_config.json", where)
    t5 = read_json_object(folder / "text_encoder_3" / "config.json", where) if listed(index, "text_encoder_3") else {}
    if any("hidden_size" not in c or "projection_dim" not in c for c in clips) or "model_max_length" not in tok \
            or (t5 and "d_model" not in t5):
        raise UserError(f"{where}: the CLIP text encoders' configs need hidden_size and projection_dim, "
                        "tokenizer/tokenizer_config.json model_max_length and text_encoder_3/config.json d_model")
    joint, pooled = int(cfg.get("joint_attention_dim", 4096)), int(cfg.get("pooled_projection_dim", 2048))
    width, clip = int(t5.get("d_model", joint)), sum(int(c["hidden_size"]) for c in clips)
    if width != joint or clip > joint or sum(int(c["projection_dim"]) for c in clips) != pooled:
        raise UserError(f"{where}: its text encoders do not fit its transformer (T5 width {width} and CLIP widths "
                        f"{clip} against joint_attention_dim {joint}; CLIP projections against pooled_projection_dim "
                        f"{pooled})")
    names = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")]
    encoders = [{"encoder": (index.get(e) or [None, None])[1], "tokenizer": (index.get(t) or [None, None])[1]}
                for e, t in names]
    return {"encoders": encoders, "embeds": [int(tok["model_max_length"]) + MAX_SEQUENCE_LENGTH, joint],
            "pooled": pooled, "max_sequence_length": MAX_SEQUENCE_LENGTH, "null_prompt": ""}
