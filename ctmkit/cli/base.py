"""The command line's frame: the `ctmkit` group, one-line user errors (exit status 2), the torchrun job's exit, and
the option parsers shared by several commands."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import UserError, one_line

DATA_HELP = ("data SPEC: a built-in 2-D set (ring, grid, moons, checkerboard, spiral; labelled_ring and "
             "labelled_blobs have classes), 'digits' (scikit-learn 8x8), gmm:PATH.json (a Gaussian mixture: means "
             "[K][D], stds [K], weights [K], optional classes [K]), a .npy/.npz file "
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
        from .. import job
        job.leave_on_error()


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
@click.version_option(__version__, "--version", prog_name="ctmkit", message="%(prog)s %(version)s",
                      help="Print the ctmkit version and exit.")
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



def done(message: str) -> None:
    """Leave the torchrun job (if any) and print the message once (rank 0)."""
    from .. import job
    job.teardown()
    if job.is_main_process():
        click.echo(message)


def two_jump_request(text: str, grid_n: int | None, model_dir) -> tuple[int, int, int]:
    """--two-jump I1,I2 [--grid N] -> (I1, I2, N); N defaults to the run's ctm.num_scales (a run folder, or the run
    of a checkpoint file)."""
    from ..io.runs import training_grid_size
    jumps = int_list(text, "--two-jump")
    if len(jumps) != 2:
        raise UserError(f"--two-jump takes two grid indices I1,I2, e.g. 36,20; got '{text}'")
    if grid_n is None:
        run_dir = Path(model_dir) if Path(model_dir).is_dir() else Path(model_dir).parent.parent
        grid_n = training_grid_size(run_dir)
        if grid_n is None:
            raise UserError(f"cannot read ctm.num_scales from '{run_dir}/config.yaml': give --grid N")
    return jumps[0], jumps[1], grid_n


def load_model_spec(spec: str, text: bool = False):
    """A run folder or checkpoint file (load_model), or a foreign teacher SPEC (diffusers:DIR, py:MODULE:ATTR);
    a text-to-image pipeline only where the command takes prompts (`text`: `ctmkit sample`, `ctmkit eval`)."""
    if str(spec).startswith(("diffusers:", "py:", "edm:")):
        from ..teachers import load_teacher
        teacher = load_teacher(spec)
        if getattr(teacher, "card", None) is None:
            raise UserError(f"teacher '{spec}' does not report its data shape: give the denoiser a `shape` "
                            "attribute (e.g. shape = (3, 32, 32)) to sample or evaluate it")
        if teacher.card.text_conditioned and not text:
            raise UserError(f"'{spec}' is a text-to-image pipeline: this command does not take it yet (`ctmkit "
                            "sample --prompt` and `ctmkit eval --prompts` do; from Python: "
                            "teacher.encode_prompt(prompts) as the condition)")
        return teacher
    from ..io.runs import load_model
    return load_model(spec)


def check_out_dir(out: Path) -> None:
    """The folder of an output file must exist and be writable: checked before any work is done."""
    import os
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist; create it first"
        raise UserError(f"output folder '{out.parent}' {what}")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"output folder '{out.parent}' is not writable")


FORCE_HELP = ("Replace outputs that already exist. Without --force an existing output is refused, before any work "
              "is done: no command replaces a file silently.")


def force_option(fn):
    """--force: the one switch, on every command that writes files, that lets an output replace an existing one."""
    return click.option("--force", is_flag=True, help=FORCE_HELP)(fn)


def check_new_outputs(paths, force: bool) -> None:
    """Existing outputs are refused (one line naming --force) unless `force`; a folder where a file is to go is
    refused either way. Checked before any work is done."""
    for path in map(Path, paths):
        if path.is_dir():
            raise UserError(f"output '{path}' is a directory; give a file name")
        if (path.exists() or path.is_symlink()) and not force:
            raise UserError(f"'{path}' already exists; pass --force to replace it")


def int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got '{text}'") from None
    if any(v < 1 for v in vals):
        raise UserError(f"{what} values must be >= 1, got '{text}'")
    return vals


def parse_times(text: str) -> tuple[float, ...]:
    """--ts T0,T1,...: the numbers (their order and range are checked against the model when it is loaded)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--ts must be comma-separated numbers, e.g. 80,2.5,0.002; got '{text}'") from None


def float_list(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got '{text}'") from None
    if any(not 0 <= v <= 1 for v in vals):
        raise UserError(f"{what} values must be in [0, 1], got '{text}'")
    return vals
