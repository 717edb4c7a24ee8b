"""What teacher and CTM training share: backbones from config, EMA, optimisers, the run loop with
checkpoints, resume, stats.jsonl, a progress bar, non-finite-step skipping and SIGINT/SIGTERM handling,
and the multi-process plumbing (torchrun + DDP, see dist.py): global batches sliced per rank and
micro-batch, rank-0-only files, fp16 gradient scaling, optional torch.compile."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
import typing
from pathlib import Path

import torch
import yaml
from torch import nn

from ..config import TrainConfig, to_dict
from ..core.phema import power_beta, sigma_rel_to_gamma
from ..core.schedules import lr_factor
from ..data.loader import BatchPlan, StepBatches, StepLoader
from ..errors import UserError
from ..io.atomic import atomic_write_text
from ..io.card import DataCard, ModelCard
from ..io.checkpoint import load_latest, save_checkpoint
from ..io.phema import write_snapshot
from ..job import setup as join_job
from ..progress import progress_bar
from . import dist
from .ema import ema_update, frozen_copy

if typing.TYPE_CHECKING:
    from ..data import Dataset

log = logging.getLogger(__name__)


def make_optimizer(params, tcfg: TrainConfig, lr: float | None = None, betas=(0.9, 0.999)):
    """Adam or RAdam (train.optimizer) at train.lr unless `lr` is given."""
    lr = tcfg.lr if lr is None else lr
    return (torch.optim.RAdam if tcfg.optimizer == "radam" else torch.optim.Adam)(params, lr=lr, betas=betas)


class Run:
    """A training run in a folder: subclasses set self.nets / self.opts and implement train_step()."""

    kind = "run"

    def __init__(self, cfg, out: str | Path, data: Dataset, resume: bool = False):
        cfg.validate()
        self.cfg, self.tcfg, self.data, self.resume = cfg, cfg.train, data, resume
        self.out = Path(out)
        self.dist, self.device = join_job(cfg.train.device)
        self.check_split("train.batch_size", self.tcfg.batch_size)
        self.gen = torch.Generator().manual_seed(cfg.train.seed + 1)   # all data/noise draws (CPU, then moved)
        self.step, self.bad_in_a_row, self.bad_total = 0, 0, 0
        self.nets: dict[str, nn.Module] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self._stop = False
        self._loader: StepLoader | None = None
        self.stats_log: StatsLog | None = None
        self._open_stats: dict | None = None     # a resumed log period's sums so far (from the checkpoint)

    # -- state ---------------------------------------------------------------------------------------
    def state(self) -> dict:
        st = {"step": self.step, "bad_total": self.bad_total, "gen": self.gen.get_state(),
              "torch_rng": torch.get_rng_state(),
              "nets": {k: m.state_dict() for k, m in self.nets.items()},
              "opts": {k: o.state_dict() for k, o in self.opts.items()},
              "scalers": {k: sc.state_dict() for k, sc in self.scalers.items()}}
        if self.device.type == "cuda":
            st["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.stats_log is not None:   # the open log period: a resumed run's next line averages the same steps
            st["stats_open"] = {"acc": dict(self.stats_log.acc), "count": dict(self.stats_log.count)}
        return st

    def load_state(self, st: dict) -> None:
        self.step, self.bad_total = int(st["step"]), int(st["bad_total"])
        self._open_stats = st.get("stats_open")
        self.gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in st:
            torch.cuda.set_rng_state(st["cuda_rng"], self.device)
        for k, m in self.nets.items():
            m.load_state_dict(st["nets"][k])
        for k, o in self.opts.items():
            o.load_state_dict(_opt_state_fix(st["opts"][k]))
        for k, sc in self.scalers.items():
            if k in st.get("scalers", {}):
                sc.load_state_dict(st["scalers"][k])

    def model_card(self) -> ModelCard:
        """Saved as model.json: what load_model needs to rebuild the network and map samples back."""
        raise NotImplementedError

    def card_fields(self) -> dict:
        """The ModelCard fields every run shares (its data, sigma range, EMA rates)."""
        return {"data": DataCard.of(self.data), "sigma_data": self.cfg.model.sigma_data,
                "sigma_min": self.cfg.sigma_min, "sigma_max": self.cfg.sigma_max, "ema": tuple(self.tcfg.ema)}

    def train_step(self) -> dict:
        raise NotImplementedError

    def trained_module(self) -> nn.Module:
        """What the EMAs average: the network (a LoRA student: its trained tensors alone, train/latent.py)."""
        return self.net

    # -- helpers for subclasses ------------------------------------------------------------------------
    def autocast(self):
        p = self.tcfg.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def set_lr(self, opt: torch.optim.Optimizer, base_lr: float) -> None:
        """This step's learning rate: base_lr x the warm-up and train.lr_schedule factor of the step."""
        t = self.tcfg
        scale = lr_factor(self.step, t.steps, t.warmup, t.lr_schedule, t.lr_final, t.lr_ref_steps)
        for group in opt.param_groups:
            group["lr"] = base_lr * scale

    def add_emas(self) -> None:
        """The evaluation EMAs (train.ema) and the post-hoc EMA profiles (train.phema) of self.net, checkpointed
        with the other networks."""
        self.emas = [frozen_copy(self.trained_module()) for _ in self.tcfg.ema]
        self.phemas = [frozen_copy(self.trained_module()) for _ in self.tcfg.phema]
        self.phema_gammas = [sigma_rel_to_gamma(s) for s in self.tcfg.phema]
        self.nets.update({f"ema{i}": e for i, e in enumerate(self.emas)})
        self.nets.update({f"phema{i}": e for i, e in enumerate(self.phemas)})

    def update_emas(self) -> None:
        """After an optimiser step: theta_ema <- rate theta_ema + (1 - rate) theta for each fixed rate, and each
        power-function profile with its rate beta_t = (1 - 1/t)^(gamma + 1) at this step t = 1, 2, ..."""
        for e, rate in zip(self.emas, self.tcfg.ema):
            ema_update(e, self.trained_module(), rate)
        for e, gamma in zip(self.phemas, self.phema_gammas):
            ema_update(e, self.trained_module(), power_beta(self.step + 1, gamma))

    def phema_snapshots(self) -> None:
        """Every train.phema_every steps (default train.steps / 16) and at the end: each profile's weights to
        RUN/phema, never pruned (rank 0)."""
        every = self.tcfg.phema_every or max(1, self.tcfg.steps // 16)
        if self.dist.main and self.phemas and (self.step % every == 0 or self.step == self.tcfg.steps):
            for e, s, g in zip(self.phemas, self.tcfg.phema, self.phema_gammas):
                write_snapshot(self.out / "phema", self.step, s, g, e.state_dict())

    def add_optimizer(self, name: str, opt: torch.optim.Optimizer) -> None:
        """Register an optimiser (checkpointed), with its fp16 gradient scaler when precision=fp16."""
        self.opts[name] = opt
        if self.tcfg.precision == "fp16":
            self.scalers[name] = torch.amp.GradScaler(self.device.type)

    def backward(self, loss: torch.Tensor, opt_name: str) -> None:
        sc = self.scalers.get(opt_name)
        (sc.scale(loss) if sc is not None else loss).backward()

    def apply(self, opt_name: str, params, loss: torch.Tensor) -> bool:
        """Step an optimiser if the loss and gradients are finite (unscaling and clipping as configured); else
        skip the step. Gradients are already averaged over ranks (DDP), so every rank takes the same decision."""
        opt, sc = self.opts[opt_name], self.scalers.get(opt_name)
        params = [p for p in params if p.grad is not None]
        if sc is not None:
            sc.unscale_(opt)
        finite = bool(torch.isfinite(loss).all()) and all(bool(torch.isfinite(p.grad).all()) for p in params)
        if finite:
            if self.tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip)
            sc.step(opt) if sc is not None else opt.step()
        if sc is not None:
            sc.update()
        opt.zero_grad(set_to_none=True)
        return finite

    def maybe_compile(self, module: nn.Module) -> None:
        """torch.compile a backbone in place when train.compile is set (parameter names stay the same)."""
        if self.tcfg.compile:
            module.compile()

    def check_split(self, key: str, batch: int) -> None:
        """UserError unless a global batch splits evenly over the processes and micro-batches."""
        if batch % (self.dist.world * self.tcfg.micro_batches):
            raise UserError(f"{key}={batch} must be divisible by the number of processes ({self.dist.world}) x "
                            f"train.micro_batches ({self.tcfg.micro_batches})")

    def parts(self, *tensors, local: int = 0):
        """Split batch tensors into this rank's micro-batches on the device: a list of tuples, one per micro-batch.
        The first `local` tensors are this rank's slice already; the others are global batches (drawn identically
        on every rank) and are sliced here. None passes through."""
        mb = self.tcfg.micro_batches
        mine = [t if i < local else dist.shard(t, self.dist) for i, t in enumerate(tensors)]
        chunks = [t.chunk(mb) if t is not None else [None] * mb for t in mine]
        return [tuple(c[i].to(self.device) if c[i] is not None else None for c in chunks) for i in range(mb)]

    def batch_plan(self) -> BatchPlan:
        """Which items each step trains on (a function of train.seed and the step)."""
        return BatchPlan(self.tcfg.batch_size, self.tcfg.seed, bool(getattr(self.cfg, "xflip", False)))

    def global_batch(self, size: int | None = None):
        """This rank's share of the iteration's batch (x [B / world, ...] model space on the device, labels | None)
        and the global size B (= size, or train.batch_size). A finite set's items come from the (seed, step) plan
        (data/loader.py), read ahead by train.workers processes and converted on the device; a generated set draws
        fresh samples from the shared generator."""
        size = size or self.tcfg.batch_size
        if self.data.sampler is not None:
            x, labels = self.data.sample_batch(size, self.gen)
            x, labels = dist.shard(x, self.dist).to(self.device), dist.shard(labels, self.dist)
        else:
            item = self.step_loader().get(self.step)
            x = self.data.normalizer.to_model_batch(item["raw"].to(self.device, non_blocking=True))
            if size != x.shape[0] * self.dist.world:
                raise ValueError(f"batch of {size} requested at step {self.step}; the plan has {x.shape[0]} per rank")
            if item["flip"] is not None and self.data.kind == "image":
                x = torch.where(item["flip"].to(self.device)[:, None, None, None], x.flip(-1), x)
            labels = item["labels"]
        labels = labels.to(self.device) if labels is not None and self.use_labels else None
        return x, labels, size

    def drop_labels(self, labels, b: int, p: float):
        """Label dropout (classifier-free guidance): each of the b global labels becomes the null label -1 with
        probability p (drawn for the global batch from the shared generator, this rank's slice applied); p = 0 draws
        nothing, so runs without it keep their numbers."""
        if p <= 0 or labels is None:
            return labels
        drop = dist.shard(torch.rand(b, generator=self.gen) < p, self.dist).to(labels.device)
        return torch.where(drop, torch.full_like(labels, -1), labels)

    def step_loader(self) -> StepLoader:
        """The reader of this rank's slices, (re)started at the current step when needed."""
        if self._loader is None or self._loader.next_step != self.step:
            self.close_loader()
            batches = StepBatches(self.data, self.batch_plan(), self.dist.rank, self.dist.world)
            self._loader = StepLoader(batches, self.step, self.tcfg.workers, pin=self.device.type == "cuda")
        return self._loader

    def close_loader(self) -> None:
        if self._loader is not None:
            self._loader.close()
            self._loader = None

    def reduce_stats(self, stats: dict) -> dict:
        """Mean of each statistic over ranks (one all-reduce); float values."""
        if not self.dist.active or not stats:
            return {k: float(v) for k, v in stats.items()}
        keys = sorted(stats)
        v = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_mean_(v, self.dist)
        return dict(zip(keys, v.tolist()))

    @property
    def use_labels(self) -> bool:
        return self.cfg.model.conditional and self.data.num_classes > 0

    def randn(self, shape) -> torch.Tensor:
        """Draw from the shared generator (CPU)."""
        return torch.randn(shape, generator=self.gen)

    # -- the loop ------------------------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.model_card().write(self.out)

    def _start(self, ckpt_dir: Path) -> None:
        """Resume from the newest intact checkpoint when asked; refuse to overwrite a run's checkpoints."""
        if self.resume:
            found = load_latest(ckpt_dir, strict=True)
            if found is None:
                log.warning("no checkpoint in %s: starting from scratch", ckpt_dir)
            else:
                self.load_state(found[0])
                if self.dist.main:
                    log.warning("resuming from %s (step %d)", found[1].name, self.step)
        elif any(ckpt_dir.glob("ckpt-*.safetensors")):
            raise UserError(f"'{self.out}' already holds checkpoints; pass --resume to continue, or pick a new --out")

    def _step(self) -> dict:
        """One training step; counts non-finite steps and stops after train.max_bad_steps in a row."""
        stats = self.train_step()
        if stats.pop("_ok", True):
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row += 1
            self.bad_total += 1
            if self.bad_in_a_row >= self.tcfg.max_bad_steps:
                raise UserError(f"training diverged: {self.bad_in_a_row} non-finite steps in a row at step "
                                f"{self.step}; the last good checkpoint is kept (try a lower train.lr)")
        self.step += 1
        self.phema_snapshots()
        return stats

    def fit(self, progress: bool = True) -> Path:
        """Train to cfg.train.steps (resuming if asked), checkpointing; returns the run folder."""
        ckpt_dir, main, steps = self.out / "checkpoints", self.dist.main, self.tcfg.steps
        self._start(ckpt_dir)
        self._prepare_dir()
        with contextlib.ExitStack() as stack:
            stack.enter_context(_stop_on_signals(self))
            stack.callback(self.close_loader)
            stats_log = stack.enter_context(contextlib.closing(StatsLog(self.out, self.step, main, self._open_stats)))
            self.stats_log = stats_log
            bar = stack.enter_context(contextlib.closing(
                progress_bar(total=steps, initial=self.step, desc=self.kind, enabled=progress and main)))
            while self.step < steps and not dist.any_rank(self._stop, self.dist, self.device):
                stats_log.add(self._step())
                if main and "loss" in stats_log.count:   # the mean loss of this log period so far, from step 1
                    bar.set_postfix(loss=f"{stats_log.running('loss'):.4g}", refresh=False)
                bar.update(1)
                if main and (self.step % self.tcfg.log_every == 0 or self.step == steps):
                    stats_log.write(self.step, self.bad_total)
                if main and (self.step % self.tcfg.ckpt_every == 0 or self.step == steps):
                    save_checkpoint(ckpt_dir, self.step, self.state())
            if self.step < steps:   # stopped by a signal (on some rank)
                if main:
                    save_checkpoint(ckpt_dir, self.step, self.state())
                dist.barrier(self.dist)
                raise UserError(f"interrupted at step {self.step}: checkpoint written; continue with --resume")
        dist.barrier(self.dist)   # every rank returns after rank 0's last checkpoint is on disk
        return self.out

    def request_stop(self, signum=None, frame=None) -> None:
        """Signal handler: finish the current step, checkpoint and stop."""
        self._stop = True


@contextlib.contextmanager
def _stop_on_signals(run: Run):
    """SIGINT / SIGTERM set run._stop (the loop then checkpoints and stops); the old handlers come back after."""
    old = {sig: signal.signal(sig, run.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class StatsLog:
    """Per-step statistics averaged over each log period (each over the steps that report it: the discriminator
    and the GAN terms are not in every step): one JSON line per period in stats.jsonl (rank 0), and TensorBoard
    scalars when the tensorboard package is installed. On resume, lines past the step are dropped and the sums of
    the period open at the checkpoint (`open_period`, saved in it) are restored."""

    def __init__(self, out: Path, step: int, main: bool, open_period: dict | None = None):
        self.path, self.main = out / "stats.jsonl", main
        self.acc: dict[str, float] = {k: float(v) for k, v in (open_period or {}).get("acc", {}).items()}
        self.count: dict[str, int] = {k: int(v) for k, v in (open_period or {}).get("count", {}).items()}
        self.t0 = time.time()
        if main:
            _truncate_stats(self.path, step)
        self.tb = _tensorboard(out / "tb") if main else None

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            self.acc[k] = self.acc.get(k, 0.0) + float(v)
            self.count[k] = self.count.get(k, 0) + 1

    def running(self, key: str) -> float:
        """The mean of `key` over the steps of this period so far (the value the period's line will hold)."""
        return self.acc[key] / self.count[key]

    def write(self, step: int, bad_total: int) -> dict:
        line = {"step": step, **{k: v / self.count[k] for k, v in self.acc.items()}, "bad_steps": bad_total,
                "time": time.time() - self.t0}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        for k, v in line.items() if self.tb else ():
            self.tb.add_scalar(k, v, step)
        self.acc, self.count = {}, {}
        return line

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def _tensorboard(path: Path):
    """A TensorBoard SummaryWriter when the tensorboard package is installed, else None (stats.jsonl always)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def _opt_state_fix(sd: dict) -> dict:
    """Optimiser state dicts come back from JSON with string keys where torch had ints."""
    state = {int(k): v for k, v in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _truncate_stats(path: Path, step: int) -> None:
    """Drop stats lines past `step` (after resuming from an earlier checkpoint)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:   # a line cut short by a crash (kill -9 mid-write)
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
