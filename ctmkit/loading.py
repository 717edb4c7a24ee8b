"""load_model: a run folder (or one checkpoint file in it) -> the trained network, ready to call, in eval mode."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from .errors import UserError
from .precond import CTM, EDMDenoiser
from .train.checkpoint import list_checkpoints, load_checkpoint
from .train.common import build_backbone

log = logging.getLogger(__name__)


def read_model_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "model.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"'{run_dir}' is not a ctmkit run folder (no model.json); train one with "
                        "`ctmkit train-teacher` or `ctmkit distill`") from None
    except (ValueError, RecursionError):
        raise UserError(f"'{path}' is not valid JSON") from None
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror or e}") from None
    if not isinstance(info, dict):
        raise UserError(f"'{path}' must hold a JSON object; it was not written by ctmkit")
    return info


def _newest_valid(run_dir: Path) -> dict:
    """The newest intact checkpoint's state; broken newer ones are skipped with a warning. If none is intact,
    one UserError that gives the newest one's problem (no warnings: the error line says it all)."""
    paths = list_checkpoints(run_dir / "checkpoints")
    if not paths:
        raise UserError(f"run folder '{run_dir}' has no checkpoint; train it first (or resume the training)")
    problems = []
    for path in reversed(paths):
        try:
            state = load_checkpoint(path)
        except UserError as e:
            problems.append(str(e))
            continue
        for why in problems:
            log.warning("skipping %s", why)
        return state
    raise UserError(f"run folder '{run_dir}' has only broken checkpoints (newest: {problems[0]})")


def load_model(path: str | Path, ema: int = 0) -> nn.Module:
    """The model of a run folder or checkpoint file (EMA number `ema`, default the first): an EDMDenoiser
    (teacher) or a CTM, on the CPU in eval mode, with `.info` (model.json) attached."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path '{path}' does not exist")
    if path.is_file():
        run_dir, state = path.parent.parent, load_checkpoint(path)
    else:
        run_dir = path
        read_model_info(path)  # first: a folder that is not a run gets that message, not "no checkpoint"
        state = _newest_valid(path)
    info = read_model_info(run_dir)
    try:
        if info["kind"] not in ("ctm", "teacher"):
            raise ValueError(f"kind must be 'ctm' or 'teacher', got {info['kind']!r}")
        data = info["data"]
        if not (all(int(v) >= 1 for v in data["shape"]) and int(data["num_classes"]) >= 0
                and isinstance(data["normalizer"], dict)):
            raise ValueError("its 'data' entry needs shape, num_classes and normalizer")
        wrapper = CTM if info["kind"] == "ctm" else EDMDenoiser
        model = wrapper(build_backbone(info["backbone"]), float(info["sigma_data"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"'{Path(run_dir) / 'model.json'}' is malformed ({type(e).__name__}: {e}); "
                        "it was not written by this version of ctmkit") from None
    nets = state.get("nets")
    key = f"ema{ema}"
    if not isinstance(nets, dict) or key not in nets:
        have = sorted(str(k) for k in nets) if isinstance(nets, dict) else "none"
        raise UserError(f"checkpoint has no EMA number {ema}; it has {have}")
    try:
        model.load_state_dict(nets[key])
    except (RuntimeError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"the checkpoint's weights do not fit the network described in model.json ({first}); "
                        "was the checkpoint copied from another run?") from None
    model.info = info
    model.requires_grad_(False)
    return model.eval()
