"""Diagnostics: how far a CTM's samples and jumps are from its teacher's accurate PF-ODE solution from the same
noise (coupled errors: deterministic, far less noisy than a distance between sample sets), and from the exact flow
map of a Gaussian mixture. With classifier-free guidance at scale w (eval/guide.py) the reference is the *guided*
PF-ODE: the teacher's accurate solve of D_w = D_null + w (D_c - D_null) with the same labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from ..core.sampling import gamma_sample, per_sample_normal, sample_schedule
from ..core.schedules import karras_between, karras_sigmas
from ..core.solvers import flow_map, solve_pf_ode
from ..progress import progress_bar
from .guide import guided_callables, guided_jump, resolve_scale
from .report import save_curves, save_heatmap


@torch.no_grad()
def flow_map_error(model, mixture, pairs: int = 1024, num_scales: int = 18, seed: int = 0) -> float:
    """Mean |G_theta(x_t, t, s) - G*(x_t, t, s)| over random pairs s < t of the Karras grid (the pairs CTM trains
    on), x_t on the true marginal at t, G* the exact flow map (fine Heun solve of the exact denoiser)."""
    g = torch.Generator().manual_seed(seed)
    grid = karras_sigmas(num_scales)
    i = torch.randint(0, num_scales - 1, (pairs,), generator=g)
    j = i + 1 + (torch.rand(pairs, generator=g, dtype=torch.float64) * (num_scales - 1 - i)).long()
    t, s = grid[i], grid[j]
    x_t = mixture.sample(pairs, g).double() + t[:, None] * torch.randn(pairs, mixture.dim, generator=g,
                                                                       dtype=torch.float64)
    exact = flow_map(mixture, x_t, t, s, steps=128)
    return float((model(x_t.float(), t.float(), s.float()).double() - exact).norm(dim=1).mean())


def _levels(hi: float, lo: float, steps: int) -> Tensor:
    """A Karras grid of `steps` steps from hi down to lo: Tensor[steps + 1] float64."""
    return karras_between(torch.tensor([hi]), torch.tensor([lo]), steps)[:, 0]


def _solve(teacher, x: Tensor, hi: float, lo: float, steps: int, labels: Tensor | None) -> Tensor:
    """The teacher's accurate PF-ODE solution from level hi to lo (float64 for a float64 teacher input)."""
    return x if hi == lo else solve_pf_ode(teacher, x, _levels(hi, lo, steps), "heun", labels)


def guided_pair(model, teacher, guidance: float | None = None, card=None) -> tuple:
    """(the CTM's jump, the teacher's denoiser, w) at guidance scale w = `guidance` (None: the CTM's own, 1 for an
    unguided one: then the model and the teacher themselves, unchanged); `card`: the CTM's, when `model` is None."""
    w = resolve_scale(model if model is not None else SimpleNamespace(card=card), guidance)
    jump = guided_jump(model, w) if model is not None else None
    return jump, guided_callables(teacher, w, False)[1], w


@dataclass
class Diagnosis:
    """Errors of a CTM in final-sample space against its teacher's accurate ODE solution from the same noise.

    coupled[(gamma, nfe)]: mean |x_NFE(z) - Phi(z)|; floor: the same for the teacher's own Heun solve on the
    `grid` Karras points; jump[i, j]: mean |Phi_{s_j -> sigma_min}(G(x_{t_i}, t_i, s_j)) - Phi(z)| for x_{t_i} on the
    teacher's trajectory from z (i < j; nan elsewhere): the error of one jump t -> s, charged in final-sample space;
    None when the map was not computed. `guidance`: the scale w of the guided CTM and teacher (None: unguided)."""

    levels: list[float]
    coupled: dict[tuple[float, int], float]
    floor: float
    jump: list[list[float]] | None
    n: int
    steps: int
    guidance: float | None = None

    def to_dict(self) -> dict:
        w = {} if self.guidance is None else {"guidance": self.guidance}
        return {"n": self.n, "accurate_steps": self.steps, "grid": self.levels, **w, "teacher_grid_floor": self.floor,
                "coupled": [{"gamma": g, "nfe": k, "error": v} for (g, k), v in self.coupled.items()],
                "jump_error": self.jump}


def _error(a: Tensor, b: Tensor) -> float:
    """Mean over samples of the Euclidean distance |a - b| (per-sample, flattened)."""
    return float((a.double() - b.double()).flatten(1).norm(dim=1).mean())


@torch.no_grad()
def diagnose(model, teacher, n: int = 256, nfes=(1, 2, 3, 4, 5, 6, 7, 8), gammas=(0.0, 1.0), grid: int = 18,
             steps: int = 256, seed: int = 0, labels: Tensor | None = None, exact: bool = False,
             progress: bool | None = False, jump_map: bool = True, guidance: float | None = None) -> Diagnosis:
    """Coupled errors per (gamma, NFE) and the (t, s) jump-error map of a CTM `model` against `teacher` (any
    denoiser), from n per-sample seeded noises. `steps`: Heun steps of the accurate solve sigma_max -> sigma_min
    (spread over the grid's intervals for the trajectory); `exact`: solve in float64 (an exact teacher);
    `jump_map=False` skips the (t, s) map (its cost grows with grid^2). `guidance`: both guided at that scale w
    (`guided_pair`; the labels are the condition; None: the CTM's own scale, the Diagnosis labelled only if not 1)."""
    card = model.card
    jump_fn, teacher, w = guided_pair(model, teacher, guidance)      # unguided: the model and teacher themselves
    smin, smax = card.sigma_min, card.sigma_max
    device = next(model.parameters()).device
    z = per_sample_normal(n, (max(nfes),) + card.shape, seed).to(device)    # [n, K, ...]: start + re-noising
    labels = None if labels is None else labels.to(device)
    dtype = torch.float64 if exact else torch.float32
    levels = karras_sigmas(grid, smin, smax)
    per = max(1, steps // (grid - 1))
    traj = [z[:, 0].to(dtype) * smax]                                         # x at every grid level
    for i in progress_bar(range(grid - 1), desc="teacher trajectories", enabled=progress, transient=True):
        traj.append(_solve(teacher, traj[-1], float(levels[i]), float(levels[i + 1]), per, labels))
    ref = traj[-1]
    coupled = {}
    for gamma in gammas:
        for k in nfes:
            x = gamma_sample(jump_fn, z[:, 0], sample_schedule(k, smin, smax), gamma, labels=labels,
                             step_noise=z[:, 1:k])
            coupled[(float(gamma), int(k))] = _error(x, ref)
    floor = _error(solve_pf_ode(teacher, z[:, 0].to(dtype) * smax, levels, "heun", labels), ref)
    jump = [[float("nan")] * grid for _ in range(grid)] if jump_map else None
    for i in progress_bar(range(grid - 1 if jump_map else 0), desc="jump errors", enabled=progress, transient=True):
        t = float(levels[i])
        for j in range(i + 1, grid):
            s = float(levels[j])
            y = jump_fn(traj[i].float(), torch.full((n,), t, device=device), torch.full((n,), s, device=device),
                        labels).to(dtype)
            jump[i][j] = _error(_solve(teacher, y, s, smin, per * (grid - 1 - j), labels), ref)
    return Diagnosis([float(v) for v in levels], coupled, floor, jump, n, per * (grid - 1),
                     w if guidance is not None or w != 1 else None)


def plot_diagnosis(d: Diagnosis, out_dir: Path, title: str = "", suffix: str = "") -> list[Path]:
    """coupled_error.png (error vs NFE per gamma on a log scale, the teacher-grid floor dashed) and, when computed,
    jump_error.png (the (t, s) map); `suffix` goes before .png (e.g. _w2 for one guidance scale of several)."""
    series: dict[str, tuple[list, list]] = {}
    for (gamma, k), v in d.coupled.items():
        xs, ys = series.setdefault(f"CTM gamma={gamma:g}", ([], []))
        xs.append(k)
        ys.append(v)
    paths = [Path(out_dir) / f"coupled_error{suffix}.png", Path(out_dir) / f"jump_error{suffix}.png"]
    save_curves(series, paths[0], "NFE", "mean |x_NFE(z) - teacher ODE(z)|", title or "coupled error",
                hline=(f"teacher Heun on {len(d.levels)} grid points", d.floor), logy=True)
    if d.jump is None:
        return paths[:1]
    save_heatmap(d.jump, [f"{v:.3g}" for v in d.levels], paths[1], "s (jump target)", "t (jump start)",
                 "jump error in final-sample space")
    return paths


@torch.no_grad()
def coupled_sweep(card, models, teacher, n: int = 256, nfes=(1, 2, 4), steps: int = 256, seed: int = 0,
                  labels: Tensor | None = None, exact: bool = False, guidance: float | None = None) -> dict:
    """{name: {nfe: coupled error at gamma 0}} for several weight choices of one CTM (e.g. post-hoc EMA widths):
    `models` yields (name, model) pairs, built one at a time if it is a generator; all are held against one accurate
    teacher solve from the same n noises (`diagnose`'s coupled error, its solve shared). `guidance`: the CTMs and
    the teacher guided at that scale (`guided_pair`; None: the CTM's own scale)."""
    _, teacher, w = guided_pair(None, teacher, guidance, card)
    z = per_sample_normal(n, (max(nfes),) + card.shape, seed)
    ref = _solve(teacher, z[:, 0].to(torch.float64 if exact else torch.float32) * card.sigma_max, card.sigma_max,
                 card.sigma_min, steps, labels)
    return {name: {k: _error(gamma_sample(guided_jump(model, w), z[:, 0],
                                          sample_schedule(k, card.sigma_min, card.sigma_max), 0.0, labels=labels,
                                          step_noise=z[:, 1:k]), ref) for k in nfes}
            for name, model in models}
