"""load_model: a run folder (or one checkpoint file in it) -> the trained network, ready to call, in eval mode."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .errors import UserError
from .precond import CTM, EDMDenoiser
from .train.checkpoint import list_checkpoints, load_checkpoint, load_latest
from .train.common import build_backbone


def read_model_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "model.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"'{run_dir}' is not a ctmkit run folder (no model.json); train one with "
                        "`ctmkit train-teacher` or `ctmkit distill`") from None
    except ValueError:
        raise UserError(f"'{path}' is not valid JSON") from None


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
        found = load_latest(path / "checkpoints")
        if found is None:
            what = "only broken checkpoints" if list_checkpoints(path / "checkpoints") else "no checkpoint"
            raise UserError(f"run folder '{path}' has {what}; train it first (or resume the training)")
        state = found[0]
    info = read_model_info(run_dir)
    wrapper = CTM if info["kind"] == "ctm" else EDMDenoiser
    model = wrapper(build_backbone(info["backbone"]), info["sigma_data"])
    key = f"ema{ema}"
    if key not in state["nets"]:
        raise UserError(f"checkpoint has no EMA number {ema}; it has {sorted(state['nets'])}")
    model.load_state_dict(state["nets"][key])
    model.info = info
    model.requires_grad_(False)
    return model.eval()
