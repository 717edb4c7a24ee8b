"""Run folders: `load_model(run folder or checkpoint file)` -> the trained network, ready to call, in eval mode.

A run folder holds config.yaml, model.json (the ModelCard), checkpoints/ and stats.jsonl."""

from __future__ import annotations

from pathlib import Path

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..core.precond import CTM, EDMDenoiser, make_precond
from ..errors import UserError
from ..nets.lora import is_trained, lora_backbone
from .card import ModelCard, malformed
from .checkpoint import load_checkpoint, newest_intact
from .export import is_export, read_export_card, read_export_weights


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
    lora = lora_rank(card)
    try:
        backbone = card.backbone.build() if lora is None else lora_backbone(card.backbone, card.latent["folder"], lora)
        return wrapper(backbone, card.sigma_data, make_precond(card.precond, card.sigma_data))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise malformed(where, e) from None


def load_model(path: str | Path, ema: int | None = None) -> nn.Module:
    """The model of a run folder, checkpoint file or `ctmkit export` folder: an EDMDenoiser (teacher) or a CTM, on
    the CPU in eval mode, with its ModelCard as `.card` (and `.info`, the card as a model.json dict of the current
    format, kept for scripts written against ctmkit 0.1). Weights: EMA number `ema` of the newest checkpoint; by
    default the run's choice, the post-hoc EMA that `ctmkit ema` recorded in the card if any (run folders), else
    the first EMA; an export holds one set of weights (`ema` is refused)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path '{path}' does not exist")
    if path.is_dir() and is_export(path):
        if ema is not None:
            raise UserError(f"'{path}' is a ctmkit export, which holds one set of weights: no EMA number to choose")
        card = read_export_card(path)
        return _ready(build_model(card, str(path / "unet" / "config.json")), card, read_export_weights(path))
    run_dir = path.parent.parent if path.is_file() else path
    state = load_checkpoint(path) if path.is_file() else None
    card = ModelCard.read(run_dir)  # before the checkpoints: a folder that is not a run gets that message
    if ema is None and state is None and card.sampled is not None:
        weights = _sampled_weights(run_dir, card.sampled["file"])
    else:
        weights = _ema_weights(state if state is not None else newest_state(path), 0 if ema is None else ema)
    return _ready(build_model(card, str(Path(run_dir) / "model.json")), card, weights)


def lora_rank(card: ModelCard) -> int | None:
    """The adapter rank of a LoRA student (its card's latent.lora, docs/method.md section 9), else None."""
    lora = (card.latent or {}).get("lora")
    return None if lora is None else int(lora["rank"])


def _ready(model: nn.Module, card: ModelCard, weights: dict) -> nn.Module:
    """The model with its weights and card, frozen, in eval mode. A LoRA student's weights are its trained tensors
    alone (adapters and s embedding); the rest is the teacher's, already loaded."""
    try:
        if lora_rank(card) is None:
            model.load_state_dict(weights)
        else:
            want = sorted(k for k in model.state_dict() if is_trained(k))
            if sorted(weights) != want:
                raise RuntimeError(f"{len(weights)} tensors for the {len(want)} trained ones of this LoRA student")
            model.load_state_dict(weights, strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"the checkpoint's weights do not fit the network described in model.json ({first}); "
                        "was the checkpoint copied from another run?") from None
    model.card, model.info = card, card.to_dict()
    model.requires_grad_(False)
    return model.eval()


def _ema_weights(state: dict, ema: int) -> dict:
    nets = state.get("nets")
    if not isinstance(nets, dict) or f"ema{ema}" not in nets:
        have = sorted(str(k) for k in nets) if isinstance(nets, dict) else "none"
        raise UserError(f"checkpoint has no EMA number {ema}; it has {have}")
    return nets[f"ema{ema}"]


def _sampled_weights(run_dir: Path, file: str) -> dict:
    """The weights file model.json names (a post-hoc EMA rebuilt by `ctmkit ema`)."""
    path = Path(run_dir) / file
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UserError(f"model.json samples '{path}', which cannot be read ({type(e).__name__}); rebuild it with "
                        f"`ctmkit ema {run_dir} --sigma-rel X` or go back to the training EMA with "
                        f"`ctmkit ema {run_dir} --reset`") from None
