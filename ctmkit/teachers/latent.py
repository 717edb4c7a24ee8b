"""Latent text-to-image teachers (docs/method.md section 9): `diffusers:DIR` for a whole pipeline folder as
`save_pretrained` writes it, with `model_index.json`, `unet/` (a UNet2DConditionModel: Stable Diffusion 1.x / 2.x,
epsilon or v prediction), `vae/` (AutoencoderKL), `scheduler/`, `text_encoder/` (CLIP) and `tokenizer/`; and what
every latent teacher shares (LatentTeacher, the component and VAE checks, the UNet pipeline's loading, the card),
which teachers/sd3.py and teachers/sdxl.py (SDXL: the same UNet with added conditions) build on.

The teacher is the denoiser D(z, sigma, cond) on the VAE's scaled latents z (what the pipeline's UNet sees), in the
EDM convention z = z0 + sigma n through the scheduler's own preconditioning (core/precond.py: VPPrecond, shared with
the pixel teachers of teachers/foreign.py); `cond` is a TextCond (core/conditions.py) from `teacher.encode_prompt`,
whose null is the empty prompt's embedding. The card records the latent shape, the VAE's scaling and shift and the
text conditioning. Weights are read from the folder only; the text encoders are loaded on the first encode_prompt
(nets/text_encoders.py: load_prompt_encoder, chosen by the card).
Which loader a folder goes to is teachers/pipelines.py's choice.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..core.conditions import TextCond
from ..core.precond import EDMDenoiser
from ..data.normalize import Normalizer
from ..errors import UserError
from ..io.card import DataCard, ModelCard, read_json_object
from ..nets.diffusers_cond import TEXT_TIME, DiffusersCondUNet, check_cond_config
from ..nets.diffusers_unet import import_diffusers, unet_config_from
from ..nets.registry import BackboneSpec
from ..nets.text_encoders import PromptEncoder, load_prompt_encoder
from .foreign import scheduler_precond

COMPONENTS = {"unet": "the denoising UNet2DConditionModel", "vae": "the AutoencoderKL", "scheduler": "its scheduler",
              "text_encoder": "the CLIP text encoder", "tokenizer": "the CLIP tokenizer"}


class LatentTeacher(EDMDenoiser):
    """D(z, sigma, cond) of a latent pipeline (the denoiser protocol with a TextCond as condition), with `.card`,
    `.folder` and `encode_prompt`."""

    def __init__(self, backbone: nn.Module, precond, folder: Path, index: dict) -> None:
        super().__init__(backbone, 0.5, precond)
        self.folder, self.index = folder, index
        self.prompt_encoder: PromptEncoder | None = None     # loaded on the first encode_prompt

    def encode_prompt(self, prompts: str | list[str], negative_prompt: str = "", **options) -> TextCond:
        """Prompts [B] -> TextCond [B] (CPU): the pipeline's own prompt embeddings, with the negative prompt's (the
        empty prompt by default) as the null condition. Encode once, then pass the TextCond to every step.
        `options`: the pipeline's encoding options (SD3: max_sequence_length)."""
        if self.prompt_encoder is None:
            self.prompt_encoder = load_prompt_encoder(self.folder, self.index, self.card.latent)
        return self.prompt_encoder(prompts, negative_prompt, **options)


def listed(index: dict, name: str) -> bool:
    """model_index.json lists component `name` (["library", "Class"], not [null, null])."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def check_components(folder: Path, index: dict, components: dict[str, str]) -> None:
    """One line for the first of `components` (name -> what it is) that a latent pipeline folder lacks (listed in
    model_index.json and present as a folder)."""
    for name, what in components.items():
        if not listed(index, name) or not (folder / name).is_dir():
            raise UserError(f"diffusers teacher '{folder}': the pipeline has no {name}/ ({what}); save the whole "
                            "pipeline with save_pretrained")


def vae_facts(folder: Path) -> dict:
    """What the card keeps of vae/: class, scaling_factor, shift_factor (z = (latent - shift) * scaling) and the
    downscale factor from image to latent pixels (2 ^ (number of blocks - 1))."""
    cfg = read_json_object(folder / "vae" / "config.json", f"diffusers teacher '{folder}'")
    if cfg.get("_class_name") != "AutoencoderKL":
        raise UserError(f"diffusers teacher '{folder}': its vae is a {cfg.get('_class_name')}; ctmkit takes "
                        "AutoencoderKL")
    return {"class": "AutoencoderKL", "scaling_factor": float(cfg.get("scaling_factor", 0.18215)),
            "shift_factor": float(cfg.get("shift_factor") or 0.0), "latent_channels": int(cfg["latent_channels"]),
            "image_channels": int(cfg.get("in_channels", 3)),
            "downscale": 2 ** (len(cfg.get("block_out_channels", [0])) - 1)}


def text_facts(folder: Path, index: dict) -> dict:
    """What the card keeps of the text conditioning: encoder and tokenizer classes, the embedding shape [L, D] (L =
    the tokenizer's model_max_length, D = the encoder's hidden_size) and the null prompt."""
    where = f"diffusers teacher '{folder}'"
    enc = read_json_object(folder / "text_encoder" / "config.json", where)
    tok = read_json_object(folder / "tokenizer" / "tokenizer_config.json", where)
    if "hidden_size" not in enc or "model_max_length" not in tok:
        raise UserError(f"{where}: text_encoder/config.json needs hidden_size and tokenizer/tokenizer_config.json "
                        "model_max_length")
    return {"encoders": [{"encoder": index["text_encoder"][1], "tokenizer": index["tokenizer"][1]}],
            "embeds": [int(tok["model_max_length"]), int(enc["hidden_size"])], "pooled": None, "null_prompt": ""}


def load_latent(folder: Path, index: dict) -> LatentTeacher:
    """A Stable Diffusion 1.x / 2.x pipeline folder (model_index.json read as `index`) -> its LatentTeacher (CPU,
    eval mode, `.card`) (SDXL: teachers/sdxl.py; a transformer one: teachers/sd3.py)."""
    check_components(folder, index, COMPONENTS)
    return load_unet_pipeline(folder, index, text_facts(folder, index))


def load_unet_pipeline(folder: Path, index: dict, text: dict) -> LatentTeacher:
    """The LatentTeacher of a UNet2DConditionModel pipeline folder whose components are checked and whose text
    conditioning is `text` (text_facts: pooled None for SD 1.x / 2.x, the width of SDXL's pooled embeddings)."""
    where = f"diffusers teacher '{folder}'"
    cfg = read_json_object(folder / "unet" / "config.json", where)
    if cfg.get("_class_name") != "UNet2DConditionModel":
        raise UserError(f"{where}: its unet is a {cfg.get('_class_name')}; a text-to-image pipeline needs a "
                        "UNet2DConditionModel")
    vae = vae_facts(folder)
    try:
        check_cond_config(cfg)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    check_channels(where, "unet", cfg, vae)
    check_added_conditions(where, cfg, text)
    if int(cfg.get("cross_attention_dim") or 0) != text["embeds"][1]:
        raise UserError(f"{where}: its unet attends to {cfg.get('cross_attention_dim')}-dimensional text but the "
                        f"text encoders give {text['embeds'][1]}")
    precond, sigma_min, sigma_max = scheduler_precond(folder / "scheduler")
    unet = load_model(folder, "unet", "UNet2DConditionModel")
    config = unet_config_from(unet)
    kwargs = {"config": config} | ({"vae_scale_factor": vae["downscale"]} if text["pooled"] else {})
    teacher = LatentTeacher(DiffusersCondUNet(**kwargs, unet=unet), precond, folder, index)
    size = config.get("sample_size") or 64
    facts = {"denoiser": "UNet2DConditionModel", "vae": vae, "text": text}
    if text["pooled"]:          # SDXL's micro-conditioning at the card's size (the backbone takes it from z's size)
        (h, w), f = ((size, size) if isinstance(size, int) else size), vae["downscale"]
        facts["time_ids"] = [h * f, w * f, 0, 0, h * f, w * f]
    return with_card(teacher, BackboneSpec("diffusers_unet2d_cond", kwargs), (sigma_min, sigma_max), facts, size)


def check_added_conditions(where: str, cfg: dict, text: dict) -> None:
    """One line unless the UNet takes SDXL's added conditions (pooled text embeddings of width text["pooled"] and 6
    time ids: projection_class_embeddings_input_dim = 6 addition_time_embed_dim + P) exactly when the pipeline's text
    encoders give pooled embeddings."""
    added = cfg.get("addition_embed_type") == TEXT_TIME
    if added and not text["pooled"]:
        raise UserError(f"{where}: its unet takes SDXL's added conditions (addition_embed_type={TEXT_TIME!r}), "
                        "which need SDXL's two text encoders: save the whole StableDiffusionXLPipeline "
                        "(text_encoder_2/ and tokenizer_2/, named in model_index.json)")
    if text["pooled"] and not added:
        raise UserError(f"{where}: an SDXL pipeline needs a unet with addition_embed_type={TEXT_TIME!r} (SDXL's "
                        f"added conditions); this one has {cfg.get('addition_embed_type')!r}")
    if added:
        width = int(cfg.get("addition_time_embed_dim") or 0) * 6 + int(text["pooled"])
        if int(cfg.get("projection_class_embeddings_input_dim") or 0) != width:
            raise UserError(f"{where}: its unet's projection_class_embeddings_input_dim "
                            f"{cfg.get('projection_class_embeddings_input_dim')} is not 6 time ids x "
                            f"addition_time_embed_dim {cfg.get('addition_time_embed_dim')} + the pooled width "
                            f"{text['pooled']} of text_encoder_2")


def check_channels(where: str, name: str, cfg: dict, vae: dict) -> None:
    """One line when the denoiser `name` (its config `cfg`) does not take the VAE's latent channels."""
    if int(cfg.get("in_channels", 4)) != vae["latent_channels"]:
        raise UserError(f"{where}: its {name} takes {cfg.get('in_channels')} channels but the vae makes "
                        f"{vae['latent_channels']} (an inpainting or image-conditioned {name} is not supported)")


def load_model(folder: Path, name: str, class_name: str) -> nn.Module:
    """The diffusers model `folder/name` of class `class_name` (local files only); one line when it cannot load."""
    try:
        return getattr(import_diffusers(), class_name).from_pretrained(folder / name, local_files_only=True)
    except Exception as e:    # corrupt or missing weights: one line naming the folder
        raise UserError(f"diffusers teacher '{folder}': cannot load {name}/ ({str(e).splitlines()[0]})") from None


def with_card(teacher: LatentTeacher, spec: BackboneSpec, sigma_range: tuple, facts: dict, size) -> LatentTeacher:
    """The teacher with its `.card` (the latent shape from the denoiser's sample_size, `facts` with "vae" and "text"
    as the card's `latent` record), frozen and in eval mode."""
    vae, folder = facts["vae"], teacher.folder
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    image = [vae["image_channels"], h * vae["downscale"], w * vae["downscale"]]
    data = DataCard(f"diffusers:{folder}", "latent", (vae["latent_channels"], h, w), 0,
                    Normalizer("image", "NCHW", "float32", lo=-1.0, hi=1.0).to_dict())   # latents as they are
    latent = {"folder": str(folder), "pipeline": teacher.index.get("_class_name"), **facts, "image_shape": image}
    teacher.card = ModelCard("teacher", data, spec, 0.5, float(sigma_range[0]), float(sigma_range[1]),
                             precond=teacher.precond.spec, latent=latent)
    teacher.requires_grad_(False)
    return teacher.eval()
