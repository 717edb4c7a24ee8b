"""Multi-process training on torch.distributed, launched by torchrun (no MPI).

Every rank draws the same *global* batch from the same seeded generator and keeps its own slice
(rank r of W holds items [r B/W, (r+1) B/W)), then splits that into micro-batches. So the random stream,
and the trained weights, do not depend on the number of processes or micro-batches: 2 ranks x B/2,
1 rank x 2 micro-batches of B/2 and 1 rank x B all see the same samples and noise. Gradients are
averaged by DistributedDataParallel (NCCL on GPU, gloo on CPU); anything computed outside it (the
adaptive loss weights, the loss statistics, the stop flag) is all-reduced explicitly here.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError


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


def shard(x: torch.Tensor | None, d: Dist) -> torch.Tensor | None:
    """This rank's slice of a global batch (leading dimension divisible by the world size)."""
    if x is None or not d.active:
        return x
    n = x.shape[0] // d.world
    return x[d.rank * n:(d.rank + 1) * n]


def all_mean_(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """In-place mean over ranks (identity alone)."""
    if d.active:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world
    return x


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (e.g. a signal that reached only some)."""
    if not d.active:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


class Dispatch(nn.Module):
    """Lets DistributedDataParallel wrap a module whose useful calls are methods other than forward:
    ``Dispatch(ctm)("denoise", x, sigma)`` runs ``ctm.denoise(x, sigma)`` through DDP's forward, so its
    gradients are synchronised like any other (calling ``ddp.module.denoise`` would silently skip that)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.module, method)(*args, **kwargs)


def wrap(module: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """Dispatch(module), inside DistributedDataParallel when running with several ranks."""
    disp = Dispatch(module)
    if not d.active:
        return disp
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(disp, device_ids=ids)


def no_sync(wrapped: nn.Module, sync: bool):
    """DDP's no_sync() for micro-batches whose gradients are only accumulated (all but the last)."""
    if sync or not isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return wrapped.no_sync()
