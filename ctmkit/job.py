"""The torchrun job a command runs in: join it (or run alone), its rank, and leaving it cleanly.

Used by every command that can run under `torchrun` (training, `sample`, `eval`); the training-only collectives
(sharding, all-reduce, DDP wrapping) are in train/dist.py.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Dist:
    """This process's place in the job: rank of world, and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the torchrun job (WORLD_SIZE > 1) or run alone; returns (Dist, device).

    NCCL when training on CUDA, gloo on CPU. A GPU rank uses cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), _device(device, 0)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local), dev


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA GPU is available; use device=cpu or auto")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a lone process (for messages printed once)."""
    return int(os.environ.get("RANK", "0")) == 0


def teardown() -> None:
    """Leave the job: free what still holds the process group, then destroy it on every rank.

    A finished run sits in reference cycles, so its DistributedDataParallel wrappers (whose reducers hold the
    group) would otherwise outlive destroy_process_group and die during interpreter shutdown, where gloo's
    worker threads can abort the process (SIGABRT, 'terminate called without an active exception')."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def leave_on_error() -> None:
    """Leave the job after an error on this rank: as teardown(), without waiting for the other ranks."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
