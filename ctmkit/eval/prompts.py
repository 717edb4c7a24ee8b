"""Sampling a text-to-image model from prompts (docs/method.md section 9): `ctmkit sample --prompt/--prompts` and
`ctmkit prepare --pipeline DIR --prompts FILE` (data made of the teacher's own samples).

Each prompt runs through the text encoder once; N samples per prompt, prompt-major (sample i has prompt i // N);
the latents come from `generate_batches` (eval/generate.py) with the prompts' TextCond where class labels go, so a
teacher samples with Heun on its guided denoiser and a latent CTM (whose card carries the same `latent` record) with
its jumps, with per-sample seeds: sample i depends only on (seed, i), whatever the batch size. The VAE decodes each
batch (nets/vae.py). Outputs: an .npz with `samples` (uint8 [N, H, W, C]), `latents` (float32 [N, c, h, w]) and
`prompts` (each sample's prompt), a PNG grid of the first 64 beside it.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..core.conditions import TextCond
from ..data.latents import LatentWriter
from ..errors import UserError
from ..io.atomic import atomic_file
from ..io.card import read_json_object
from ..nets.text_encoders import load_prompt_encoder
from ..nets.vae import LatentVAE
from ..teachers.latent_data import pipeline_record, write_prompts
from .generate import generate_batches
from .report import save_image_grid

PIPELINE_GUIDANCE = 7.5      # StableDiffusionPipeline's guidance_scale: a text teacher's default --guidance
GRID = 64                    # samples shown in the PNG beside the .npz


def read_prompt_file(path: Path) -> list[str]:
    """The prompts of a text file, one a line (blank lines skipped); UserError for a missing or empty file."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file '{path}' ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"prompt file '{path}' holds no prompts (one prompt a line)")
    return prompts


def default_guidance(card, guidance: float | None) -> float | None:
    """A text teacher samples at the pipeline's own default 7.5 unless told otherwise; others at their own scale."""
    if guidance is None and card.text_conditioned and not card.is_ctm:
        return PIPELINE_GUIDANCE
    return guidance


def encode_prompts(model, prompts: list[str], negative_prompt: str = "") -> TextCond:
    """The TextCond of `prompts` [P] (null: the negative prompt's embedding): the teacher's own encode_prompt, or the
    text encoders of the pipeline folder a latent CTM's card names (SDXL's two or SD3's three with pooled
    embeddings)."""
    if hasattr(model, "encode_prompt"):
        return model.encode_prompt(prompts, negative_prompt)
    latent = model.card.latent
    folder = Path(latent["folder"])
    index = read_json_object(folder / "model_index.json", f"the pipeline of this model, '{folder}'")
    return load_prompt_encoder(folder, index, latent)(prompts, negative_prompt)


def load_vae(model) -> LatentVAE:
    """The VAE of a latent model's pipeline (its card's `latent` record), on the model's device."""
    lat = model.card.latent
    vae = LatentVAE.from_pipeline(Path(lat["folder"]), lat["vae"])
    param = next(iter(model.parameters()), None)
    return vae.to(param.device) if param is not None else vae


def prompt_batches(model, prompts: list[str], n: int, seed: int, guidance: float | None, batch_size: int,
                   negative_prompt: str = "", progress: bool | None = True, transform=None, cond=None, **how):
    """Latent batches of N = n samples per prompt, prompt-major: generate_batches with the prompts' TextCond where
    labels go (`cond`: that TextCond when already encoded); `how`: its sampling options (nfe, gamma, sampler, ts,
    two_jump)."""
    cond = encode_prompts(model, prompts, negative_prompt) if cond is None else cond

    def labels(start: int, b: int) -> TextCond:
        return cond[torch.arange(start, start + b) // n]

    how = {"nfe": None, "gamma": 0.0, "sampler": "auto", **how}
    return generate_batches(model, n * len(prompts), seed=seed, labels=labels, batch_size=batch_size,
                            progress=progress, transform=transform, guidance=default_guidance(model.card, guidance),
                            **how)


def write_prompt_samples(batches, prompts: list[str], n: int, card, out: Path) -> list[Path]:
    """(latents, uint8 images) batches -> OUT.npz (samples, latents, prompts; latents staged in an anonymous temp
    file so that both stream) and a PNG grid of the first GRID beside it; OUT.png alone: the grid only."""
    total, grid, out = n * len(prompts), [], Path(out)
    latent_shape, image_shape = tuple(card.shape), tuple(card.latent["image_shape"])
    if out.suffix == ".png":
        for _, images in batches:
            grid.append(images)
            if sum(len(g) for g in grid) >= GRID:
                break
        return _grid(grid, out)
    with atomic_file(out) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
            tempfile.TemporaryFile(dir=out.parent) as staged:
        _header(staged, (total, *latent_shape), np.float32)
        with zf.open("samples.npy", "w", force_zip64=True) as member:
            _header(member, (total, *image_shape[1:], image_shape[0]), np.uint8)
            for z, images in batches:
                member.write(np.ascontiguousarray(images.numpy()).tobytes())
                staged.write(np.ascontiguousarray(z.numpy(), dtype=np.float32).tobytes())
                if sum(len(g) for g in grid) < GRID:
                    grid.append(images)
        staged.seek(0)
        with zf.open("latents.npy", "w", force_zip64=True) as member:
            shutil.copyfileobj(staged, member, 1 << 24)
        with zf.open("prompts.npy", "w") as member:
            np.save(member, np.asarray([p for p in prompts for _ in range(n)], dtype=str))
    return [out] + _grid(grid, out.with_suffix(".png"))


def _header(f, shape: tuple, dtype) -> None:
    np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(int(v) for v in shape)})


def _grid(images: list, png: Path) -> list[Path]:
    """A PNG grid of uint8 [N, H, W, C] images (the first GRID)."""
    if not images:
        return []
    x = torch.cat(images)[:GRID].permute(0, 3, 1, 2).float() / 127.5 - 1      # back to [-1, 1] for image_grid
    save_image_grid(x, png)
    return [png]


def prepare_prompts(teacher, prompts: list[str], out: Path, n: int, nfe: int | None, guidance: float | None,
                    seed: int = 0, batch_size: int = 16, progress: bool | None = True) -> dict:
    """A prepared latent folder of the teacher's own samples: n per prompt, prompt-major, exactly the latents
    `ctmkit sample --prompts` gives with the same seed, NFE and guidance; returns the manifest."""
    record = pipeline_record(teacher)
    w = default_guidance(teacher.card, guidance)
    with LatentWriter(out, n * len(prompts), tuple(record["latent_shape"])) as writer:
        for z in prompt_batches(teacher, prompts, n, seed, w, batch_size, progress=progress, nfe=nfe):
            writer.add(z)
        count = write_prompts(writer, teacher, [p for p in prompts for _ in range(n)])
        source = {"kind": "teacher samples", "sampler": "heun", "nfe": nfe or 35, "guidance": w, "seed": seed,
                  "per_prompt": n}
        manifest = {**record, "prompts": count, "source": source}
        writer.finish(manifest)
    return {**manifest, "count": n * len(prompts)}
