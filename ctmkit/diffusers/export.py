"""`ctmkit export RUN OUT`: a CTM run folder as a diffusers folder (`save_pretrained`): model_index.json naming
CTMPipeline, unet/ (CTMModel: safetensors weights, the ModelCard in config.json), scheduler/ (CTMScheduler), a hub
model card README.md (modelcard.py) and its sample grid samples.png; a latent text-to-image student also vae/,
text_encoder/ and tokenizer/ of its teacher's pipeline (latent.py), so that the export stands alone. Written in a
temp folder beside OUT and renamed into place: a failed export leaves nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from ..eval.report import save_image_grid
from ..io.atomic import atomic_write_text, plain_mode
from ..io.runs import load_model, training_grid_size
from .latent import full_student, grid_prompts, latent_components
from .model import CTMModel
from .modelcard import GRID_SEED, model_card
from .pipeline import CTMPipeline
from .scheduler import CTMScheduler


def check_export(run: Path, out: Path, force: bool) -> None:
    """Refusals before any work: OUT is or holds the run, is a file, or exists (without --force)."""
    r, o = run.resolve(), out.resolve()
    if r == o or o in r.parents:
        raise UserError(f"'{out}' is or holds the run '{run}': export to another folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise UserError(f"'{out}' exists and is not a folder; give a new folder name")
        if not force:
            raise UserError(f"'{out}' already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise UserError(f"output folder '{out.parent}' does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"output folder '{out.parent}' is not writable")


def read_eval(path: str | Path | None) -> dict | None:
    """A `ctmkit eval` result (FILE.json: metric and rows), checked; None when not given."""
    if path is None:
        return None
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--eval '{path}' cannot be read as JSON ({type(e).__name__})") from None
    rows = d.get("rows") if isinstance(d, dict) else None
    keys = ("model", "sampler", "nfe", "gamma", "value")
    if not (isinstance(rows, list) and rows and all(isinstance(r, dict) and all(k in r for k in keys) for r in rows)):
        raise UserError(f"--eval '{path}' is not a `ctmkit eval` result (no rows with {', '.join(keys)})")
    return d


def export_pipeline(run: str | Path) -> CTMPipeline:
    """The pipeline of a CTM run folder (its sampled weights, as `load_model` chooses them)."""
    model = load_model(run)
    card = model.card
    if not card.is_ctm:
        raise UserError(f"'{run}' holds a {card.kind}; ctmkit export takes a CTM run (ctmkit distill)")
    if card.data.kind not in ("image", "latent"):
        raise UserError(f"'{run}' is a CTM of {card.data.kind}s; diffusers pipelines are for images")
    parts, state = {}, model.state_dict()
    if card.latent is not None:         # the teacher's VAE and text encoder go with it; a LoRA student merged
        parts = latent_components(card)
        card, state = full_student(model)
    net = CTMModel(card=dataclasses.replace(card, sampled=None).to_dict())   # the weights go with it
    net.ctm.load_state_dict(state)
    net.requires_grad_(False)
    grid = training_grid_size(run)
    return CTMPipeline(net.eval(), CTMScheduler(card.sigma_min, card.sigma_max, 7.0, grid, 0.0), **parts)


def export_run(run: str | Path, out: str | Path, eval_json: str | Path | None = None, force: bool = False) -> Path:
    """Write RUN as the diffusers folder OUT (see the module docstring); returns OUT."""
    run, out = Path(run), Path(out)
    check_export(run, out, force)
    quality = read_eval(eval_json)
    pipe = export_pipeline(run)
    pipe.set_progress_bar_config(disable=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, plain_mode(folder=True))
        pipe.save_pretrained(tmp, safe_serialization=True)
        for f in tmp.rglob("*"):          # a plain file's mode (safetensors' temp files are private)
            os.chmod(f, plain_mode(folder=f.is_dir()))
        card = pipe.unet.card
        n, images = grid_samples(pipe)
        save_image_grid(images * 2 - 1, tmp / "samples.png")
        config = run / "config.yaml"
        atomic_write_text(tmp / "README.md", model_card(card, pipe.scheduler.config, out.name, n,
                                                        config.read_text() if config.is_file() else None, quality))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def grid_samples(pipe: CTMPipeline) -> tuple[int, torch.Tensor]:
    """The model card's sample grid (n, images [n, C, H, W] in [0, 1]): at least two of each class, or two of each
    of the data's first prompts."""
    card = pipe.unet.card
    w = card.guidance_scale[0] if len(card.guidance_scale) == 2 else None   # a range student: its lowest scale
    how = {"guidance_scale": w, "generator": torch.Generator().manual_seed(GRID_SEED), "output_type": "pt"}
    if card.latent is not None:
        prompts = grid_prompts(card)
        per = max(2, 16 // len(prompts))
        return per * len(prompts), pipe(prompt=prompts, num_images_per_prompt=per, **how).images
    n = min(100, max(16, 2 * card.num_classes))
    return n, pipe(batch_size=n, **how).images


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing OUT (--force) goes only once the new one is complete."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.replace(out, old / "x")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
