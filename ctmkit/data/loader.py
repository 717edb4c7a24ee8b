"""Training batches of a finite data set as a function of (seed, step) alone.

Every process of a torchrun job draws the same global batch of item indices for a step (and the same flips), from
a generator seeded by (train.seed, step), and reads only its own slice: N processes train on the same items as one,
and a resumed run on the same items as an uninterrupted one, with no sampler state to save. With `train.workers`
> 0 the slices of the next steps are read and decoded ahead by DataLoader worker processes (the data stay in data
space, uint8 stays uint8; conversion to model space happens on the training device).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError

NEVER = 1 << 62   # a step no run reaches


@dataclass(frozen=True)
class BatchPlan:
    """The global batch of each step: `size` items, `later_size` from step `from_step` on (the CTM's GAN stage), drawn
    uniformly with replacement by a generator seeded with (seed, step); `xflip`: a left-right flip per item, p = 1/2."""

    size: int
    seed: int
    xflip: bool = False
    later_size: int = 0
    from_step: int = NEVER

    def batch_size(self, step: int) -> int:
        return self.later_size if step >= self.from_step and self.later_size > 0 else self.size

    def draw(self, step: int, n_items: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(item indices int64 [B], flips bool [B] or None) of `step`'s global batch."""
        rng = np.random.default_rng([self.seed, step])
        b = self.batch_size(step)
        idx = rng.integers(n_items, size=b, dtype=np.int64)
        return idx, (rng.random(b) < 0.5 if self.xflip else None)


class StepBatches(torch.utils.data.Dataset):
    """Item `step`: this rank's slice of that step's global batch, as {"step", "raw" (data space, the data's dtype),
    "labels" (int64 or None), "flip" (bool or None)}, or {"step", "error"} when an item cannot be read."""

    def __init__(self, data, plan: BatchPlan, rank: int = 0, world: int = 1) -> None:
        self.data, self.plan, self.rank, self.world = data, plan, rank, world

    def __len__(self) -> int:
        return NEVER

    def __getitem__(self, step: int) -> dict:
        idx, flip = self.plan.draw(step, len(self.data))
        n = len(idx) // self.world
        mine = slice(self.rank * n, (self.rank + 1) * n)
        try:
            raw = self.data.raw(idx[mine])
        except UserError as e:   # returned, not raised: a worker's exception would arrive wrapped in a traceback
            return {"step": step, "error": str(e)}
        labels = None if self.data.labels is None else self.data.labels[torch.from_numpy(idx[mine])]
        return {"step": step, "raw": raw, "labels": labels,
                "flip": None if flip is None else torch.from_numpy(flip[mine])}


class StepLoader:
    """Reads the slices of steps start, start + 1, ... in order: in this process (workers = 0) or prefetched by
    `workers` DataLoader processes (pinned memory for a CUDA device)."""

    def __init__(self, batches: StepBatches, start: int, workers: int = 0, pin: bool = False) -> None:
        self.batches, self.next_step = batches, start
        self.it = None
        if workers > 0:
            loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, NEVER),
                                                 num_workers=workers, pin_memory=pin, prefetch_factor=2)
            self.it = iter(loader)

    def get(self, step: int) -> dict:
        """The slice of `step` (the next one: steps are read in order); UserError when an item could not be read."""
        if step != self.next_step:
            raise ValueError(f"StepLoader expected step {self.next_step}, got {step}")
        item = next(self.it) if self.it is not None else self.batches[step]
        self.next_step += 1
        if "error" in item:
            raise UserError(f"{item['error']} (training step {step}; the last checkpoint is kept: fix the data and "
                            "continue with --resume)")
        return item

    def close(self) -> None:
        """Stop the worker processes."""
        self.it = None
