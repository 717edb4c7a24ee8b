"""`ctmkit demo`: the whole method end to end on an embedded data set, with a report a person can read.

Five stages: trains an EDM teacher, distills a CTM from it, samples the CTM at NFE 1, 2, 4, 8 with gamma 0 and 1 and
the teacher with Heun at several NFE and evaluates everything on the same metric, diagnoses where the CTM leaves the
teacher's ODE, and writes report.md with plots. OUT/demo.json records the settings when the demo starts and each
stage's results as it finishes, so `--resume` skips the finished stages and continues a training stage from its
newest checkpoint."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import DistillConfig, TeacherConfig, load_config, resolve_key, to_dict
from .core.schedules import SIGMA_MIN, karras_sigmas
from .core.solvers import solve_pf_ode
from .data import Dataset, load_data
from .errors import UserError
from .eval.diagnostics import diagnose, plot_diagnosis
from .eval.editing import edit_examples
from .eval.generate import generate
from .eval.quality import balanced_labels, make_quality
from .eval.report import pyplot, read_stats, save_fig, save_image_grid, save_loss_curves, save_scatter
from .eval.sweep import CTM_NFES, heun_nfes, plot_result, sweep
from .eval.verdicts import (
    coupled_verdict,
    headline,
    loss_change,
    loss_note,
    quality_verdict,
    time_line,
    what_ran,
)
from .io.atomic import atomic_write_text
from .io.card import ModelCard
from .io.runs import load_model
from .train.ctm import CTMRun
from .train.teacher import TeacherRun

IMAGE_HEUN_NFES = tuple(heun_nfes()[1:])   # 3, 5, 9, 17, 35: Heun at 1 NFE is pure noise for images
RECORD = "demo.json"                       # the demo's settings and finished stages, in OUT
STAGES = ("teacher", "distill", "eval", "diagnose", "report")
QUALITY = "quality against the data"
WHERE = "where the error is: the CTM against the teacher's ODE from the same noise"
TITLES = {"teacher": "training the EDM teacher", "distill": "distilling the CTM",
          "eval": f"{QUALITY}: sampling and evaluating", "diagnose": WHERE, "report": "writing the report"}
DEFAULT_EVAL_SAMPLES = 2000


def run_demo(out: Path, preset: str = "toy", data: str | None = None, overrides: tuple[str, ...] = (),
             progress: bool = True, echo=print, eval_samples: int = DEFAULT_EVAL_SAMPLES,
             resume: bool = False) -> dict:
    """Run the demo into `out` (or, with `resume`, continue the interrupted one there); returns the summary dict
    also written to summary.json."""
    out = Path(out)
    t_over, d_over = _split_overrides(overrides)
    tcfg = load_config(TeacherConfig, preset, None, t_over, data=data)
    dcfg = load_config(DistillConfig, preset, None, d_over, data=data or tcfg.data,
                       teacher=str(out / "teacher"))
    settings = demo_settings(preset, tcfg, dcfg, overrides, eval_samples)
    record = open_record(out, settings, resume)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with _interrupts_as_keyboard() as interrupted:
        dataset = load_data(tcfg.data, n=tcfg.n_data or None, seed=tcfg.train.seed)
        demo = Demo(out, tcfg, dcfg, dataset, record, progress, echo)
        for i, name in enumerate(STAGES, 1):
            if interrupted:   # a signal whose KeyboardInterrupt was swallowed (raised inside a finaliser)
                raise KeyboardInterrupt
            demo.stage(i, name)
    echo(f"report: {out / 'report.md'}")
    return json.loads((out / "summary.json").read_text())


def demo_settings(preset: str, tcfg: TeacherConfig, dcfg: DistillConfig, overrides, eval_samples: int) -> dict:
    """What determines the demo's numbers (recorded in demo.json when it starts; a resume must match): the resolved
    configs of both stages and the evaluation size. The overrides are kept for the reader (the configs hold their
    effect); the distillation's teacher is always OUT/teacher."""
    distill = {k: v for k, v in to_dict(dcfg).items() if k != "teacher"}
    return json.loads(json.dumps({"preset": preset, "data": tcfg.data, "eval_samples": eval_samples,
                                  "teacher": to_dict(tcfg), "distill": distill, "overrides": list(overrides)}))


def settings_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key new (was old)' for each setting that differs, nested keys dotted; the overrides are not compared."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key == "overrides":
            continue
        a, b = old.get(key, "absent"), new.get(key, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key} {b} (was {a})")
    return diffs


def open_record(out: Path, settings: dict, resume: bool) -> dict:
    """A new demo's record in an empty OUT, or (resume) the interrupted demo's, whose settings must match."""
    path = out / RECORD
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"demo output folder '{out}' is not empty; continue an interrupted demo there with "
                            "--resume, or pick a new --out")
        out.mkdir(parents=True, exist_ok=True)
        record = {"settings": settings, "done": {}, "times": {}, "sessions": 1}
    else:
        if not path.is_file():
            raise UserError(f"'{out}' holds no demo to resume (no {RECORD}); start one without --resume")
        try:
            record = json.loads(path.read_text())
            old, _, _ = record["settings"], record["done"], record["times"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"'{path}' is not a demo record ctmkit can read ({e}); start a new demo in another "
                            "--out") from None
        diffs = settings_diff(old, settings)
        if diffs:
            more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            raise UserError(f"--resume: the settings differ from those the demo in '{out}' started with: "
                            f"{'; '.join(diffs[:3])}{more}; resume with the same settings, or pick a new --out")
        record["sessions"] = record.get("sessions", 1) + 1
    atomic_write_text(path, json.dumps(record, indent=1))
    return record


@contextlib.contextmanager
def _interrupts_as_keyboard():
    """SIGINT and SIGTERM raise KeyboardInterrupt outside the training loops (which checkpoint on both and restore
    these handlers after); the stage that was running says how to go on, or else this one line does. Yields a list
    that holds the signals received, so that one whose exception Python swallowed still stops before the next
    stage."""
    main = threading.current_thread() is threading.main_thread()
    received: list[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield received
    except KeyboardInterrupt:
        raise UserError("interrupted between the demo's stages: the finished stages are kept; continue with "
                        "--resume") from None
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@dataclass
class Demo:
    """One demo in its folder: the resolved configs, the data, and the record of finished stages (demo.json)."""

    out: Path
    tcfg: TeacherConfig
    dcfg: DistillConfig
    data: Dataset
    record: dict
    progress: bool
    echo: Callable

    def stage(self, i: int, name: str) -> None:
        """Run stage `name` unless the record holds it finished; record its result and time (its time also when
        it is interrupted). An interrupt outside a training loop becomes one line that says how to go on."""
        done, times = self.record["done"], self.record["times"]
        head = f"[{i}/{len(STAGES)}] {TITLES[name]}"
        if name in done:
            self.echo(f"{head} (finished before: skipped)")
        else:
            self.echo(head + self.detail(name))
            t0 = time.time()
            try:
                result = STAGE_RUNS[name](self)
            except KeyboardInterrupt:
                raise UserError(f"interrupted in the demo's {name} stage: the finished stages are kept; continue with "
                                "--resume") from None
            finally:
                times[name] = times.get(name, 0.0) + time.time() - t0
                atomic_write_text(self.out / RECORD, json.dumps(self.record, indent=1))
            done[name] = json.loads(json.dumps(result))
            atomic_write_text(self.out / RECORD, json.dumps(self.record, indent=1))
        shown = stage_table(name, done[name])
        if shown:
            self.echo(shown)

    def detail(self, name: str) -> str:
        if name == "teacher":
            return f" on '{self.tcfg.data}' ({self.tcfg.train.steps} steps)"
        if name == "distill":
            return f" ({self.dcfg.train.steps} steps)"
        return ""

    def models(self):
        """The trained teacher and CTM as they sample (the teacher's first evaluation EMA; the CTM's post-hoc EMA of
        width ctm.sample_sigma_rel)."""
        return load_model(self.out / "teacher"), load_model(self.out / "ctm")

    @property
    def eval_samples(self) -> int:
        return self.record["settings"]["eval_samples"]


def _has_checkpoints(run: Path) -> bool:
    return any((run / "checkpoints").glob("ckpt-*.safetensors"))


def stage_teacher(demo: Demo) -> dict:
    """Train the EDM teacher (continuing from its newest checkpoint after an interruption)."""
    run = demo.out / "teacher"
    TeacherRun(demo.tcfg, run, demo.data, resume=_has_checkpoints(run)).fit(demo.progress)
    return {"steps": demo.tcfg.train.steps}


def stage_distill(demo: Demo) -> dict:
    """Distill the CTM from OUT/teacher (continuing from its newest checkpoint after an interruption)."""
    run = demo.out / "ctm"
    CTMRun(demo.dcfg, run, demo.data, resume=_has_checkpoints(run)).fit(demo.progress)
    return {"steps": demo.dcfg.train.steps}


def stage_eval(demo: Demo) -> dict:
    return evaluate_demo(demo.out, demo.data, *demo.models(), demo.eval_samples)


def stage_diagnose(demo: Demo) -> dict:
    size = diagnose_size(demo.data.kind, demo.eval_samples, demo.dcfg.ctm.num_scales)
    return diagnose_demo(demo.out, demo.data, *demo.models(), demo.progress, size)


def stage_report(demo: Demo) -> dict:
    """summary.json, report.md and the loss curves, from the record of the finished stages."""
    summary = demo_summary(demo.record, read_stats(demo.out / "ctm" / "stats.jsonl"),
                           ModelCard.read(demo.out / "ctm").sampled)
    ran, out = summary["ran"], demo.out
    gan_marks = (((ran["gan_start"], "GAN term starts (ctm.gan_start)"),)
                 if ran["gan"] and 0 < ran["gan_start"] < ran["distill_steps"] else ())
    save_loss_curves(out / "teacher" / "stats.jsonl", out / "loss_teacher.png")
    save_loss_curves(out / "ctm" / "stats.jsonl", out / "loss_ctm.png", marks=gan_marks)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", report_md(summary))
    return {}


STAGE_RUNS = {"teacher": stage_teacher, "distill": stage_distill, "eval": stage_eval, "diagnose": stage_diagnose,
              "report": stage_report}


def demo_summary(record: dict, ctm_stats: list[dict], sampled: dict | None = None) -> dict:
    """The summary (summary.json) from the record of the finished stages: the evaluation's rows, the diagnosis,
    what ran, the CTM's loss either side of the GAN's start, and the times (the only lines that differ between
    runs with the same settings). `sampled`: the CTM's model card entry for the weights it samples (None: the
    training EMA), the one record of that choice."""
    st, done = record["settings"], record["done"]
    d = st["distill"]
    ran = {"preset": st["preset"], "data": st["data"], "overrides": st["overrides"],
           "teacher_steps": st["teacher"]["train"]["steps"], "distill_steps": d["train"]["steps"],
           "seed": d["train"]["seed"], "dsm": d["ctm"]["dsm"], "gan": d["ctm"]["gan"],
           "gan_start": d["ctm"]["gan_start"], "init_from_teacher": d["ctm"]["init_from_teacher"],
           "ema": d["train"]["ema"][0], "phema": d["train"]["phema"], "lr": d["train"]["lr"],
           "lr_schedule": d["train"]["lr_schedule"], "pairs": d["ctm"]["pairs"],
           "sample_sigma_rel": sampled["phema"]["sigma_rel"] if sampled else 0.0}
    started = ran["gan"] and 0 < ran["gan_start"] < ran["distill_steps"]
    times = {f"{k}_s": round(record["times"][k], 1) for k in STAGES[:4] if k in record["times"]}
    return {**done["eval"], "diagnosis": done["diagnose"], "ran": ran, "eval_samples": st["eval_samples"],
            "distill_loss": loss_change(ctm_stats, ran["gan_start"]) if started else None,
            "times": {**times, "sessions": record.get("sessions", 1)}}


def diagnose_size(kind: str, eval_samples: int, num_scales: int) -> dict:
    """The diagnosis's size: 256 noises (images 64) at the default --eval-samples 2000, proportionally fewer (at
    least 16) with fewer; its grid is the CTM's training grid, ctm.num_scales (images: at most 10 points)."""
    full, grid, steps = (256, num_scales, 256) if kind == "vector" else (64, min(10, num_scales), 64)
    return {"n": max(16, min(full, round(full * eval_samples / DEFAULT_EVAL_SAMPLES))), "grid": grid, "steps": steps}


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
        summary["editing"] = edit_examples(ctm, data, out, getattr(quality, "net", None))  # the classifier
    return summary


def diagnose_demo(out: Path, data, teacher, ctm, progress: bool, size: dict) -> dict:
    """`ctmkit diagnose` on the demo's CTM and teacher at `size` (diagnose_size): diagnose.json and its pictures."""
    d = diagnose(ctm, teacher, labels=balanced_labels(ctm, size["n"]), progress=progress, **size)
    atomic_write_text(out / "diagnose.json", json.dumps(d.to_dict(), indent=1))
    plot_diagnosis(d, out, f"{data.spec}: CTM vs teacher ODE, same noise")
    return {"coupled_gamma0": {k: v for (g, k), v in d.coupled.items() if g == 0.0},
            "coupled_gamma1": {k: v for (g, k), v in d.coupled.items() if g == 1.0},
            "teacher_grid_floor": d.floor, "grid_points": len(d.levels), "noises": d.n, "accurate_steps": d.steps}


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
    G(x_T, T, s) for s along the way (dots), and jumps from mid-way points (crosses). Jumps on the lines = faithful.
    Two panels: the whole paths, and a close-up on the data where they end."""
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    for ax in axes:
        ax.scatter(true[:, 0], true[:, 1], s=1, c="lightgray", label="data")
        for i in range(n_paths):
            ax.plot(traj[:, i, 0], traj[:, i, 1], c="tab:blue", lw=0.8, label="teacher ODE" if i == 0 else None)
        ax.scatter(jumps[..., 0].flatten(), jumps[..., 1].flatten(), s=10, c="tab:red",
                   label=f"CTM G(x_T, T={t_start:g}, s)")
        ax.scatter(jumps_mid[..., 0].flatten(), jumps_mid[..., 1].flatten(), s=18, marker="x", c="tab:green",
                   label=f"CTM G(x_t, t={t_mid:.2g}, s)")
        ax.set_aspect("equal")
    lo, hi = true.min(0), true.max(0)
    pad = 0.15 * float((hi - lo).max())
    axes[1].set_xlim(lo[0] - pad, hi[0] + pad), axes[1].set_ylim(lo[1] - pad, hi[1] + pad)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[0].set_title("anytime-to-anytime jumps on the teacher's trajectories", fontsize=9)
    axes[1].set_title("close-up on the data: where the paths end", fontsize=9)
    save_fig(fig, path)


def _table(summary: dict) -> str:
    """The quality table for the console."""
    metric = summary["metric"]
    lines = [f"{'model':8} {'sampler':8} {'NFE':>4} {'gamma':>6} {metric:>12}"]
    for r in summary["rows"]:
        lines.append(f"{r['model']:8} {r['sampler']:8} {r['nfe']:>4} {r['gamma']:>6.1f} {r['value']:>12.3f}")
    return "\n".join(lines)


def _coupled_table(d: dict) -> str:
    """The coupled-error table for the console."""
    nfes = list(d["coupled_gamma0"])
    lines = [f"{'gamma':>5} " + " ".join(f"{'NFE ' + str(k):>8}" for k in nfes)]
    for g in (0, 1):
        lines.append(f"{g:>5} " + " ".join(f"{d[f'coupled_gamma{g}'][k]:>8.4f}" for k in nfes))
    return "\n".join(lines + [f"teacher-grid floor {d['teacher_grid_floor']:.4f}"])


def stage_table(name: str, result: dict) -> str:
    """What the console shows after a stage (or for a stage finished before a resume): its table."""
    if name == "eval":
        return _table(result)
    if name == "diagnose":
        return _coupled_table(result)
    return ""


def report_md(summary: dict) -> str:
    """report.md: what ran, then one section per table, each with its verdict, then training and times."""
    ran = summary["ran"]
    overrides = " ".join(ran["overrides"]) or "none"
    md = [f"# ctmkit demo: {summary['data']}", "", what_ran(summary), "",
          f"Settings: preset {ran['preset']}, data {ran['data']}, seed {ran['seed']}, overrides: {overrides}; "
          f"{summary['eval_samples']} samples per evaluated point; the diagnosis from "
          f"{summary['diagnosis']['noises']} noises.", ""]
    md += _quality_md(summary)
    md += _editing_md(summary.get("editing"))
    md += _diagnosis_md(summary)
    note = loss_note(summary)
    md += ["## Training", ""] + ([note, ""] if note else [])
    md += ["![teacher loss](loss_teacher.png) ![CTM loss](loss_ctm.png)", "", time_line(summary), ""]
    return "\n".join(md)


def _quality_md(summary: dict) -> list[str]:
    metric = summary["metric"]
    what = summary.get("metric_doc", metric)
    if metric == "swd_ratio":
        what = ("sliced W1 distance to fresh data divided by the true-vs-true floor (1.0 = as close as two true "
                f"samples; mean of 4 sampling seeds x {summary['eval_samples']} samples, each seed's own ratio "
                "beside it, floor from 5 pairs of true draws)")
    top = headline(summary)
    md = [f"## {QUALITY[0].upper() + QUALITY[1:]}", "", f"Metric: {what}. Lower is better.", ""]
    md += [f"**{top}**", ""] if top else []
    seeds = all(len(r.get("seed_ratios", ())) > 1 for r in summary["rows"])
    md += ["| model | sampler | NFE | gamma | value |" + (" sampling seeds (min-max) |" if seeds else ""),
           "|---|---|---|---|---|" + ("---|" if seeds else "")]
    for r in summary["rows"]:
        spread = f" {min(r['seed_ratios']):.3f}-{max(r['seed_ratios']):.3f} |" if seeds else ""
        md.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['gamma']:.1f} | {r['value']:.3f} |{spread}")
    md += ["", f"**Verdict.** {quality_verdict(summary)}", "", "![quality vs NFE](quality_vs_nfe.png)", ""]
    if metric != "swd_ratio":
        md += [f"Feature classifier accuracy on the data: {summary['classifier_accuracy']:.3f}; "
               f"Frechet distance between two halves of the data: {summary['data_vs_data']:.3f}.", "",
               "Samples (CTM gamma 0, NFE 1): ![nfe1](samples_ctm_nfe1.png) NFE 2: ![nfe2](samples_ctm_nfe2.png)",
               "", "Teacher Heun 35: ![heun](samples_teacher_heun35.png) Data: ![data](samples_data.png)", ""]
    else:
        md += ["![samples](samples.png)", "", "![trajectories](trajectories.png)", ""]
    return md


def _editing_md(e: dict | None) -> list[str]:
    """The "Editing" section (image data): the grids of eval/editing.py: edit_examples and their figures."""
    if not e:
        return []
    tasks = [t for t in ("inpaint", "superres") if t in e]
    what = {"inpaint": "inpainting (the bottom half unknown)",
            "superres": "super-resolution x2 (2x2 block means given)"}
    md = ["## Editing", "", f"Zero-shot edits by the distilled CTM (`ctmkit edit`, docs/method.md section 4.1): "
          f"{e['inputs']} data items, NFE {e['nfe']}, gamma {e['gamma']:g}, {e['draws']} draws each (a "
          "class-conditional CTM is given each item's label). Each row: the item, the observation, the draws. "
          "RMS: the draws against the items over the pixels the observation hides (model space, [-1, 1]); class "
          "agreement: the share of draws the feature classifier assigns to the item's class.", "",
          "| task | RMS (hidden pixels) | class agreement |", "|---|---|---|"]
    for t in tasks:
        agree = e[t].get("class_agreement")
        md.append(f"| {what[t]} | {e[t]['rms_hidden']:.3f} | {'-' if agree is None else f'{agree:.3f}'} |")
    md += [""] + [f"{what[t][0].upper() + what[t][1:]}: ![{t}](edit_{t}.png)" for t in tasks] + [""]
    return md


def _diagnosis_md(summary: dict) -> list[str]:
    d = summary["diagnosis"]
    nfes = list(d["coupled_gamma0"])
    return [f"## {WHERE[0].upper() + WHERE[1:]}", "",
            "Coupled error: mean |x_NFE(z) - Phi(z)| in model space, the CTM's sample against the teacher's accurate "
            f"ODE solution Phi from the same noise z ({d['noises']} noises; `ctmkit diagnose`). Floor: the teacher's "
            f"own Heun solve on {d['grid_points']} grid points, {d['teacher_grid_floor']:.4f}.", "",
            "| gamma | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---" * (len(nfes) + 1) + "|",
            "| 0 | " + " | ".join(f"{d['coupled_gamma0'][k]:.4f}" for k in nfes) + " |",
            "| 1 | " + " | ".join(f"{d['coupled_gamma1'][k]:.4f}" for k in nfes) + " |", "",
            f"**Verdict.** {coupled_verdict(summary)}", "",
            "![coupled error](coupled_error.png) ![jump error](jump_error.png)", "",
            "The map: one CTM jump G(x_t, t, s) from the teacher's trajectory, carried on to sigma_min by the "
            "teacher's accurate solve, against Phi(z): which jumps the student has not learned.", ""]
