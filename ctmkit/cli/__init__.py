"""The ctmkit command line (the only package that reads argv). Every user error: one line, exit status 2.

This module holds the commands that train (`train-teacher`, `distill`, `demo`) and `config`; the others live by
topic beside it (evaluate.py, sample.py, data.py) and register on the same group (base.py: `main`).
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from . import edit, ema, evaluate, export, prepare, sample  # noqa: F401  (each registers its commands on `main`)
from .base import DATA_HELP, done, main, user_errors

__all__ = ["main"]


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
    Writes config.yaml, model.json, checkpoints/ and stats.jsonl into --out. label_dropout=0.1 trains the null label
    -1 (labelled data): the teacher can then be guided (--guidance) and distilled guided (ctm.guidance).

    \b
    Several processes / GPUs (DDP; --batch-size stays the global batch):
      torchrun --nproc_per_node=4 -m ctmkit train-teacher --data ... --out ...
    Accumulate gradients with train.micro_batches=N; train.precision=bf16|fp16; train.compile=true;
    train.workers=N decodes image folders / zips ahead in N processes.
    """
    from ..config import TeacherConfig, load_config
    from ..data import load_data
    from ..train.teacher import TeacherRun

    cfg = load_config(TeacherConfig, preset, config_file, list(overrides), data=data,
                      **_train_flags(steps, batch_size, seed, ckpt_every))
    dataset = load_data(cfg.data, n=cfg.n_data or None, seed=cfg.train.seed)
    run = TeacherRun(cfg, out, dataset, resume=resume)
    run.fit(progress=not quiet)
    done(f"teacher trained: {out}")


@main.command("distill")
@click.option("--teacher", default=None,
              help="Teacher SPEC: a ctmkit teacher run folder; 'exact' for data with a known density (gmm:PATH.json, "
                   "ring, grid); diffusers:DIR (a diffusers pipeline folder: UNet2DModel + a DDPM/DDIM-style or "
                   "flow-matching scheduler, or a text-to-image pipeline with model_index.json such as Stable "
                   "Diffusion; pip install 'ctmkit[diffusers]'; DIR?null_class=K names its null class "
                   "for guidance); edm:FILE.pkl (an NVIDIA EDM network pickle such as edm-cifar10-32x32-uncond-vp.pkl, "
                   "read without running its code); py:MODULE:ATTR (your own denoiser "
                   "D(x, sigma, labels) or a factory of one: this imports and runs your module).")
@training_options
@user_errors
def distill(teacher, data, out, preset, config_file, steps, batch_size, seed, ckpt_every, resume, quiet, overrides):
    """Distill a CTM G(x_t, t, s) from a teacher (CTM + DSM + GAN losses).

    The student starts from the teacher's weights and architecture (ctm.init_from_teacher), with the teacher's
    sigma range; a py: teacher is distilled into a ctmkit network (model.* settings). Switch terms with ctm.dsm=false,
    ctm.gan=false, start the GAN late with ctm.gan_start=N; ctm.teacher_free=true trains without a teacher.
    Classifier-free guidance (a teacher with a null branch): ctm.guidance=2 distils the guided teacher D_2,
    ctm.guidance=[1,4] one student for every scale in the range (docs/method.md section 8).
    A latent text-to-image pipeline (diffusers:DIR with model_index.json) distils on a folder from `ctmkit prepare
    --pipeline DIR`: prompts as conditions, the empty prompt as null, no GAN by default; ctm.lora_rank=R trains LoRA
    adapters only, ctm.teacher_dtype=bfloat16 and train.grad_checkpointing=true save memory (section 9); sample the
    student with `ctmkit sample --model OUT --prompt TEXT`.
    `ctmkit config distill` lists every key. Writes config.yaml, model.json, checkpoints/, stats.jsonl.

    \b
    Several processes / GPUs (DDP; --batch-size stays the global batch):
      torchrun --nproc_per_node=8 -m ctmkit distill --teacher ... --data ... --out ...
    Each process reads only its slice of every batch; train.workers=N decodes image folders / zips ahead.
    """
    from ..config import DistillConfig, load_config
    from ..data import load_data
    from ..train.ctm import CTMRun

    cfg = load_config(DistillConfig, preset, config_file, list(overrides), data=data, teacher=teacher,
                      **_train_flags(steps, batch_size, seed, ckpt_every))
    dataset = load_data(cfg.data, n=cfg.n_data or None, seed=cfg.train.seed)
    CTMRun(cfg, out, dataset, resume=resume).fit(progress=not quiet)
    done(f"CTM distilled: {out}")



@main.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run folder: new or empty, or with --resume the folder of an interrupted demo.")
@click.option("--preset", default="toy", show_default=True,
              help="toy (2-D moons; about 7 min on 2 idle CPU cores, measured 2026-12-06), digits (scikit-learn 8x8 "
                   "digits; about 30 min on 2 CPU cores), mnist (needs --data).")
@click.option("--data", default=None, help="Data SPEC; default: the preset's (toy: moons). " + DATA_HELP)
@click.option("--eval-samples", type=int, default=2000, show_default=True,
              help="Samples per evaluated point; fewer also shrink the diagnosis (256 noises at 2000, at least 16).")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted demo in --out from its last finished stage (a training stage from its "
                   "newest checkpoint); the settings must be those it started with.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.argument("overrides", nargs=-1)
@user_errors
def demo(out, preset, data, eval_samples, resume, quiet, overrides):
    """The main job: train a teacher, distill a CTM, sample at NFE 1, 2, 4, 8 (gamma 0 and 1), evaluate
    against the teacher's Heun solver, diagnose where the CTM leaves the teacher's ODE, and write OUT/report.md
    with plots and a verdict per table.

    key=value overrides apply to both stages (e.g. train.steps=500 for a quick look). OUT/demo.json records the
    settings and the finished stages: after an interruption (Ctrl-C, SIGTERM) rerun the same command with --resume."""
    from ..demo import run_demo
    if preset == "mnist" and not data:
        raise UserError("--preset mnist needs --data PATH_TO_MNIST_IDX_FOLDER")
    if eval_samples < 10:
        raise UserError("--eval-samples must be >= 10")
    run_demo(Path(out), preset, data, tuple(overrides), progress=not quiet, echo=click.echo,
             eval_samples=eval_samples, resume=resume)


@main.command("config")
@click.argument("command", type=click.Choice(["teacher", "distill"]))
@click.option("--preset", default=None, help="Show a preset resolved on top of the defaults.")
@user_errors
def show_config(command, preset):
    """Print the full default config of a training command: every valid key with its value and description.

    The output is YAML (descriptions as comments): save it, edit it and pass it back with --config FILE."""
    from ..config import PLACEHOLDERS, DistillConfig, TeacherConfig, load_config, to_yaml
    cls = TeacherConfig if command == "teacher" else DistillConfig
    what = "ctmkit train-teacher" if command == "teacher" else "ctmkit distill"
    if preset:
        what += f" --preset {preset}"
    header = (f"{what}: every config key with its default value (a valid --config FILE; key=value on the command "
              f"line sets one).\n{PLACEHOLDERS}")
    click.echo(to_yaml(load_config(cls, preset), header), nl=False)


if __name__ == "__main__":
    main()
