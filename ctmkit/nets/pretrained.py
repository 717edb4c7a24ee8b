"""Pretrained weights that the user brings: a file named in a config key, read without running code.

ctmkit downloads nothing. The LPIPS distance needs VGG16 ImageNet weights, the projected discriminator DeiT and
EfficientNet-Lite ImageNet weights (docs/method.md section 3); each comes from a file the user names in a config
key (`ctm.lpips_vgg`, `ctm.disc_deit`, `ctm.disc_effnet`). An unset key or a missing or unreadable file is one
UserError naming the key, the file needed and where such weights are published.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError


@dataclass(frozen=True)
class WeightFile:
    """What a config key must name: `key` (e.g. ctm.lpips_vgg), `use` (what needs it), `needed` (the weights and
    where they are published)."""

    key: str
    use: str
    needed: str

    def path(self, value: str) -> Path:
        """The file the key names; UserError when it is not set or not a file."""
        where = f"{self.use} needs {self.needed}"
        fix = f"download it yourself and set {self.key}=PATH (ctmkit downloads nothing)"
        if not str(value).strip():
            raise UserError(f"{self.key} is not set: {where}; {fix}")
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"{self.key}: '{value}' is not a file (a preset only names a placeholder): {where}; "
                            f"{fix}")
        return path

    def read(self, value: str) -> dict[str, Tensor]:
        """The state dict in the file: safetensors, or a PyTorch .pth / .pt read with weights_only=True (tensors and
        plain containers only, no code); a checkpoint holding it under 'model' or 'state_dict' is unwrapped."""
        path = self.path(value)
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                sd = load_file(str(path))
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, KeyError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{self.key}: cannot read '{value}' as safetensors or a weights-only PyTorch state dict "
                            f"({why}); {self.use} needs {self.needed}") from None
        for inner in ("model", "state_dict"):
            if isinstance(sd, dict) and isinstance(sd.get(inner), dict):
                sd = sd[inner]
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise UserError(f"{self.key}: '{value}' does not hold a state dict of tensors; {self.use} needs "
                            f"{self.needed}")
        return sd


def load_into(module: torch.nn.Module, sd: dict[str, Tensor], wf: WeightFile, value: str) -> None:
    """Load a state dict strictly (names and shapes) into `module`; a mismatch is one UserError naming the key."""
    mine = module.state_dict()
    missing = [k for k in mine if k not in sd and not k.endswith("num_batches_tracked")]   # older files lack it
    wrong = [k for k in mine if k in sd and tuple(sd[k].shape) != tuple(mine[k].shape)]
    if missing or wrong:
        what = f"missing {missing[:3]}" if missing else f"wrong shapes for {wrong[:3]}"
        raise UserError(f"{wf.key}: '{value}' is not the expected weights ({what}); {wf.use} needs {wf.needed}")
    module.load_state_dict({k: sd.get(k, v) for k, v in mine.items()})
