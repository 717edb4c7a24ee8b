"""`ctmkit edit`: zero-shot editing with a trained CTM or a teacher (docs/method.md section 4.1): inpainting,
super-resolution, colourisation, SDEdit, inversion and interpolation. Inputs are read with the data readers and
checked against the model before any work; every refusal is one line."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .base import check_new_outputs, check_out_dir, force_option, load_model_spec, main, parse_times, user_errors

TASKS = ("inpaint", "superres", "colorize", "sdedit", "invert", "interpolate")
PROJECTIONS = ("inpaint", "superres", "colorize")


@main.command("edit")
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="A CTM (or teacher) run folder, or a teacher SPEC: diffusers:DIR, edm:FILE.pkl, py:MODULE:ATTR. A "
                   "teacher runs the same algorithms with one Heun step (2 evaluations) per jump.")
@click.option("--task", required=True, type=click.Choice(TASKS),
              help="inpaint (--mask), superres (--factor), colorize (1-channel luminance inputs, RGB model), sdedit "
                   "(--t0), invert (data -> noise -> data), interpolate (inputs taken in pairs).")
@click.option("--input", "input_spec", required=True,
              help="The inputs, in the data's own units and layout: a .npy/.npz, a folder of images or an EDM .zip "
                   "(any data SPEC). superres: the low-resolution images; colorize: grey (luminance) images.")
@click.option("--mask", "mask_path", default=None, type=click.Path(dir_okay=False),
              help="inpaint: a .npy (or a grey image file) of the input's shape or one that broadcasts to it "
                   "([H, W] covers every channel of an RGB image; [N, ...] one mask per input); 1 = known.")
@click.option("--factor", type=int, default=None, help="superres: the factor F (it must divide the model's size).")
@click.option("--t0", type=float, default=None,
              help="sdedit: the noise level the guide is noised to, within the model's sigma range.")
@click.option("--nfe", type=int, default=None,
              help="Jumps (teacher: Heun steps). Default: 4 for inpaint, superres, colorize and sdedit, 1 for invert "
                   "and interpolate; a teacher 18.")
@click.option("--ts", default=None, help="Custom jump times instead of --nfe, descending (sdedit: from t0).")
@click.option("--gamma", type=float, default=None,
              help="gamma in [0, 1]. Default: 1 for inpaint, superres and colorize (consistency models' algorithm), "
                   "0 for the others.")
@click.option("--steps", "inv_steps", type=int, default=None,
              help="invert, interpolate: Heun steps of the inversion (data -> noise); default 64.")
@click.option("--labels", default=None,
              help="Class labels for a conditional model: one for every input, or one per input ('3' or '0,1,2'); "
                   "default: the inputs' own labels.")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale w (1 = plain conditional, 0 = unconditional; the model needs a "
                   "null branch, or a CTM distilled for w). Default: the model's own.")
@click.option("--num-samples", "--n", "n", type=int, default=None,
              help="Draws per input (interpolate: points per pair). Default 4 (invert 1, interpolate 8).")
@click.option("--limit", type=int, default=None, help="Use only the first N inputs.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Draw j of input i depends only on (seed, i N + j).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="OUT.npz (+ OUT.png for images: one row per input: input, observation, results).")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def edit_cmd(model_dir, task, input_spec, mask_path, factor, t0, nfe, ts, gamma, inv_steps, labels, guidance, n,
             limit, seed, batch_size, out, force, quiet):
    """Edit inputs zero-shot with a trained model: samples come back in the data's own space, input-major.

    OUT.npz holds `samples` [inputs x N, ...], `inputs` (as read), `labels` (conditional models), `noise` (invert,
    interpolate: model space, one per input) and `lambdas` (interpolate). An existing output is refused unless
    --force.

    \b
    Several processes (the batches split over the ranks; draw j of input i depends only on (seed, i N + j), so the
    output is that of one process):
      torchrun --nproc_per_node=8 -m ctmkit edit --model runs/ctm --task inpaint ... --out fill.npz"""
    opts = _check_options(task, mask_path, factor, t0, nfe, ts, gamma, inv_steps, n, batch_size, limit)
    out_path = Path(out)
    if out_path.suffix != ".npz":
        raise UserError(f"--out must end in .npz, got '{out_path.name}'")
    check_out_dir(out_path)
    from .. import job as dist
    from ..eval.edit_inputs import edit_schedule, read_inputs, read_mask, resolve_labels
    from ..eval.editing import Edit, run_edit, write_edit
    job, device = dist.setup("auto")     # under torchrun: the batches are split over the ranks, rank 0 writes
    model = load_model_spec(model_dir)
    card = model.card
    if guidance is not None:
        from ..eval.guide import resolve_scale
        resolve_scale(model, guidance)          # one line before anything is read or written
    check_new_outputs([out_path] + ([out_path.with_suffix(".png")] if card.data.kind == "image" else []), force)
    raw, x, data_labels, layout = read_inputs(input_spec, card, task, factor, limit)
    lab = resolve_labels(labels, card.num_classes, data_labels, len(x))
    mask = read_mask(mask_path, raw, layout) if task == "inpaint" else None
    sigmas = edit_schedule(task, card, opts["nfe"], opts["ts"], t0)
    edit = Edit(task, x, sigmas, opts["gamma"], opts["n"], seed, mask, factor or 1, lab, opts["inv_steps"], guidance)
    result = run_edit(model.to(device), edit, batch_size, progress=not quiet)
    if job.main:
        for p in write_edit(out_path, card, edit, result, raw):
            click.echo(f"wrote {p}")
    dist.teardown()


def _check_options(task, mask_path, factor, t0, nfe, ts, gamma, inv_steps, n, batch_size, limit) -> dict:
    """The options that do not need the model: which task takes which, ranges, defaults."""
    for name, value, owner in (("--mask", mask_path, "inpaint"), ("--factor", factor, "superres"),
                               ("--t0", t0, "sdedit")):
        if value is not None and task != owner:
            raise UserError(f"{name} applies only to --task {owner}")
        if value is None and task == owner and not (owner == "sdedit" and ts is not None):
            raise UserError(f"--task {owner} needs {name}")
    if inv_steps is not None and task not in ("invert", "interpolate"):
        raise UserError("--steps applies only to --task invert and interpolate")
    if factor is not None and factor < 2:
        raise UserError(f"--factor must be >= 2, got {factor}")
    if nfe is not None and ts is not None:
        raise UserError("give --nfe or --ts, not both (--ts sets the NFE: its number of times minus one)")
    if t0 is not None and ts is not None:
        raise UserError("give --t0 or --ts, not both (with --ts, sdedit starts at its first time)")
    if nfe is not None and nfe < 1:
        raise UserError(f"--nfe must be >= 1, got {nfe}")
    gamma = (1.0 if task in PROJECTIONS else 0.0) if gamma is None else gamma
    if not 0 <= gamma <= 1:
        raise UserError(f"--gamma must be in [0, 1], got {gamma}")
    n = {"invert": 1, "interpolate": 8}.get(task, 4) if n is None else n
    if n < 1 or (task == "interpolate" and n < 2):
        raise UserError(f"--num-samples must be >= {2 if task == 'interpolate' else 1}, got {n}")
    for name, v in (("--batch-size", batch_size), ("--steps", inv_steps), ("--limit", limit)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be >= 1, got {v}")
    return {"nfe": nfe, "ts": None if ts is None else parse_times(ts), "gamma": float(gamma), "n": n,
            "inv_steps": inv_steps or 64}
