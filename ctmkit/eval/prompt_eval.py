"""`ctmkit eval --prompts FILE` (docs/method.md section 9): a latent text-to-image model (a CTM distilled from a
diffusers:DIR latent pipeline, or that teacher) scored on the images its VAE decodes.

Each sweep point samples N = n // P latents per prompt of the P prompts, prompt-major (sample i has prompt i // N),
as `ctmkit sample --prompts` does with the same seed, NFE and gamma; the pipeline's VAE decodes them to uint8 images,
mapped to [-1, 1] (the model space of any image set), which the image metrics of eval/quality.py compare with --data:
images of the decoded size (e.g. the folder with metadata.jsonl that `ctmkit prepare --pipeline` encoded), never a
prepared latent folder. The prompts are encoded and the VAE loaded once per model.
"""

from __future__ import annotations

from pathlib import Path

from ..data.normalize import Normalizer
from ..errors import UserError
from .guide import resolve_scale
from .prompts import PIPELINE_GUIDANCE, encode_prompts, load_vae, prompt_batches
from .quality import Quality, make_quality

BATCH = 16      # latents sampled and decoded at a time (each sample depends on its seed and index only)
DECODED = Normalizer("image", "NHWC", "uint8", lo=0.0, hi=255.0)     # decoded uint8 images -> [-1, 1], NCHW


class PromptDraws:
    """A Quality's `draw` (the arguments of eval/quality.py: label_draws) for a text-to-image model: n // P samples
    per prompt, decoded; `loaded` keeps each model's prompt embeddings and VAE."""

    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts
        self.loaded: list[tuple] = []           # (model, TextCond of the prompts, LatentVAE)

    def parts(self, model) -> tuple:
        for m, cond, vae in self.loaded:
            if m is model:
                return cond, vae
        self.loaded.append((model, encode_prompts(model, self.prompts), load_vae(model)))
        return self.loaded[-1][1:]

    def __call__(self, model, n: int, nfe: int, gamma: float, seed: int, batch_size: int, sampler: str, ts=None,
                 guidance: float | None = None, transform=None):
        cond, vae = self.parts(model)

        def decoded(z):
            x = DECODED.to_model_batch(vae.decode(z))
            return x if transform is None else transform(x)

        return prompt_batches(model, self.prompts, n // len(self.prompts), seed, guidance, min(batch_size, BATCH),
                              progress=False, transform=decoded, cond=cond, nfe=nfe, gamma=gamma, sampler=sampler,
                              ts=ts)


def check_eval_data(net, data, prompts: list[str] | None, what: str = "the model") -> None:
    """One line, before any work, unless `net` can be scored against `data` (None: reference statistics): a
    text-to-image model needs --prompts and images of its decoded shape (not a prepared latent folder), --prompts
    needs a text-to-image model, any other model data of its own shape."""
    text = net.card.text_conditioned
    if prompts is None:
        if text:
            raise UserError(f"{what} is a text-to-image model: give --prompts FILE (one prompt a line) to score its "
                            "decoded images against --data (images, e.g. the folder it was prepared from)")
        if data is not None:
            net.card.check_data(data, what)
        return
    if not text:
        raise UserError(f"--prompts needs a latent text-to-image model (a CTM distilled from a diffusers:DIR latent "
                        f"pipeline, or that diffusers:DIR teacher); {what} is not text-conditioned")
    if data is None:
        return
    if data.kind == "latent":
        raise UserError(f"'{data.spec}' is a prepared latent folder: with --prompts, --data holds the images to "
                        "compare the decoded samples with (e.g. the image folder it was prepared from)")
    shape = tuple(net.card.latent["image_shape"])
    if data.kind != "image" or tuple(data.shape) != shape:
        raise UserError(f"{what} decodes images of shape {shape}, but '{data.spec}' has shape {tuple(data.shape)}")


def default_scales(model, teacher) -> list[float] | None:
    """--guidance left out with --prompts: a CTM and the teacher it is compared with both sample at the CTM's own
    scale, a text teacher alone at the pipeline's 7.5 (as `ctmkit sample`), rows labelled with it; a CTM alone:
    None (its own scale, rows unlabelled, as without prompts)."""
    if not model.card.is_ctm:
        return [PIPELINE_GUIDANCE]
    return None if teacher is None else [resolve_scale(model, None)]


def prompt_quality(metric: str, data, n: int, seeds: int, ref: str | None, prompts: list[str], file: Path,
                   progress: bool | None = None) -> Quality:
    """The Quality of `ctmkit eval --prompts`: n // P samples per prompt (P prompts from `file`), decoded."""
    per = n // len(prompts)
    quality = make_quality(metric, data, per * len(prompts), seeds, progress=progress, ref=ref,
                           draw=PromptDraws(prompts))
    quality.info.update({"prompts": str(file), "prompt_count": len(prompts), "per_prompt": per})
    return quality
