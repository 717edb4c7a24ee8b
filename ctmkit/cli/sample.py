"""`ctmkit sample`: samples of a trained teacher or CTM (or a foreign teacher), in the data's own space."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .base import (
    check_new_outputs,
    check_out_dir,
    force_option,
    load_model_spec,
    main,
    parse_times,
    two_jump_request,
    user_errors,
)


def parse_labels(spec: str | None, num_classes: int):
    """--labels -> labels(start, b) of samples start .. start + b - 1 (the given classes cycled, or all classes in
    turn), computed per batch so that no n-sized array is ever built; None for an unconditional model."""
    import torch
    if num_classes == 0:
        if spec:
            raise UserError("--labels given, but the model is not class-conditional")
        return None
    vals = torch.arange(num_classes)
    if spec:
        try:
            vals = torch.tensor([int(v) for v in spec.split(",")])
        except ValueError:
            raise UserError(f"--labels must be comma-separated integers, got '{spec}'") from None
        bad = [int(v) for v in vals if not 0 <= v < num_classes]
        if bad:
            raise UserError(f"--labels {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    return lambda start, b: vals[torch.arange(start, start + b) % len(vals)]


def check_schedule_options(n, batch_size, nfe, ts, two_jump, grid_n, gamma) -> None:
    """The counts and the schedule options that exclude each other, before anything is loaded."""
    if n < 1 or batch_size < 1:
        raise UserError("--n and --batch-size must be >= 1")
    if nfe is not None and nfe < 1:  # checked here: generate() reads --nfe 0 as "use the default"
        raise UserError(f"--nfe must be >= 1, got {nfe}")
    if nfe is not None and ts is not None:
        raise UserError("give --nfe or --ts, not both (--ts sets the NFE: its number of times minus one)")
    if two_jump is not None and (nfe is not None or ts is not None or gamma != 0):
        raise UserError("--two-jump sets the whole schedule: leave out --nfe, --ts and --gamma")
    if grid_n is not None and two_jump is None:
        raise UserError("--grid applies only with --two-jump")


def read_prompts(prompt: tuple[str, ...], prompts_file: str | None) -> list[str] | None:
    """--prompt TEXT (repeatable) or --prompts FILE -> the prompts (None: neither given)."""
    if prompt and prompts_file:
        raise UserError("give --prompt or --prompts, not both")
    if prompts_file:
        from ..eval.prompts import read_prompt_file
        return read_prompt_file(Path(prompts_file))
    return list(prompt) or None


def check_prompts(card, texts, labels, negative_prompt: str) -> None:
    """Prompts go with text-to-image models only, and every such model needs some."""
    if not card.text_conditioned:
        if texts is not None or negative_prompt:
            raise UserError("--prompt, --prompts and --negative-prompt need a text-to-image model (a latent pipeline, "
                            "diffusers:DIR); this one is not text-conditioned (class labels: --labels)")
        return
    if texts is None:
        raise UserError("this is a text-to-image model: give --prompt TEXT or --prompts FILE")
    if labels:
        raise UserError("--labels applies to class-conditional models; a text-to-image model takes --prompt")


def sample_prompts(model, job, texts, negative_prompt, n, seed, guidance, batch_size, out: Path, force, quiet,
                   **how):
    """`sample` for a text-to-image model: n latents per prompt, decoded by the pipeline's VAE, written by rank 0."""
    import numpy as np

    from .. import job as dist
    from ..eval.generate import check_disk
    from ..eval.prompts import GRID, load_vae, prompt_batches, write_prompt_samples
    card = model.card
    check_new_outputs([out, out.with_suffix(".png")] if out.suffix == ".npz" else [out], force)
    count = n if out.suffix == ".npz" else min(n, -(-GRID // len(texts)))      # a PNG alone shows the first GRID
    if out.suffix == ".npz":
        per = int(np.prod(card.latent["image_shape"])) + 4 * int(np.prod(card.shape))
        check_disk(out, per * count * len(texts))
    vae = load_vae(model)
    batches = prompt_batches(model, texts, count, seed, guidance, batch_size, negative_prompt, not quiet,
                             transform=lambda z: (z, vae.decode(z)), **how)
    if job.main:
        for p in write_prompt_samples(batches, texts, count, card, out):
            click.echo(f"wrote {p}")
    else:
        for _ in batches:                # the other ranks take part in every gather
            pass
    dist.teardown()


@main.command("sample")
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="A run folder (teacher or CTM), or a teacher SPEC: diffusers:DIR, edm:FILE.pkl, py:MODULE:ATTR.")
@click.option("--num-samples", "--n", "n", type=int, default=1000, show_default=True,
              help="Number of samples. --n is a short alias; under torchrun use --num-samples (torchrun's own parser "
                   "takes --n as an abbreviation of its options).")
@click.option("--nfe", type=int, default=None,
              help="Network evaluations: CTM gamma-sampling default 1; Heun default 35 (18 steps).")
@click.option("--ts", default=None,
              help="Custom times instead of --nfe, descending from sigma_max to sigma_min, e.g. 80,2.5,0.002 (NFE 2): "
                   "gamma-sampling jumps between them, Heun steps along them.")
@click.option("--two-jump", "two_jump", default=None, metavar="I1,I2",
              help="The reference's two-jump sampler (CTM, NFE 2): jump t_0 -> t_I1, re-noise up to t_I2 (I2 <= I1), "
                   "jump t_I2 -> sigma_min; I1, I2 index the training grid t_0 = sigma_max > ... > t_{N-1} = sigma_min "
                   "(N: the run's ctm.num_scales, or --grid). The reference samples ImageNet-64 with 36,20 on N = 40.")
@click.option("--grid", "grid_n", type=int, default=None, help="N of the --two-jump grid (default: the run's).")
@click.option("--gamma", type=float, default=0.0, show_default=True,
              help="CTM gamma in [0, 1]: 0 deterministic ODE jumps, 1 consistency-model multistep.")
@click.option("--sampler", type=click.Choice(["auto", "gamma", "heun"]), default="auto", show_default=True,
              help="auto: gamma for a CTM, heun for a teacher; heun on a CTM uses it as a denoiser.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; sample i depends only on (seed, i).")
@click.option("--labels", default=None, help="Class labels for a conditional model: '3' or '0,1,2' (cycled; "
              "default every class in turn).")
@click.option("--guidance", type=float, default=None, metavar="W",
              help="Classifier-free guidance scale (diffusers' guidance_scale convention): D_null + W (D_label - "
                   "D_null); 1 = plain conditional sampling (an unguided model's default), 0 = unconditional, > 1 "
                   "sharper classes (a text-to-image teacher's default: the pipeline's 7.5). Any W >= 0 for a "
                   "class-conditional teacher or unguided CTM trained with a null branch (label_dropout > 0); a "
                   "CTM distilled with ctm.guidance=W samples at that W only, one distilled for a range "
                   "ctm.guidance=[lo, hi] needs a W in it.")
@click.option("--prompt", "prompt", multiple=True, metavar="TEXT",
              help="A text-to-image model's prompt (repeat for several): --num-samples images each, prompt-major.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A text file of prompts, one a line (blank lines skipped), instead of --prompt.")
@click.option("--negative-prompt", default="", metavar="TEXT",
              help="A text-to-image model's null condition for guidance (default: the empty prompt).")
@click.option("--batch-size", type=int, default=500, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="FILE.npz (+ a PNG beside it for images and 2-D data) or FILE.png; an existing one needs --force.")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def sample(model_dir, n, nfe, ts, two_jump, grid_n, gamma, sampler, seed, labels, guidance, prompt, prompts_file,
           negative_prompt, batch_size, out, force, quiet):
    """Sample a trained teacher or CTM; samples come back in the data's own space and layout.

    \b
    Classifier-free guidance (--guidance W; the model needs a null branch, see --guidance):
      ctmkit sample --model runs/teacher --guidance 3 --nfe 35 --out t.npz  # guided Heun
      ctmkit sample --model runs/ctm --guidance 3 --out c.npz               # guided jumps, 2 evaluations each
    A CTM distilled for guidance (ctm.guidance=W or [lo, hi]) samples at its scale, 1 evaluation per jump.

    \b
    Text-to-image (a latent pipeline folder, diffusers:DIR): N images per prompt, decoded by its VAE
      ctmkit sample --model diffusers:sd --prompt "a red dog" --nfe 35 --guidance 7.5 --n 4 --out dog.npz
      ctmkit sample --model diffusers:sd --prompts prompts.txt --negative-prompt blurry --n 2 --out p.npz
    The .npz holds samples (uint8 [N, H, W, C]), latents and each sample's prompt; --guidance defaults to the
    pipeline's 7.5, and each prompt is encoded once.

    An existing output file is refused unless --force is given (then it is replaced when the new one is complete)."""
    check_schedule_options(n, batch_size, nfe, ts, two_jump, grid_n, gamma)
    times = parse_times(ts) if ts is not None else None
    out_path = Path(out)  # checked before sampling, not after all the work is done
    if out_path.suffix not in (".npz", ".png"):
        raise UserError(f"--out must end in .npz or .png, got '{out_path.name}'")
    check_out_dir(out_path)
    from .. import job as dist
    from ..eval.generate import check_disk, check_two_jump, generate_batches, sample_bytes, sample_files, stream_samples
    from ..eval.guide import resolve_scale
    texts = read_prompts(prompt, prompts_file)       # a missing or empty file is refused before the model loads
    job, device = dist.setup("auto")     # under torchrun: the batches are split over the ranks, rank 0 writes
    model = load_model_spec(model_dir, text=True).to(device)
    card = model.card
    check_prompts(card, texts, labels, negative_prompt)
    lab = parse_labels(labels, card.num_classes)
    resolve_scale(model, guidance)       # a scale this model cannot sample at is refused before any work
    jumps = two_jump_request(two_jump, grid_n, model_dir) if two_jump is not None else None
    if jumps is not None:
        check_two_jump(jumps, card.is_ctm, sampler, card.sigma_min, card.sigma_max)
    if card.text_conditioned:
        return sample_prompts(model, job, texts, negative_prompt, n, seed, guidance, batch_size, out_path, force,
                              quiet, nfe=nfe, gamma=gamma, sampler=sampler, ts=times, two_jump=jumps)
    check_new_outputs(sample_files(card, out_path) or [out_path], force)    # with the PNG beside FILE.npz
    if out_path.suffix == ".npz":          # refused up front, not after hours of sampling
        check_disk(out_path, sample_bytes(model.card, n, lab is not None))
    count = n if out_path.suffix == ".npz" else min(n, 256)          # a PNG alone shows the first 256
    batches = generate_batches(model, count, nfe, gamma, seed, lab, batch_size, sampler, progress=not quiet, ts=times,
                               two_jump=jumps, guidance=guidance)
    if job.main:
        for p in stream_samples(batches, count, lab, model.card, out_path):
            click.echo(f"wrote {p}")
    else:
        for _ in batches:                # the other ranks take part in every gather
            pass
    dist.teardown()
