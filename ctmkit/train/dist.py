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

import torch
import torch.distributed as dist
from torch import nn

from ..job import Dist


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
