"""`ctmkit demo`: a demo interrupted in any stage and resumed ends with the numbers of an uninterrupted one; the resume
refuses other settings and folders without a demo in one line; the report's verdicts are computed from the numbers
(made-up numbers that say the opposite get the opposite sentence); the diagnosis shrinks with --eval-samples; a
distillation whose GAN term cannot start says so once.

The demos here are tiny (30 steps, a 16-wide MLP, a 6-point grid, 50 samples per point) and run in this process,
except one that is stopped by real signals in a subprocess."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ctmkit.demo as demo_mod
from ctmkit.config import DistillConfig, load_config
from ctmkit.data import load_data
from ctmkit.demo import STAGES, diagnose_size, report_md, run_demo, settings_diff
from ctmkit.errors import UserError
from ctmkit.eval import verdicts
from ctmkit.eval.sweep import close_up
from ctmkit.io.card import ModelCard
from ctmkit.train.ctm import CTMRun
from ctmkit.train.teacher import TeacherRun

TINY = ("train.steps=30", "model.hidden=16", "model.depth=1", "model.emb_dim=16", "ctm.num_scales=6", "ctm.max_k=5",
        "ctm.gan_start=15", "train.log_every=1")
N = 50
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def demo(out: Path, lines: list | None = None, **kw) -> dict:
    """The tiny demo into `out`, in this process; its console lines go to `lines`."""
    kw = {"overrides": TINY, "eval_samples": N, **kw}
    return run_demo(out, "toy", None, kw.pop("overrides"), progress=False,
                    echo=(lines.append if lines is not None else lambda *_: None), **kw)


def numbers(summary: dict) -> dict:
    """summary.json less its time lines."""
    return {k: v for k, v in summary.items() if k != "times"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted tiny demo: its folder and summary."""
    out = tmp_path_factory.mktemp("demo") / "ref"
    return out, demo(out)


# ---- resume ------------------------------------------------------------------------------------------
def _stop_training(monkeypatch, cls, at: int = 12) -> None:
    """Make a training run stop as a signal would stop it (checkpoint, then 'interrupted at step ...')."""
    step = cls.train_step

    def train_step(self):
        stats = step(self)
        if self.step == at:
            self.request_stop()
        return stats
    monkeypatch.setattr(cls, "train_step", train_step)


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


INTERRUPTS = {  # stage -> how to interrupt it (a Ctrl-C inside a function the stage calls)
    "teacher": lambda mp: _stop_training(mp, TeacherRun),
    "distill": lambda mp: _stop_training(mp, CTMRun),
    "eval": lambda mp: mp.setattr(demo_mod, "sweep", _ctrl_c),
    "diagnose": lambda mp: mp.setattr(demo_mod, "diagnose", _ctrl_c),
    "report": lambda mp: mp.setattr(demo_mod, "save_loss_curves", _ctrl_c),
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_demo_interrupted_in_any_stage_resumes_to_the_same_numbers(stage, reference, tmp_path, monkeypatch):
    out = tmp_path / "d"
    with monkeypatch.context() as mp:
        INTERRUPTS[stage](mp)
        with pytest.raises(UserError, match="--resume") as err:
            demo(out)
    if stage in ("teacher", "distill"):
        assert "checkpoint written" in str(err.value)
        assert list((out / ("teacher" if stage == "teacher" else "ctm") / "checkpoints").glob("ckpt-*.safetensors"))
    else:
        assert f"interrupted in the demo's {stage} stage" in str(err.value)
    record = json.loads((out / "demo.json").read_text())
    assert list(record["done"]) == list(STAGES[:STAGES.index(stage)])
    lines = []
    summary = demo(out, lines, resume=True)
    skipped = [s for s in STAGES if any(ln.endswith("(finished before: skipped)") and f"[{STAGES.index(s) + 1}/"
                                        in ln for ln in lines)]
    assert skipped == list(STAGES[:STAGES.index(stage)]), lines
    assert numbers(summary) == numbers(reference[1])
    assert numbers(json.loads((out / "summary.json").read_text())) == numbers(reference[1])
    assert summary["times"]["sessions"] == 2 and set(summary["times"]) >= {"teacher_s", "distill_s", "eval_s",
                                                                           "diagnose_s"}


def test_a_training_run_resumed_mid_log_period_logs_the_same_losses(tmp_path, monkeypatch):
    from ctmkit.config import TeacherConfig
    cfg = ["train.steps=10", "train.log_every=5", "model.hidden=16", "model.depth=1", "model.emb_dim=16"]
    data = load_data("moons")

    def run(out, resume=False):
        TeacherRun(load_config(TeacherConfig, "toy", None, cfg), out, data, resume=resume).fit(progress=False)

    run(tmp_path / "ref")
    with monkeypatch.context() as mp:
        _stop_training(mp, TeacherRun, at=7)
        with pytest.raises(UserError, match="--resume"):
            run(tmp_path / "run")
    run(tmp_path / "run", resume=True)
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / r / "stats.jsonl").read_text().splitlines()]
              for r in ("ref", "run")]
    assert losses[0] == losses[1]


def test_resume_refuses_other_settings_and_folders_without_a_demo(reference, tmp_path):
    out, _ = reference
    before = (out / "demo.json").read_text()
    with pytest.raises(UserError, match=r"eval_samples 60 \(was 50\).*same settings"):
        demo(out, resume=True, eval_samples=60)
    with pytest.raises(UserError, match=r"distill\.train\.steps 31 \(was 30\)"):
        demo(out, resume=True, overrides=TINY + ("train.steps=31",))
    assert (out / "demo.json").read_text() == before, "a refused resume changed the record"
    with pytest.raises(UserError, match="not empty.*--resume"):
        demo(out)
    with pytest.raises(UserError, match="holds no demo to resume"):
        demo(tmp_path / "nothing", resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="holds no demo to resume"):
        demo(tmp_path / "other", resume=True)


def test_settings_diff_names_each_difference():
    old = {"eval_samples": 50, "overrides": ["a=1"], "distill": {"train": {"steps": 30, "lr": 1e-3}}}
    new = {"eval_samples": 50, "overrides": ["b=2"], "distill": {"train": {"steps": 40, "lr": 1e-3}}}
    assert settings_diff(old, new) == ["distill.train.steps 40 (was 30)"]
    assert settings_diff(old, old) == []


def test_a_demo_stopped_by_signals_says_how_to_go_on_and_resumes(tmp_path):
    """SIGINT in the teacher's training loop, SIGTERM after the distillation, then --resume to the end."""
    args = [sys.executable, "-m", "ctmkit", "demo", "--out", "d", "--quiet", "--eval-samples", str(N), *TINY,
            "train.steps=200"]
    out = tmp_path / "d"

    def stop_when(ready, sig, resume: bool) -> str:
        p = subprocess.Popen(args + (["--resume"] if resume else []), cwd=tmp_path, env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120  # a guard against hanging, not a timing assertion
        while not ready() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert p.poll() is None, f"the demo ended before the signal:\n{p.communicate()[1]}"
        p.send_signal(sig)
        stdout, err = p.communicate(timeout=120)
        assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{stdout}\nstderr:\n{err}"
        assert "Traceback" not in err, err
        return err.strip().splitlines()[-1]

    def done() -> list:
        try:
            return list(json.loads((out / "demo.json").read_text())["done"])
        except (OSError, ValueError):
            return []

    last = stop_when(lambda: (out / "teacher" / "stats.jsonl").exists(), signal.SIGINT, resume=False)
    assert re.fullmatch(r"ctmkit: error: interrupted at step \d+: checkpoint written; continue with --resume", last)
    last = stop_when(lambda: "distill" in done(), signal.SIGTERM, resume=True)
    assert re.fullmatch(r"ctmkit: error: interrupted (in the demo's (eval|diagnose|report) stage|between the demo's "
                        r"stages): the finished stages are kept; continue with --resume", last), last
    res = subprocess.run(args + ["--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "[1/5] training the EDM teacher (finished before: skipped)" in res.stdout
    assert json.loads((out / "summary.json").read_text())["times"]["sessions"] == 3
    assert "over 3 sessions" in (out / "report.md").read_text()


# ---- the report --------------------------------------------------------------------------------------
def test_the_report_states_what_ran_and_every_stage_time(reference):
    out, summary = reference
    report = (out / "report.md").read_text()
    assert "CTM + DSM + GAN from step 15" in report and "GAN generator term joins" in report
    assert re.search(r"Time: teacher \d+ s, CTM \d+ s, evaluation \d+ s, diagnosis \d+ s; \d+ s in all\.", report)
    assert report.count("**Verdict.**") == 2 and "CTM NFE 1" in report
    assert "sampled: the post-hoc EMA of width sigma_rel 0.05" in report     # as the CTM's model card records
    assert summary["ran"]["sample_sigma_rel"] == ModelCard.read(out / "ctm").sampled["phema"]["sigma_rel"] == 0.05
    assert report.index("## Quality against the data") < report.index("| ctm | gamma | 1 |") < report.index(
        "## Where the error is")
    assert summary["diagnosis"]["noises"] == 16 and summary["diagnosis"]["grid_points"] == 6


def row(model, sampler, nfe, gamma, value):
    return {"model": model, "sampler": sampler, "nfe": nfe, "gamma": gamma, "value": value}


def made_up(g0, g1, heun, c0, c1, floor=0.02, gan_start=1500, steps=3000) -> dict:
    """A summary (as summary.json holds it) built from made-up numbers."""
    rows = [row("ctm", "gamma", k, 0.0, v) for k, v in zip((1, 2, 4, 8), g0)]
    rows += [row("ctm", "gamma", k, 1.0, v) for k, v in zip((1, 2, 4, 8), g1)]
    rows += [row("teacher", "heun", k, 0.0, v) for k, v in zip((1, 3, 5, 9, 17, 35), heun)]
    return {"metric": "swd_ratio", "rows": rows, "eval_samples": 2000,
            "diagnosis": {"coupled_gamma0": {str(k): v for k, v in zip((1, 2, 4, 8), c0)},
                          "coupled_gamma1": {str(k): v for k, v in zip((1, 2, 4, 8), c1)},
                          "teacher_grid_floor": floor, "grid_points": 18, "noises": 256},
            "ran": {"teacher_steps": 6000, "distill_steps": steps, "dsm": True, "gan": True, "gan_start": gan_start,
                    "init_from_teacher": True},
            "times": {"teacher_s": 64, "distill_s": 226, "eval_s": 23, "diagnose_s": 43, "sessions": 1}}


# the committed bench/results/demo numbers, and their opposite
BENCH = made_up(g0=(1.278, 1.554, 1.608, 1.608), g1=(1.278, 1.340, 1.421, 1.218),
                heun=(14.87, 2695.5, 124.9, 30.96, 3.673, 1.086),
                c0=(0.0423, 0.0445, 0.0641, 0.0617), c1=(0.0423, 0.7746, 0.8596, 0.8807), floor=0.0216)
OPPOSITE = made_up(g0=(1.05, 1.04, 1.03, 1.02), g1=(1.05, 1.6, 1.7, 1.8),
                   heun=(14.87, 2695.5, 124.9, 30.96, 3.673, 1.086),
                   c0=(0.5, 0.6, 0.7, 0.8), c1=(0.5, 0.7, 0.8, 0.9), floor=0.0216, gan_start=3000)


def test_the_quality_verdict_follows_the_numbers():
    bench, opposite = verdicts.quality_verdict(BENCH), verdicts.quality_verdict(OPPOSITE)
    assert "does not show CTM's claim that more steps do not degrade" in bench
    assert ("higher by more than 10% of NFE 1's value at NFE 2, 4 and 8 (NFE 2: 22% worse, 0.276 above NFE 1 against "
            "0.128; NFE 4: 26% worse, 0.33 above NFE 1 against 0.128;") in bench
    assert "not at 35 NFE" in bench and "1, 3, 5, 9 and 17 NFE" in bench
    assert "shows CTM's claim that more steps do not degrade" in opposite and "does not show" not in opposite
    assert "as close to the data as the teacher's Heun at every budget" in opposite
    assert "better than gamma 0" in bench and "worse than gamma 0" in opposite
    assert "1.28x the true-vs-true floor" in verdicts.headline(BENCH)
    assert "teacher Heun 35 NFE: 1.09x" in verdicts.headline(BENCH)


def with_seeds(summary: dict, half: dict[int, float]) -> dict:
    """The summary with per-seed ratios on every row: +-half[nfe] around each gamma-0 CTM value, +-0.01 elsewhere."""
    def spread(r):
        h = half[r["nfe"]] if (r["model"], r["gamma"]) == ("ctm", 0.0) else 0.01
        return [r["value"] - h, r["value"], r["value"] + h]
    rows = [{**r, "seed_ratios": spread(r)} for r in summary["rows"]]
    return {**summary, "rows": rows}


def test_more_steps_are_judged_against_the_spread_over_sampling_seeds():
    # NFE 8 is 0.08 above NFE 1: within a seed spread of 0.10, outside one of 0.04 (and outside the 10 % rule)
    near = made_up(g0=(0.70, 0.70, 0.69, 0.78), g1=(0.70, 0.8, 0.8, 0.8), heun=(9, 9, 9, 9, 9, 0.7),
                   c0=(0.03, 0.03, 0.03, 0.03), c1=(0.1, 0.1, 0.1, 0.1))
    wide, narrow = with_seeds(near, dict.fromkeys((1, 2, 4, 8), 0.05)), with_seeds(near, {1: 0.02, 2: 0.01, 4: 0.01,
                                                                                           8: 0.01})
    assert ("none above 0.7 at NFE 1 by more than the larger of the two points' ranges over the sampling seeds"
            in verdicts.quality_verdict(wide))
    assert ("higher by more than the larger of the two points' ranges over the sampling seeds at NFE 8 (NFE 8: 11% "
            "worse, 0.08 above NFE 1 against 0.04)") in verdicts.quality_verdict(narrow)
    assert "at NFE 8 (NFE 8: 11% worse, 0.08 above NFE 1 against 0.07)" in verdicts.quality_verdict(near)  # 10 % rule
    table = report_md({**wide, "data": "moons", "ran": {**wide["ran"], "preset": "toy", "data": "moons", "seed": 0,
                                                        "overrides": []}})
    assert "| value | sampling seeds (min-max) |" in table
    assert "| ctm | gamma | 8 | 0.0 | 0.780 | 0.730-0.830 |" in table


def test_the_coupled_verdict_follows_the_numbers():
    bench, opposite = verdicts.coupled_verdict(BENCH), verdicts.coupled_verdict(OPPOSITE)
    assert "it follows the teacher's ODE" in bench and "has not learned" not in bench
    assert "by design" in bench and "yet its sliced W1 ratio at NFE 8 is 1.22 (the best CTM value)" in bench
    assert "the coupled error measures" in bench
    assert "it has not learned the teacher's ODE closely" in opposite and "stays near gamma 0" in opposite


def test_the_coupled_verdict_names_the_nfes_off_the_teacher_s_ode():
    mixed = made_up(g0=(6.66, 6.25, 2.27, 1.40), g1=(6.66, 6.58, 4.01, 2.18), heun=(9.9, 1013, 47.2, 23.5, 3.4, 1.74),
                    c0=(0.311, 0.285, 0.104, 0.059), c1=(0.311, 0.667, 0.697, 0.789), floor=0.0278)
    text = verdicts.coupled_verdict(mixed)
    assert "follows the teacher's ODE within 5x the floor at NFE 4 and 8, not at NFE 1 and 2" in text
    assert "also worse (2.18 against gamma 0's 1.4)" in text
    assert "more steps help (4.8x better at NFE 8)" in verdicts.quality_verdict(mixed)


def test_what_ran_says_when_the_gan_never_started():
    assert "(CTM + DSM + GAN from step 1500)" in verdicts.what_ran(BENCH)
    recipe = {**BENCH, "ran": {**BENCH["ran"], "ema": 0.999, "phema": [0.05, 0.1], "lr": 4e-4,
                               "lr_schedule": "cosine", "pairs": "mixed"}}
    assert ("Pairs: mixed; learning rate 0.0004, cosine; sampled: the training EMA (rate 0.999); post-hoc EMA "
            "snapshots of widths 0.05, 0.1 kept") in verdicts.what_ran(recipe)
    chosen = {**recipe, "ran": {**recipe["ran"], "sample_sigma_rel": 0.05}}
    assert ("sampled: the post-hoc EMA of width sigma_rel 0.05 (ctm.sample_sigma_rel), rebuilt at the last step; "
            "post-hoc EMA snapshots of widths 0.05, 0.1 kept") in verdicts.what_ran(chosen)
    text = verdicts.what_ran(OPPOSITE)
    assert "GAN term never ran: ctm.gan_start=3000 is not below train.steps=3000" in text and "from step" not in text


def test_the_loss_note_explains_the_gan_start_from_the_logged_terms():
    rows = [{"step": s, "loss": 1.5, "loss_ctm": 0.05, "lambda_dsm": 1.6, "loss_dsm": 0.9} for s in (1400, 1450, 1500)]
    rows += [{"step": s, "loss": 3.5, "loss_ctm": 0.1, "lambda_dsm": 3.6, "loss_dsm": 0.9, "lambda_gan": 0.2,
              "loss_gan_g": 0.1} for s in (1550, 1600)]
    note = verdicts.loss_note({"distill_loss": verdicts.loss_change(rows, 1500)})
    assert "At step 1500 (ctm.gan_start)" in note and "rises from 1.5 to 3.5" in note
    assert "lambda_GAN * L_GAN adds 0.02" in note and "lambda_DSM * L_DSM from 1.44 to 3.24" in note
    assert verdicts.loss_note({"distill_loss": None}) == ""
    assert verdicts.loss_change(rows[:3], 1500) is None


def test_the_time_line_holds_every_stage():
    line = verdicts.time_line(BENCH)
    assert line == "Time: teacher 64 s, CTM 226 s, evaluation 23 s, diagnosis 43 s; 356 s in all."


# ---- sizes, plots, the GAN warning -------------------------------------------------------------------
def test_eval_samples_shrink_the_diagnosis():
    assert diagnose_size("vector", 2000, 18) == {"n": 256, "grid": 18, "steps": 256}
    assert diagnose_size("vector", 500, 18)["n"] == 64
    assert diagnose_size("vector", 50, 6) == {"n": 16, "grid": 6, "steps": 256}
    assert diagnose_size("vector", 20000, 18)["n"] == 256
    assert diagnose_size("image", 2000, 18) == {"n": 64, "grid": 10, "steps": 64}


def test_the_close_up_holds_the_ctm_and_the_floor_not_the_teacher_s_worst_budget():
    series = {"CTM gamma=0": ([1, 2], [1.28, 1.61]), "teacher Heun": ([3, 35], [2695.5, 1.09])}
    lo, hi = close_up(series, ("true data (1.0)", 1.0))
    assert lo < 1.0 and 1.61 < hi < 2


def test_distill_says_once_when_the_gan_term_will_not_run(tmp_path, caplog):
    data = load_data("ring")
    for gan_start, expected in ((5, 1), (1, 0)):
        overrides = ["train.steps=2", f"ctm.gan_start={gan_start}", "model.hidden=16", "model.depth=1",
                     "model.emb_dim=16"]
        cfg = load_config(DistillConfig, None, None, overrides, data="ring", teacher="exact")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            CTMRun(cfg, tmp_path / f"run{gan_start}", data)
        hits = [r.getMessage() for r in caplog.records if "GAN term will not run" in r.getMessage()]
        assert len(hits) == expected, caplog.text
        assert all("\n" not in h and "ctm.gan_start=5 is not below train.steps=2" in h for h in hits)
