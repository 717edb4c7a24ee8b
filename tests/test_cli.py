"""CLI contract tests (README, "Command line" and "Data SPEC"): `python -m ctmkit ...` as a subprocess.

Smoke runs use tiny settings (a few steps, tiny networks); every bad input must end with a non-zero exit status and
exactly one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CLI = [sys.executable, "-m", "ctmkit"]
MLP = ["model.hidden=16", "model.depth=1", "model.emb_dim=16"]
UNET = ["model.channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]"]
TINY = ["--steps", "3", "--batch-size", "16", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # small, CPU-only, deterministic runs


def ctmkit(*args, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m ctmkit ARGS` in cwd; text output captured."""
    return subprocess.run(CLI + [str(a) for a in args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


def last_stats(run: Path) -> dict:
    lines = [ln for ln in (run / "stats.jsonl").read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny EDM teacher on moons (3 steps), trained once for the module; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("cli")
    ok(ctmkit("train-teacher", "--data", "moons", "--out", "teacher", *TINY, *MLP, cwd=root))
    return root / "teacher"


# ---- --help --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd, words", [
    ([], ["Consistency Trajectory", "train-teacher", "distill", "sample"]),
    (["train-teacher"], ["teacher", "--data", "--out", "--steps", "--resume"]),
    (["distill"], ["Distill", "--teacher", "--data", "--resume"]),
    (["sample"], ["Sample", "--model", "--nfe", "--gamma", "--labels"]),
    (["config"], ["config", "teacher", "distill"]),
    (["eval"], ["sweep", "--nfe", "--gamma", "--heun", "floor"]),
    (["nll"], ["log-likelihood", "bits/dim", "--rtol"]),
    (["demo"], ["main job", "--preset", "--out"]),
    (["diagnose"], ["coupled error", "jump error", "--teacher", "--grid", "--no-map"]),
], ids=["group", "train-teacher", "distill", "sample", "config", "eval", "nll", "demo", "diagnose"])
def test_help(cmd, words, tmp_path):
    res = ok(ctmkit(*cmd, "--help", cwd=tmp_path))
    for w in words:
        assert w in res.stdout, f"'{w}' missing from `ctmkit {' '.join(cmd)} --help`"


# ---- smoke runs ----------------------------------------------------------------------------------
def test_train_teacher_writes_run_folder(teacher):
    for name in ("config.yaml", "model.json", "stats.jsonl"):
        assert (teacher / name).is_file(), name
    ckpts = sorted((teacher / "checkpoints").glob("*.safetensors"))
    assert ckpts and all(c.with_suffix(".json").is_file() for c in ckpts)
    assert last_stats(teacher)["step"] == 3
    assert json.loads((teacher / "model.json").read_text())["kind"] == "teacher"


def test_sample_teacher(teacher, tmp_path):
    ok(ctmkit("sample", "--model", teacher, "--n", 20, "--nfe", 3, "--out", "s.npz", "--quiet", cwd=tmp_path))
    with np.load(tmp_path / "s.npz") as z:
        assert z["samples"].shape == (20, 2)
        assert np.isfinite(z["samples"]).all()
        assert "labels" not in z.files
    assert (tmp_path / "s.png").is_file()


def test_distill_from_teacher_with_gan_then_sample(teacher, tmp_path):
    ok(ctmkit("distill", "--teacher", teacher, "--data", "moons", "--out", "ctm", *TINY, *MLP, "ctm.gan_start=1",
              cwd=tmp_path))
    run = tmp_path / "ctm"
    assert json.loads((run / "model.json").read_text())["kind"] == "ctm"
    stats = last_stats(run)
    assert stats["step"] == 3 and "loss_d" in stats  # the discriminator stepped after gan_start
    ok(ctmkit("sample", "--model", "ctm", "--n", 20, "--nfe", 2, "--gamma", 0.5, "--out", "c.npz", "--quiet",
              cwd=tmp_path))
    with np.load(tmp_path / "c.npz") as z:
        assert z["samples"].shape == (20, 2) and np.isfinite(z["samples"]).all()


def test_distill_exact_teacher_on_ring(tmp_path):
    ok(ctmkit("distill", "--teacher", "exact", "--data", "ring", "--out", "ctm", *TINY, *MLP, "ctm.gan=false",
              cwd=tmp_path))
    assert last_stats(tmp_path / "ctm")["step"] == 3
    assert sorted((tmp_path / "ctm" / "checkpoints").glob("*.safetensors"))


def test_train_teacher_resume_continues(teacher, tmp_path):
    run = tmp_path / "teacher"
    shutil.copytree(teacher, run)
    ok(ctmkit("train-teacher", "--data", "moons", "--out", run, "--resume", "--steps", 5, "--batch-size", 16,
              "--quiet", *MLP, cwd=tmp_path))
    steps = [json.loads(ln)["step"] for ln in (run / "stats.jsonl").read_text().splitlines() if ln.strip()]
    assert steps == [3, 5]
    assert (run / "checkpoints" / "ckpt-00000005.safetensors").is_file()


def test_image_npz_conditional_teacher_and_labelled_samples(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    images = rng.integers(0, 256, size=(40, 8, 8)).astype(np.uint8)
    images[labels == 1] //= 2  # two visibly different classes
    np.savez(tmp_path / "img.npz", x=images, labels=labels)
    ok(ctmkit("train-teacher", "--data", "img.npz", "--out", "run", "--steps", 2, "--batch-size", 8, "--quiet",
              *UNET, cwd=tmp_path))
    ok(ctmkit("sample", "--model", "run", "--n", 4, "--nfe", 3, "--labels", 1, "--out", "s.npz", "--quiet",
              cwd=tmp_path))
    with np.load(tmp_path / "s.npz") as z:
        assert z["samples"].dtype == np.uint8 and z["samples"].shape == (4, 8, 8)
        assert (z["labels"] == 1).all() and z["labels"].shape == (4,)
    assert (tmp_path / "s.png").is_file()


# ---- bad input: exit != 0, one line on stderr naming the problem, no traceback ----------------------
def _train(data: str, *extra) -> list:
    return ["train-teacher", "--data", data, "--out", "run", *TINY, *MLP, *extra]


def _write(path: Path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return f"gmm:{path.name}"


def _npy(path: Path, a: np.ndarray) -> str:
    np.save(path, a)
    return path.name


GOOD_GMM = {"means": [[0.0, 0.0], [1.0, 1.0]], "stds": [0.1, 0.1], "weights": [0.5, 0.5]}
BAD_INPUTS = {
    # id: (args(tmp_path, teacher_copy) -> argv, keyword the error line must contain)
    "missing-data-path": (lambda d, t: _train("nope/missing.npy"), "does not exist"),
    "npy-4d-weird-channels": (lambda d, t: _train(_npy(d / "a.npy", np.zeros((5, 6, 6, 7), np.float32))), "shape"),
    "npy-1d": (lambda d, t: _train(_npy(d / "a.npy", np.zeros(10, np.float32))), "shape"),
    "npy-nan": (lambda d, t: _train(_npy(d / "a.npy", np.array([[0.0, 1.0], [np.nan, 2.0]] * 5))), "NaN"),
    "empty-image-folder": (lambda d, t: (d / "imgs").mkdir() or _train("imgs"), "no image files"),
    "gmm-invalid-json": (lambda d, t: _train(_write(d / "g.json", "{means: oops")), "not valid JSON"),
    "gmm-missing-key": (lambda d, t: _train(_write(d / "g.json", {k: v for k, v in GOOD_GMM.items()
                                                                  if k != "weights"})), "weights"),
    "gmm-negative-std": (lambda d, t: _train(_write(d / "g.json", {**GOOD_GMM, "stds": [0.1, -0.2]})), "stds"),
    "unknown-config-key": (lambda d, t: _train("moons", "foo=1"), "foo"),
    # no --steps here: the flag would replace train.steps before its type is checked
    "config-wrong-type": (lambda d, t: ["train-teacher", "--data", "moons", "--out", "run", "--quiet", *MLP,
                                        "train.steps=abc"], "train.steps"),
    "unknown-preset": (lambda d, t: _train("moons", "--preset", "no-such-preset"), "preset"),
    "sample-nfe-0": (lambda d, t: ["sample", "--model", t, "--n", 4, "--nfe", 0, "--out", "s.npz"], "--nfe"),
    "sample-gamma-1.5": (lambda d, t: ["sample", "--model", t, "--n", 4, "--nfe", 1, "--gamma", 1.5,
                                       "--out", "s.npz"], "--gamma"),
    "sample-not-a-run": (lambda d, t: (d / "notrun").mkdir() or ["sample", "--model", "notrun", "--n", 4,
                                                                   "--out", "s.npz"], "notrun"),
    "sample-labels-unconditional": (lambda d, t: ["sample", "--model", t, "--n", 4, "--nfe", 1, "--labels", 7,
                                                  "--out", "s.npz"], "--labels"),
    "sample-out-missing-folder": (lambda d, t: ["sample", "--model", t, "--n", 4, "--nfe", 1,
                                                "--out", "nodir/s.npz"], "does not exist"),
    "distill-exact-without-density": (lambda d, t: ["distill", "--teacher", "exact", "--data", "moons",
                                                    "--out", "ctm", *TINY, *MLP], "known density"),
    # click-level usage errors go through the same one-line path
    "option-not-an-integer": (lambda d, t: ["sample", "--model", t, "--n", "abc", "--out", "s.npz"], "--n"),
    "missing-required-option": (lambda d, t: ["train-teacher", "--out", "run", "--quiet"], "--data"),
    "unknown-command": (lambda d, t: ["no-such-command"], "no-such-command"),
    "train-into-run-without-resume": (lambda d, t: ["train-teacher", "--data", "moons", "--out", t, *TINY, *MLP],
                                      "--resume"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error(case, teacher, tmp_path):
    make_args, keyword = BAD_INPUTS[case]
    t = tmp_path / "teacher"
    shutil.copytree(teacher, t)  # a private copy: no case can change the shared run
    res = ctmkit(*make_args(tmp_path, t), cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0, f"exit 0 on bad input\n{out}"
    assert "Traceback" not in out, out
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got:\n{res.stderr}"
    assert keyword.lower() in lines[0].lower(), f"'{keyword}' not in: {lines[0]}"
    if case == "train-into-run-without-resume":
        assert last_stats(t)["step"] == 3  # the run was left as it was
    if case.startswith("sample"):
        assert not (tmp_path / "s.npz").exists()


def test_eval_and_nll_on_a_tiny_ctm(tmp_path):
    ok(ctmkit("distill", "--teacher", "exact", "--data", "ring", "--out", "ctm", *TINY, *MLP, "ctm.gan=false",
              cwd=tmp_path))
    ok(ctmkit("eval", "--model", "ctm", "--data", "ring", "--nfe", "1,2", "--gamma", "0,1", "--heun", "3", "--n",
              "200", "--seeds", "1", "--out", "ev.json", cwd=tmp_path))
    res = json.loads((tmp_path / "ev.json").read_text())
    assert res["metric"] == "swd_ratio" and len(res["rows"]) == 5 and (tmp_path / "ev.png").exists()
    assert all(r["value"] > 0 and np.isfinite(r["mmd"]) for r in res["rows"])
    out = json.loads(ok(ctmkit("nll", "--model", "ctm", "--data", "ring", "--n", "8", "--rtol", "1e-3", "--atol",
                               "1e-3", cwd=tmp_path)).stdout)
    assert out["n"] == 8 and out["dim"] == 2 and np.isfinite(out["nats_per_dim"])


@pytest.mark.slow     # a 1500-step teacher, about 17 s: kept out of the default suite (under 10 minutes)
def test_class_conditional_sampling_gives_requested_classes(tmp_path):
    """A labelled set of 4 well-separated clusters: samples asked for class c land nearest class c's mean."""
    rng = np.random.default_rng(0)
    means = np.array([[-3.0, -3.0], [3.0, 3.0], [-3.0, 3.0], [3.0, -3.0]])
    labels = rng.integers(0, 4, 2000)
    np.savez(tmp_path / "clusters.npz", x=means[labels] + 0.3 * rng.standard_normal((2000, 2)), labels=labels)
    ok(ctmkit("train-teacher", "--data", "clusters.npz", "--out", "t", "--steps", "1500", "--batch-size", "256",
              "--quiet", "model.hidden=64", "model.depth=2", "train.ema=[0.95]", cwd=tmp_path))
    for c in (1, 2):
        ok(ctmkit("sample", "--model", "t", "--n", "100", "--nfe", "9", "--labels", str(c), "--out", f"s{c}.npz",
                  "--quiet", cwd=tmp_path))
        s = np.load(tmp_path / f"s{c}.npz")
        nearest = np.argmin(((s["samples"][:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        assert (s["labels"] == c).all() and (nearest == c).mean() > 0.9, np.bincount(nearest, minlength=4)


def test_demo_runs_end_to_end_on_a_tiny_config(tmp_path):
    res = ok(ctmkit("demo", "--out", "d", "--quiet", "--eval-samples", "100", "train.steps=4", *MLP, "ctm.gan_start=2",
                    cwd=tmp_path))
    d = tmp_path / "d"
    for f in ("report.md", "summary.json", "samples.png", "quality_vs_nfe.png", "trajectories.png", "loss_ctm.png"):
        assert (d / f).exists(), f
    summary = json.loads((d / "summary.json").read_text())
    assert len(summary["rows"]) == 8 + 6 and "CTM NFE 1" in (d / "report.md").read_text()
    assert "teacher" in res.stdout and "ctm" in res.stdout
