"""Run folders: `load_model(run folder or checkpoint file)` -> the trained network, ready to call, in eval mode.

A run folder holds config.yaml, model.json (the ModelCard), checkpoints/ and stats.jsonl."""

from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

from ..core.precond import CTM, EDMDenoiser, make_precond
from ..errors import UserError
from .card import ModelCard, malformed
from .checkpoint import load_checkpoint, newest_intact


def newest_state(run_dir: Path) -> dict:
    """The newest intact checkpoint's state of a run folder; UserError when it has none or only broken ones."""
    state, found = newest_intact(Path(run_dir) / "checkpoints")
    if state is not None:
        return state
    if not found:
        raise UserError(f"run folder '{run_dir}' has no checkpoint; train it first (or resume the training)")
    raise UserError(f"run folder '{run_dir}' has only broken checkpoints (newest: {found[0]})")


def training_grid_size(run_dir: str | Path) -> int | None:
    """N, the points of a CTM run's training grid (ctm.num_scales in its config.yaml), or None when not known."""
    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        return int(cfg["ctm"]["num_scales"])
    except (OSError, yaml.YAMLError, ValueError, KeyError, TypeError):
        return None


def build_model(card: ModelCard, where: str = "model.json") -> nn.Module:
    """The untrained network a card describes: a CTM or an EDMDenoiser (teacher) around its backbone."""
    wrapper = CTM if card.is_ctm else EDMDenoiser
    try:
        return wrapper(card.backbone.build(), card.sigma_data, make_precond(card.precond, card.sigma_data))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise malformed(where, e) from None


def load_model(path: str | Path, ema: int = 0) -> nn.Module:
    """The model of a run folder or checkpoint file (EMA number `ema`, default the first): an EDMDenoiser
    (teacher) or a CTM, on the CPU in eval mode, with its ModelCard as `.card` (and `.info`, the card as a
    model.json dict of the current format, kept for scripts written against ctmkit 0.1)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path '{path}' does not exist")
    if path.is_file():
        run_dir, state = path.parent.parent, load_checkpoint(path)
    else:
        run_dir = path
        ModelCard.read(path)  # first: a folder that is not a run gets that message, not "no checkpoint"
        state = newest_state(path)
    card = ModelCard.read(run_dir)
    model = build_model(card, str(Path(run_dir) / "model.json"))
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
    model.card, model.info = card, card.to_dict()
    model.requires_grad_(False)
    return model.eval()
