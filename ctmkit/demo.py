"""`ctmkit demo`: the whole method end to end on an embedded data set, with a report a person can read.

Trains an EDM teacher, distills a CTM from it, samples the CTM at NFE 1, 2, 4, 8 with gamma 0 and 1 and the
teacher with Heun at several NFE, evaluates everything on the same metric, and writes report.md with plots."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch

from .config import DistillConfig, TeacherConfig, load_config, resolve_key
from .core.schedules import SIGMA_MIN, karras_sigmas
from .core.solvers import solve_pf_ode
from .data import load_data
from .errors import UserError
from .eval.diagnostics import diagnose, plot_diagnosis
from .eval.generate import generate
from .eval.quality import balanced_labels, make_quality
from .eval.report import pyplot, save_fig, save_image_grid, save_loss_curves, save_scatter
from .eval.sweep import CTM_NFES, heun_nfes, plot_result, sweep
from .io.atomic import atomic_write_text
from .io.runs import load_model
from .train.ctm import CTMRun
from .train.teacher import TeacherRun

IMAGE_HEUN_NFES = tuple(heun_nfes()[1:])   # 3, 5, 9, 17, 35: Heun at 1 NFE is pure noise for images


def run_demo(out: Path, preset: str = "toy", data: str | None = None, overrides: tuple[str, ...] = (),
             progress: bool = True, echo=print, eval_samples: int = 2000) -> dict:
    """Run the demo into `out`; returns the summary dict also written to summary.json."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"demo output folder '{out}' is not empty; pick a new --out")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_over, d_over = _split_overrides(overrides)
    tcfg = load_config(TeacherConfig, preset, None, t_over, data=data)
    dcfg = load_config(DistillConfig, preset, None, d_over, data=data or tcfg.data,
                       teacher=str(out / "teacher"))
    dataset = load_data(tcfg.data, n=tcfg.n_data or None, seed=tcfg.train.seed)
    times = {}

    echo(f"[1/3] training the EDM teacher on '{tcfg.data}' ({tcfg.train.steps} steps)")
    t0 = time.time()
    TeacherRun(tcfg, out / "teacher", dataset).fit(progress)
    times["teacher_s"] = time.time() - t0

    echo(f"[2/3] distilling the CTM ({dcfg.train.steps} steps)")
    t0 = time.time()
    CTMRun(dcfg, out / "ctm", dataset).fit(progress)
    times["distill_s"] = time.time() - t0

    echo("[3/3] sampling and evaluating")
    t0 = time.time()
    teacher, ctm = load_model(out / "teacher"), load_model(out / "ctm")
    summary = evaluate_demo(out, dataset, teacher, ctm, eval_samples)
    times["eval_s"] = time.time() - t0
    echo("      where the error is: CTM against the teacher's ODE from the same noise")
    t0 = time.time()
    summary["diagnosis"] = diagnose_demo(out, dataset, teacher, ctm, progress)
    times["diagnose_s"] = time.time() - t0
    summary["times"] = {k: round(v, 1) for k, v in times.items()}
    summary["eval_samples"] = eval_samples
    save_loss_curves(out / "teacher" / "stats.jsonl", out / "loss_teacher.png")
    save_loss_curves(out / "ctm" / "stats.jsonl", out / "loss_ctm.png")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", _report(summary, tcfg, dcfg))
    echo(_table(summary))
    echo(f"report: {out / 'report.md'}")
    return summary


def _split_overrides(overrides) -> tuple[list[str], list[str]]:
    """key=value overrides go to each stage whose config has the key (train.steps=... goes to both)."""
    t_over, d_over = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        hits = []
        for cls, dest in ((TeacherConfig, t_over), (DistillConfig, d_over)):
            try:
                resolve_key(cls, key)
            except UserError:
                continue
            dest.append(item)
            hits.append(cls)
        if not hits:
            resolve_key(DistillConfig, key)  # raises the error that lists the valid keys
    return t_over, d_over


def evaluate_demo(out: Path, data, teacher, ctm, n: int) -> dict:
    """The CTM at each NFE (gamma 0 and 1) and the teacher's Heun budgets (the same sweep as `ctmkit eval`) by the
    sliced W1 ratio (vectors) or the classifier-feature Frechet distance (images), the metric's floor, the
    quality-vs-NFE plot and the sample pictures."""
    quality = make_quality("auto" if data.kind == "vector" else "classifier", data, n)
    heun = heun_nfes() if data.kind == "vector" else IMAGE_HEUN_NFES
    points = [("gamma", k, g) for g in (0.0, 1.0) for k in CTM_NFES] + [("heun", k, 0.0) for k in heun]
    on_samples = None
    if data.kind == "image":
        real = data.fresh(min(n, len(data), 100), torch.Generator().manual_seed(0))
        on_samples = functools.partial(_image_grids, out)
    result = sweep(ctm, data, points, quality, teacher=teacher, on_samples=on_samples)
    floor = quality.floor()
    plot_result(result, out / "quality_vs_nfe.png", f"{data.spec}: quality vs NFE", hline=floor)
    summary = result.to_dict()
    if data.kind == "vector":
        _vector_plots(out, data, teacher, ctm, n)
    else:
        save_image_grid(real[:100], out / "samples_data.png", nrow=10)
        summary["data_vs_data"] = floor[1]
    return summary


def diagnose_demo(out: Path, data, teacher, ctm, progress: bool) -> dict:
    """`ctmkit diagnose` on the demo's CTM and teacher (smaller for images): diagnose.json and its two pictures."""
    small = {} if data.kind == "vector" else {"n": 64, "grid": 10, "steps": 64}
    d = diagnose(ctm, teacher, labels=balanced_labels(ctm, small.get("n", 256)), progress=progress, **small)
    atomic_write_text(out / "diagnose.json", json.dumps(d.to_dict(), indent=1))
    plot_diagnosis(d, out, f"{data.spec}: CTM vs teacher ODE, same noise")
    return {"coupled_gamma0": {k: v for (g, k), v in d.coupled.items() if g == 0.0},
            "coupled_gamma1": {k: v for (g, k), v in d.coupled.items() if g == 1.0},
            "teacher_grid_floor": d.floor, "grid_points": len(d.levels)}


def _image_grids(out: Path, row, x) -> None:
    """Sample grids of the CTM at gamma 0 (every NFE) and of the teacher's Heun 35."""
    if row.sampler == "gamma" and row.gamma == 0.0:
        save_image_grid(x[:100], out / f"samples_ctm_nfe{row.nfe}.png", nrow=10)
    elif row.sampler == "heun" and row.nfe == 35:
        save_image_grid(x[:100], out / "samples_teacher_heun35.png", nrow=10)


@torch.no_grad()
def _vector_plots(out: Path, data, teacher, ctm, n: int) -> None:
    true = data.fresh(n, torch.Generator().manual_seed(0)).numpy()
    panels = [("data", true), ("teacher Heun 35", generate(teacher, n, 35, 0.0, 1, None, progress=False).numpy())]
    panels += [(f"CTM NFE {k}, gamma 0", generate(ctm, n, k, 0.0, 1, None, progress=False).numpy()) for k in CTM_NFES]
    panels += [("CTM NFE 4, gamma 1", generate(ctm, n, 4, 1.0, 1, None, progress=False).numpy())]
    save_scatter(panels, out / "samples.png")
    _trajectory_plot(out / "trajectories.png", true, teacher, ctm)


@torch.no_grad()
def _trajectory_plot(path: Path, true, teacher, ctm, t_start: float = 3.0, n_paths: int = 12) -> None:
    """Teacher PF-ODE trajectories (lines) from t_start down to sigma_min, and CTM anytime-to-anytime jumps:
    G(x_T, T, s) for s along the way (dots), and jumps from mid-way points (crosses). Jumps on the lines = faithful."""
    plt = pyplot()
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(n_paths, 2, generator=g) * t_start
    sig = karras_sigmas(81, SIGMA_MIN, t_start)
    path_pts = [x_T]
    for i in range(80):
        path_pts.append(solve_pf_ode(teacher, path_pts[-1], sig[i:i + 2], "heun"))
    traj = torch.stack(path_pts)                                          # [81, n, 2]
    s_marks = sig[::10]                                                   # 9 levels
    jumps = torch.stack([ctm(x_T, torch.full((n_paths,), t_start), torch.full((n_paths,), float(s)))
                         for s in s_marks[1:]])
    mid = traj[40]                                                        # teacher's point at t = sig[40]
    t_mid = float(sig[40])
    jumps_mid = torch.stack([ctm(mid, torch.full((n_paths,), t_mid), torch.full((n_paths,), float(s)))
                             for s in s_marks[5:]])
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(true[:, 0], true[:, 1], s=1, c="lightgray", label="data")
    for i in range(n_paths):
        ax.plot(traj[:, i, 0], traj[:, i, 1], c="tab:blue", lw=0.8, label="teacher ODE" if i == 0 else None)
    ax.scatter(jumps[..., 0].flatten(), jumps[..., 1].flatten(), s=10, c="tab:red",
               label=f"CTM G(x_T, T={t_start:g}, s)")
    ax.scatter(jumps_mid[..., 0].flatten(), jumps_mid[..., 1].flatten(), s=18, marker="x", c="tab:green",
               label=f"CTM G(x_t, t={t_mid:.2g}, s)")
    ax.set_aspect("equal"), ax.legend(fontsize=7, loc="upper right")
    ax.set_title("anytime-to-anytime jumps on the teacher's trajectories", fontsize=9)
    save_fig(fig, path)


def _table(summary: dict) -> str:
    metric = summary["metric"]
    lines = [f"{'model':8} {'sampler':8} {'NFE':>4} {'gamma':>6} {metric:>12}"]
    for r in summary["rows"]:
        lines.append(f"{r['model']:8} {r['sampler']:8} {r['nfe']:>4} {r['gamma']:>6.1f} {r['value']:>12.3f}")
    return "\n".join(lines)


def _report(summary: dict, tcfg, dcfg) -> str:
    metric = summary["metric"]
    what = summary.get("metric_doc", metric)
    if metric == "swd_ratio":
        what = ("sliced W1 distance to fresh data divided by the true-vs-true floor (1.0 = as close as two true "
                f"samples; mean of 4 sampling seeds x {summary['eval_samples']} samples, floor from 5 pairs of true "
                "draws)")
    md = [f"# ctmkit demo: {summary['data']}", "",
          f"Teacher: EDM, {tcfg.train.steps} steps. CTM: {dcfg.train.steps} steps (CTM + DSM"
          f"{' + GAN from step ' + str(dcfg.ctm.gan_start) if dcfg.ctm.gan else ''}), initialised from the teacher.",
          "", f"Metric: {what}. Lower is better.", "",
          f"**CTM NFE 1 (gamma 0) / teacher Heun 35 NFE: {summary['ctm_nfe1_vs_teacher_heun35']:.2f}**", "",
          "| model | sampler | NFE | gamma | value |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        md.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['gamma']:.1f} | {r['value']:.3f} |")
    if metric != "swd_ratio":
        md += ["", f"Feature classifier accuracy on the data: {summary['classifier_accuracy']:.3f}; "
               f"Frechet distance between two halves of the data: {summary['data_vs_data']:.3f}.", "",
               "Samples (CTM gamma 0, NFE 1): ![nfe1](samples_ctm_nfe1.png) NFE 2: ![nfe2](samples_ctm_nfe2.png)",
               "", "Teacher Heun 35: ![heun](samples_teacher_heun35.png) Data: ![data](samples_data.png)"]
    md += ["", f"Time: teacher {summary['times']['teacher_s']:.0f} s, CTM {summary['times']['distill_s']:.0f} s, "
           f"evaluation {summary['times']['eval_s']:.0f} s.", "",
           "![quality vs NFE](quality_vs_nfe.png)", ""]
    if metric == "swd_ratio":
        md += ["![samples](samples.png)", "", "![trajectories](trajectories.png)", ""]
    md += _diagnosis_md(summary["diagnosis"])
    md += ["![teacher loss](loss_teacher.png) ![CTM loss](loss_ctm.png)", ""]
    return "\n".join(md)


def _diagnosis_md(d: dict) -> list[str]:
    nfes = list(d["coupled_gamma0"])
    return ["## Where the error is", "",
            "Coupled error: mean |x_NFE(z) - Phi(z)| in model space, the CTM's sample against the teacher's accurate "
            "ODE solution Phi from the same noise z (`ctmkit diagnose`). Floor: the teacher's own Heun solve on "
            f"{d['grid_points']} grid points, {d['teacher_grid_floor']:.4f}.", "",
            "| gamma | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---" * (len(nfes) + 1) + "|",
            "| 0 | " + " | ".join(f"{d['coupled_gamma0'][k]:.4f}" for k in nfes) + " |",
            "| 1 | " + " | ".join(f"{d['coupled_gamma1'][k]:.4f}" for k in nfes) + " |", "",
            "![coupled error](coupled_error.png) ![jump error](jump_error.png)", "",
            "The map: one CTM jump G(x_t, t, s) from the teacher's trajectory, carried on to sigma_min by the "
            "teacher's accurate solve, against Phi(z): which jumps the student has not learned.", ""]
