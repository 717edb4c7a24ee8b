"""`ctmkit ema`: choose the weights a run samples among EMAs of any width, rebuilt after training from its post-hoc
EMA snapshots (Karras et al. 2024; docs/method.md section 3), and measure the widths to choose by."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import click

from ..errors import UserError
from .base import int_list, main, user_errors


def _widths(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--sweep must be comma-separated widths, e.g. 0.03,0.05,0.1; got '{text}'") from None
    if not vals:
        raise UserError("--sweep needs at least one width")
    return vals


def _choose(run: Path, card, sigma_rel: float | None, step: int | None, reset: bool) -> str:
    """Rebuild and record a width (or go back to the training EMA); returns the message."""
    from ..io.phema import sample_width
    if reset:
        dataclasses.replace(card, sampled=None).write(run)
        return f"{run} samples its training EMA again (train.ema rate {card.ema[0]:g})"
    rel, step = sample_width(run, sigma_rel, step)
    return (f"{run} now samples the post-hoc EMA of width sigma_rel {sigma_rel:g} at step {step} ({rel}); "
            f"`ctmkit ema {run} --reset` goes back to the training EMA")


def _weights(run: Path, card, widths: list[float], step: int | None):
    """(name, model): the training EMA, then each width rebuilt into the same module in turn."""
    from ..io.phema import rebuild
    from ..io.runs import load_model
    model = load_model(run, ema=0)
    yield f"train.ema {card.ema[0]:g}", model
    for s in widths:
        model.load_state_dict(rebuild(run, s, step)[0])
        yield f"sigma_rel {s:g}", model


def _sweep(run: Path, card, widths: list[float], against: tuple[str, str], nfes: list[int], n: int,
           step: int | None, guidance: float | None = None) -> tuple[str, dict]:
    """(what was measured, {weights: {nfe: value}}) at gamma 0: the coupled error against a teacher's accurate ODE
    solution (against = ("teacher", SPEC)), or `ctmkit eval`'s metric against data (("data", SPEC)); at guidance
    scale `guidance` (None: the CTM's own)."""
    import torch

    from ..data import load_data
    from ..eval.diagnostics import coupled_sweep
    from ..eval.quality import balanced_labels, make_quality
    from ..teachers import load_teacher
    kind, spec = against
    if kind == "data":
        dataset = load_data(spec)
        card.check_data(dataset)
        quality = make_quality("auto", dataset, n)
        return quality.name, {name: {k: quality.point(m, "gamma", k, 0.0, None, guidance)[0] for k in nfes}
                              for name, m in _weights(run, card, widths, step)}
    teacher = load_teacher(spec, load_data(card.data.spec) if spec == "exact" else None)
    labels = balanced_labels(SimpleNamespace(card=card), n)
    return "coupled error", coupled_sweep(card, _weights(run, card, widths, step), teacher, n, nfes, labels=labels,
                                          exact=not isinstance(teacher, torch.nn.Module), guidance=guidance)


@main.command("ema")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--sigma-rel", type=float, default=None,
              help="Rebuild the EMA of this width (the standard deviation of its averaging profile as a fraction of "
                   "the training so far; the snapshots are of 0.05 and 0.1) and make it the weights the run samples.")
@click.option("--step", type=int, default=None, help="The step to rebuild the EMA at (default: the last snapshot's).")
@click.option("--reset", is_flag=True, help="Sample the training EMA (train.ema's first rate) again.")
@click.option("--sweep", default=None, metavar="W1,W2,...",
              help="Measure these widths (and the training EMA) at gamma 0: the coupled error against --teacher's "
                   "accurate ODE solution from the same noise (as `diagnose`), or `eval`'s metric against --data "
                   "(sliced W1 ratio, classifier distance or FID); chooses nothing.")
@click.option("--teacher", "teacher_spec", default=None,
              help="For --sweep: the teacher SPEC (a run folder, 'exact' for data with a known density, diffusers:DIR, "
                   "edm:FILE.pkl, py:MODULE:ATTR).")
@click.option("--data", default=None, help="For --sweep: data SPEC to measure against with `eval`'s metric instead.")
@click.option("--nfe", default="1,2,4", show_default=True, help="For --sweep: NFE values (comma-separated).")
@click.option("--guidance", type=float, default=None,
              help="For --sweep: classifier-free guidance scale W (default: the CTM's own; a range student needs one).")
@click.option("--num-samples", "--n", "n", type=int, default=256, show_default=True,
              help="For --sweep: samples per point (noise draws).")
@user_errors
def ema_cmd(run, sigma_rel, step, reset, sweep, teacher_spec, data, nfe, guidance, n):
    """Post-hoc EMA (Karras et al. 2024): during training the EMAs of two power-function profiles are snapshotted
    into RUN/phema (train.phema, train.phema_every); from them the EMA of any width at any snapshot step is rebuilt
    by least squares, after training, without retraining.

    \b
    ctmkit ema RUN                                  list the snapshots and what the run samples now
    ctmkit ema RUN --sweep 0.02,0.05,0.1,0.15 --teacher exact    measure widths (coupled error)
    ctmkit ema RUN --sigma-rel 0.1                  sample that width from now on (recorded in model.json)
    ctmkit ema RUN --reset                          back to the training EMA
    """
    from ..io.card import ModelCard
    from ..io.phema import list_snapshots
    run = Path(run)
    card = ModelCard.read(run)
    if (sigma_rel is not None) + reset + (sweep is not None) > 1:
        raise UserError("give one of --sigma-rel, --reset and --sweep")
    if sweep is not None:
        if (teacher_spec is None) == (data is None):
            raise UserError("--sweep measures against a teacher or data: give --teacher SPEC ('exact' for known "
                            "densities) or --data SPEC, not both")
        if not card.is_ctm:
            raise UserError(f"'{run}' is a {card.kind} run; --sweep measures a CTM's samples")
        if n < 2:
            raise UserError("--n must be >= 2")
        nfes = int_list(nfe, "--nfe")
        what, vals = _sweep(run, card, _widths(sweep), ("teacher", teacher_spec) if data is None else ("data", data),
                            nfes, n, step, guidance)
        click.echo(f"{what} (lower is better)".ljust(34) + "".join(f"NFE {k:<6}" for k in nfes))
        for name, row in vals.items():
            click.echo(name.ljust(34) + "".join(f"{row[k]:<10.4f}" for k in nfes))
        click.echo(f"lowest at NFE {nfes[0]}: {min(vals, key=lambda name: vals[name][nfes[0]])}")
        return
    if sigma_rel is not None or reset:
        click.echo(_choose(run, card, sigma_rel, step, reset))
        return
    snaps = list_snapshots(run)
    widths = sorted({s.sigma_rel for s in snaps})
    steps = sorted({s.step for s in snaps})
    if snaps:
        click.echo(f"{len(snaps)} snapshots of widths {', '.join(f'{w:g}' for w in widths)} at steps "
                   f"{steps[0]}..{steps[-1]} ({len(steps)} steps)")
    else:
        click.echo("no post-hoc EMA snapshots (runs record them with train.phema, on by default)")
    now = card.sampled
    click.echo(f"samples: post-hoc EMA sigma_rel {now['phema']['sigma_rel']:g} at step {now['phema']['step']}"
               if now else f"samples: the training EMA (train.ema rate {card.ema[0]:g})")

