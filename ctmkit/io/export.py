"""The on-disk format of an exported CTM (`ctmkit export`; docs/architecture.md, "Exported folders"), read here
without diffusers so that `load_model(OUT)` and `ctmkit sample --model OUT` take an export like a run folder.

    OUT/model_index.json                         {"_class_name": "CTMPipeline", "unet": [...], "scheduler": [...]}
    OUT/unet/config.json                         {"_class_name": "CTMModel", "card": the ModelCard as a dict}
    OUT/unet/diffusion_pytorch_model.safetensors the CTM's state dict under the prefix `ctm.`
    OUT/scheduler/scheduler_config.json          CTMScheduler: the sigma range, the training grid, rho, gamma
    OUT/vae/, OUT/text_encoder/, OUT/tokenizer/  a latent text-to-image CTM's teacher components (safetensors); its
                                                 card's latent record names folder "." (read as OUT itself)
    OUT/README.md, OUT/samples.png               the model card for the hub and its sample grid
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import UserError
from .card import ModelCard, malformed, read_json_object

PIPELINE_CLASS = "CTMPipeline"
NET_DIR = "unet"
NET_CONFIG = "config.json"
NET_WEIGHTS = "diffusion_pytorch_model.safetensors"
PREFIX = "ctm."          # the CTMModel's submodule holding the CTM (its keys: ctm.backbone.*)


def is_export(path: str | Path) -> bool:
    """A folder written by `ctmkit export` (its model_index.json names the CTMPipeline)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_class_name") == PIPELINE_CLASS


def read_export_card(path: str | Path) -> ModelCard:
    """The ModelCard stored in an export's unet/config.json (a latent CTM's pipeline folder: the export); one
    UserError when it is missing or malformed."""
    cfg = Path(path) / NET_DIR / NET_CONFIG
    d = read_json_object(cfg, f"ctmkit export '{path}'")
    if not isinstance(d.get("card"), dict):
        raise UserError(f"'{cfg}' has no 'card' object; it was not written by `ctmkit export`")
    try:
        card = ModelCard.from_dict(d["card"])
        if card.latent is not None:
            card = dataclasses.replace(card, latent={**card.latent, "folder": str(Path(path).resolve())})
        return card
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise malformed(cfg, e) from None


def read_export_weights(path: str | Path) -> dict:
    """The CTM's state dict of an export (safetensors only); one UserError for a missing or truncated file."""
    file = Path(path) / NET_DIR / NET_WEIGHTS
    try:
        state = load_file(str(file))
    except FileNotFoundError:
        raise UserError(f"'{path}' is an incomplete ctmkit export: '{file}' is missing") from None
    except (OSError, SafetensorError) as e:
        raise UserError(f"'{file}' cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt: export "
                        "the run again") from None
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
