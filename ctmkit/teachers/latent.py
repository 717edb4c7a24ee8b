"""Latent text-to-image teachers (docs/method.md section 9): `diffusers:DIR` for a whole pipeline folder as
`save_pretrained` writes it, with `model_index.json`, `unet/` (a UNet2DConditionModel: Stable Diffusion 1.x / 2.x,
epsilon or v prediction), `vae/` (AutoencoderKL), `scheduler/`, `text_encoder/` (CLIP) and `tokenizer/`.

The teacher is the denoiser D(z, sigma, cond) on the VAE's scaled latents z (what the pipeline's UNet sees), in the
EDM convention z = z0 + sigma n through the scheduler's own preconditioning (core/precond.py: VPPrecond, shared with
the pixel teachers of teachers/foreign.py); `cond` is a TextCond (core/conditions.py) from `teacher.encode_prompt`,
whose null is the empty prompt's embedding. The card records the latent shape, the VAE's scaling and shift and the
text conditioning. Weights are read from the folder only; the text encoder is loaded on the first encode_prompt.

Pixel folders (`unet/` UNet2DModel + `scheduler/`; a model_index.json without a vae) go to teachers/foreign.py. A
folder holding ctmkit's own export (`_class_name` CTMPipeline) is refused with a pointer to `--model`.
"""

from __future__ import annotations

from pathlib import Path

from ..core.conditions import TextCond
from ..core.precond import EDMDenoiser
from ..data.normalize import Normalizer
from ..errors import UserError
from ..io.card import DataCard, ModelCard, read_json_object
from ..io.export import is_export
from ..nets.diffusers_cond import DiffusersCondUNet, check_cond_config
from ..nets.diffusers_unet import import_diffusers, unet_config_from
from ..nets.registry import BackboneSpec
from ..nets.text_encoders import PromptEncoder
from .foreign import diffusers_source, load_diffusers, scheduler_precond

COMPONENTS = {"unet": "the denoising UNet2DConditionModel", "vae": "the AutoencoderKL", "scheduler": "its scheduler",
              "text_encoder": "the CLIP text encoder", "tokenizer": "the CLIP tokenizer"}


class LatentTeacher(EDMDenoiser):
    """D(z, sigma, cond) of a latent pipeline (the denoiser protocol with a TextCond as condition), with `.card`,
    `.folder` and `encode_prompt`."""

    def __init__(self, backbone: DiffusersCondUNet, precond, folder: Path, index: dict) -> None:
        super().__init__(backbone, 0.5, precond)
        self.folder, self.index = folder, index
        self.prompt_encoder: PromptEncoder | None = None     # loaded on the first encode_prompt

    def encode_prompt(self, prompts: str | list[str], negative_prompt: str = "") -> TextCond:
        """Prompts [B] -> TextCond [B] (CPU): the pipeline's own prompt embeddings, with the negative prompt's (the
        empty prompt by default) as the null condition. Encode once, then pass the TextCond to every step."""
        if self.prompt_encoder is None:
            self.prompt_encoder = PromptEncoder.from_pipeline(self.folder, self.index)
        return self.prompt_encoder(prompts, negative_prompt)


def load_diffusers_folder(source: str | Path):
    """The part of a SPEC after 'diffusers:' -> its teacher: a latent pipeline (model_index.json naming a vae) ->
    LatentTeacher; a pixel folder -> teachers/foreign.py: load_diffusers; ctmkit's own export -> UserError."""
    folder, settings = diffusers_source(source)
    if not (folder / "model_index.json").is_file() or is_export(folder):
        return load_diffusers(source)          # a pixel folder, or ctmkit's own export (refused there)
    index = read_json_object(folder / "model_index.json", f"diffusers teacher '{folder}'")
    if not _names(index, "vae"):
        return load_diffusers(source)
    if settings:
        raise UserError(f"diffusers teacher '{source}': a text-conditioned pipeline takes no settings (its null "
                        "condition is the empty prompt)")
    return load_latent(folder, index)


def _names(index: dict, name: str) -> bool:
    """model_index.json lists component `name` (["library", "Class"], not [null, null])."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def check_components(folder: Path, index: dict) -> None:
    """One line for the first component a latent pipeline folder lacks (listed and present as a folder)."""
    if _names(index, "transformer"):
        raise UserError(f"diffusers teacher '{folder}': flow-matching transformer pipelines (SD3, Flux) are not "
                        "supported yet; ctmkit takes UNet2DConditionModel pipelines (Stable Diffusion 1.x / 2.x)")
    for name, what in COMPONENTS.items():
        if not _names(index, name) or not (folder / name).is_dir():
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
    """A latent pipeline folder (model_index.json read as `index`) -> its LatentTeacher (CPU, eval mode, `.card`)."""
    where = f"diffusers teacher '{folder}'"
    check_components(folder, index)
    cfg = read_json_object(folder / "unet" / "config.json", where)
    if cfg.get("_class_name") != "UNet2DConditionModel":
        raise UserError(f"{where}: its unet is a {cfg.get('_class_name')}; a text-to-image pipeline needs a "
                        "UNet2DConditionModel")
    vae, text = vae_facts(folder), text_facts(folder, index)
    try:
        check_cond_config(cfg)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if int(cfg.get("in_channels", 4)) != vae["latent_channels"]:
        raise UserError(f"{where}: its unet takes {cfg.get('in_channels')} channels but the vae makes "
                        f"{vae['latent_channels']} (an inpainting or image-conditioned UNet is not supported)")
    if int(cfg.get("cross_attention_dim") or 0) != text["embeds"][1]:
        raise UserError(f"{where}: its unet attends to {cfg.get('cross_attention_dim')}-dimensional text but the "
                        f"text encoder gives {text['embeds'][1]}")
    precond, sigma_min, sigma_max = scheduler_precond(folder / "scheduler")
    try:
        unet = import_diffusers().UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    except Exception as e:    # corrupt or missing weights: one line naming the folder
        raise UserError(f"{where}: cannot load unet/ ({str(e).splitlines()[0]})") from None
    config = unet_config_from(unet)
    teacher = LatentTeacher(DiffusersCondUNet(config, unet), precond, folder, index)
    size = config.get("sample_size") or 64
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    image = [vae["image_channels"], h * vae["downscale"], w * vae["downscale"]]
    data = DataCard(f"diffusers:{folder}", "latent", (vae["latent_channels"], h, w), 0,
                    Normalizer("image", "NCHW", "float32", lo=-1.0, hi=1.0).to_dict())   # latents as they are
    latent = {"folder": str(folder), "pipeline": index.get("_class_name"), "denoiser": "UNet2DConditionModel",
              "vae": vae, "image_shape": image, "text": text}
    teacher.card = ModelCard("teacher", data, BackboneSpec("diffusers_unet2d_cond", {"config": config}), 0.5,
                             float(sigma_min), float(sigma_max), precond=precond.spec, latent=latent)
    teacher.requires_grad_(False)
    return teacher.eval()
