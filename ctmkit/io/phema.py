"""Post-hoc EMA snapshots of a run (RUN/phema/): written during training, never pruned, and mixed into the EMA of
any width afterwards (the coefficients: ctmkit/core/phema.py; the method: docs/method.md section 3).

Each snapshot is one safetensors file of a profile's weights, its step, sigma_rel and gamma in the file's metadata:
phema/snap-<sigma_rel>-<step>.safetensors. A rebuilt EMA is written beside them as
phema/ema-<sigma_rel>-<step>.safetensors."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ..core.phema import phema_coefficients, sigma_rel_to_gamma
from ..errors import UserError
from .atomic import atomic_write_bytes
from .card import ModelCard


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rel: float
    gamma: float


def write_snapshot(folder: Path, step: int, sigma_rel: float, gamma: float, weights: dict) -> Path:
    """Write one profile's weights at `step` (atomically: a crash leaves the previous files intact)."""
    path = Path(folder) / f"snap-{sigma_rel:.4f}-{step:08d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"step": str(step), "sigma_rel": repr(float(sigma_rel)), "gamma": repr(float(gamma))}
    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in weights.items()}, metadata=meta))
    return path


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """The run's snapshots in (step, sigma_rel) order; unreadable files are refused, not skipped."""
    out = []
    for path in sorted((Path(run_dir) / "phema").glob("snap-*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            out.append(Snapshot(path, int(meta["step"]), float(meta["sigma_rel"]), float(meta["gamma"])))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise UserError(f"post-hoc EMA snapshot '{path}' is unreadable ({type(e).__name__}); delete it to use "
                            "the others") from None
    return sorted(out, key=lambda s: (s.step, s.sigma_rel))


def rebuild(run_dir: Path, sigma_rel: float, step: int | None = None) -> tuple[dict, int]:
    """(weights, step): the power-function EMA of width `sigma_rel` at `step` (default: the last snapshot's), mixed
    from the snapshots taken up to that step; accumulated in float64, returned in each tensor's own dtype."""
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise UserError(f"'{run_dir}' has no post-hoc EMA snapshots (phema/); train with train.phema=[0.05,0.1] "
                        "(the default) to record them")
    try:
        gamma = sigma_rel_to_gamma(sigma_rel)
    except ValueError as e:
        raise UserError(f"--sigma-rel: {e}") from None
    step = snaps[-1].step if step is None else int(step)
    used = [s for s in snaps if s.step <= step]
    if not used or step > snaps[-1].step:
        raise UserError(f"--step {step} is outside the snapshots' steps {snaps[0].step}..{snaps[-1].step}")
    x = phema_coefficients([s.step for s in used], [s.gamma for s in used], step, gamma)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for coef, snap in zip(x, used):                    # one snapshot in memory at a time
        for k, v in load_file(str(snap.path)).items():
            dtypes[k] = v.dtype
            total[k] = total.get(k, 0) + float(coef) * v.double() if v.is_floating_point() else v
    return {k: v.to(dtypes[k]) for k, v in total.items()}, step


def write_rebuilt(run_dir: Path, sigma_rel: float, step: int, weights: dict) -> Path:
    """Save a rebuilt EMA as phema/ema-<sigma_rel>-<step>.safetensors; returns its path relative to the run."""
    rel = Path("phema") / f"ema-{sigma_rel:.4f}-{step:08d}.safetensors"
    meta = {"step": str(step), "sigma_rel": repr(float(sigma_rel))}
    atomic_write_bytes(Path(run_dir) / rel, save({k: v.contiguous() for k, v in weights.items()}, metadata=meta))
    return rel


def sample_width(run_dir: Path, sigma_rel: float, step: int | None = None) -> tuple[Path, int]:
    """Rebuild the EMA of width `sigma_rel` at `step` (default: the last snapshot's), save it and make it the weights
    the run samples (model.json's `sampled`); returns (its path relative to the run, the step)."""
    weights, step = rebuild(run_dir, sigma_rel, step)
    rel = write_rebuilt(run_dir, sigma_rel, step, weights)
    sampled = {"phema": {"sigma_rel": sigma_rel, "step": step}, "file": str(rel)}
    replace(ModelCard.read(Path(run_dir)), sampled=sampled).write(run_dir)
    return rel, step
