"""Dropout whose activity is an explicit setting rather than a side effect of `.train()` / `.eval()`.

The CTM reference evaluates its target network theta^- in training mode, dropout active; ctmkit states that as
`ctm.target_dropout` and passes it to the target with `set_dropout(target, True)`, which no later `.eval()` undoes."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Dropout(nn.Module):
    """nn.Dropout(p) with an override: `active` None follows the module's training mode, True/False forces it.
    No parameters, so state dicts are those of nn.Dropout (none)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p, self.active = p, None

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training if self.active is None else self.active)

    def extra_repr(self) -> str:
        return f"p={self.p}, active={'follows training' if self.active is None else self.active}"


def set_dropout(module: nn.Module, active: bool | None) -> nn.Module:
    """Force every ctmkit Dropout inside `module` on (True) or off (False), or back to the training mode (None)."""
    for m in module.modules():
        if isinstance(m, Dropout):
            m.active = active
    return module
