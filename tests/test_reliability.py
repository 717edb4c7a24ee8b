"""Reliability and security (issue 7): crash-safe resume, one-line errors for bad input, readers and config that
fail only with UserError, and checkpoints that can never run code.

- kill -9 at random moments, resume with --resume: every checkpoint on disk with a sidecar loads, and the final
  weights equal those of an uninterrupted run (teacher and CTM distillation, CPU, deterministic);
- truncated / corrupted checkpoints are reported in one line and skipped; resume says which one it picked;
- bad input on the command line: exit status != 0, one line on stderr naming the problem, no traceback, nothing
  half-written (the cases not already in test_cli.py / test_data.py);
- property tests (hypothesis): random bytes and arrays through every data reader, random YAML and key=value
  overrides through the config parser: a clean result or a UserError, nothing else;
- a pickle payload dressed as a checkpoint (matching SHA-256 sidecar) is refused and never executed, and the
  source never deserialises with pickle outside the restricted unpickler.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ctmkit.cli import main
from ctmkit.config import DistillConfig, TeacherConfig, load_config, valid_keys
from ctmkit.data import load_data
from ctmkit.errors import UserError
from ctmkit.io.checkpoint import list_checkpoints, load_checkpoint, load_latest, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ctmkit"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU-only, deterministic
MLP = ["model.hidden=16", "model.depth=1", "model.emb_dim=16"]
TINY = ["--steps", "3", "--batch-size", "16", "--quiet"]


# ---- helpers ---------------------------------------------------------------------------------------
def invoke(*args) -> tuple[int, str]:
    """Run the CLI in-process (CliRunner); returns (exit status, stderr with the log lines the real CLI would
    print there). Fails on any uncaught exception (which the real CLI would show as a traceback)."""
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(logging.Formatter("ctmkit: %(message)s"))
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        res = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        logging.getLogger().removeHandler(handler)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(res.exception))
        pytest.fail(f"uncaught {type(res.exception).__name__} (a traceback for the user):\n{tb}")
    return res.exit_code, logs.getvalue() + res.stderr


def one_line_error(args, keyword: str) -> str:
    code, err = invoke(*args)
    assert code != 0, f"exit 0 on bad input: {args}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctmkit: error: "), f"expected one error line, got:\n{err}"
    assert keyword.lower() in lines[0].lower(), f"'{keyword}' not in: {lines[0]}"
    return lines[0]


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_same_tree(a, b, where: str = "state") -> None:
    """Nested dicts/lists of tensors and scalars: equal keys, bitwise-equal tensors, equal scalars."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"


def losses(run: Path) -> list[tuple]:
    rows = [json.loads(ln) for ln in (run / "stats.jsonl").read_text().splitlines() if ln.strip()]
    return [(r["step"], r.get("loss")) for r in rows]


# ---- 1. kill -9 at random moments, resume: identical final weights ---------------------------------------
def _newest_sidecar_step(run: Path) -> int:
    steps = [int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("ckpt-*.json")]
    return max(steps, default=-1)


def _check_every_complete_checkpoint_loads(run: Path) -> None:
    for path in list_checkpoints(run / "checkpoints"):
        if path.with_suffix(".json").exists():  # no sidecar: incomplete, load_latest skips it
            load_checkpoint(path)  # raises UserError if the file does not match its sidecar


def _kill_resume_matches_uninterrupted(tmp_path: Path, args: list[str], steps: int, signals: list[int], seed: int):
    """Interrupt a run with each of `signals` at random moments (after some progress), resume each time with
    --resume, then finish it: the result must equal an uninterrupted run's, bit for bit."""
    args = [*args, "--steps", str(steps), "--batch-size", "64", "--ckpt-every", "1", "--quiet",
            "model.hidden=32", "model.depth=2", "model.emb_dim=16", "train.log_every=1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(CLI + args + ["--out", str(ref)], env=ENV, check=True, capture_output=True, timeout=300)
    rng = random.Random(seed)
    interrupted = 0
    for sig in signals:
        before = load_latest(run / "checkpoints") if run.exists() else None
        start = _newest_sidecar_step(run) if run.exists() else -1
        p = subprocess.Popen(CLI + args + ["--out", str(run), "--resume"], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120  # a guard against hanging, not a timing assertion
        while _newest_sidecar_step(run) <= start and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # wait for progress: at least one new complete checkpoint
        time.sleep(rng.uniform(0.0, 0.3))
        if p.poll() is None:
            os.kill(p.pid, sig)
            interrupted += 1
        err = p.communicate(timeout=60)[1]
        if before is not None:  # resume picked the newest intact checkpoint, and said so
            assert before[1].name in err and "resum" in err.lower(), err
        _check_every_complete_checkpoint_loads(run)
        found = load_latest(run / "checkpoints")
        assert found is not None and found[0]["step"] > start, "no progress between interruptions"
        if p.returncode == 0:
            break
        if sig == signal.SIGKILL:
            assert p.returncode == -signal.SIGKILL, err
        else:  # SIGTERM / SIGINT: a checkpoint at the current step, one line that says how to go on
            last = err.strip().splitlines()[-1]
            assert p.returncode == 2 and "interrupted at step" in last and "--resume" in last, err
            step = int(re.search(r"interrupted at step (\d+)", last).group(1))
            assert found[0]["step"] == step and found[1].name == f"ckpt-{step:08d}.safetensors"
    assert interrupted >= 2, f"only {interrupted} interruption(s) landed mid-run; raise the step count"
    subprocess.run(CLI + args + ["--out", str(run), "--resume"], env=ENV, check=True, capture_output=True,
                   timeout=300)
    assert not list((run / "checkpoints").glob(".*.tmp")), "temp files of killed writes were left behind"
    final = f"ckpt-{steps:08d}.safetensors"
    a, b = load_checkpoint(ref / "checkpoints" / final), load_checkpoint(run / "checkpoints" / final)
    assert a["step"] == b["step"] == steps
    assert_same_tree(a["nets"], b["nets"], "nets")  # weights, EMAs (and target, discriminator)
    assert_same_tree(a["opts"], b["opts"], "opts")  # optimiser moments
    assert losses(ref) == losses(run)  # the same batches and noise at every step


def test_kill_9_and_resume_teacher_equals_uninterrupted_run(tmp_path):
    """Two kill -9 and one SIGTERM (checkpoint on the way out) at random moments."""
    _kill_resume_matches_uninterrupted(tmp_path, ["train-teacher", "--data", "ring"], steps=150,
                                       signals=[signal.SIGKILL, signal.SIGTERM, signal.SIGKILL], seed=0)


def test_kill_9_and_resume_distill_equals_uninterrupted_run(tmp_path):
    """CTM with the exact teacher, DSM and a GAN that starts mid-run (discriminator, its optimiser and the
    augmentation generator are all part of the resumed state)."""
    _kill_resume_matches_uninterrupted(tmp_path, ["distill", "--teacher", "exact", "--data", "ring",
                                                  "ctm.num_scales=8", "ctm.max_k=4", "ctm.gan_start=5"],
                                       steps=40, signals=[signal.SIGKILL, signal.SIGKILL], seed=1)


def test_divergence_stops_with_one_line_and_keeps_finite_checkpoints(tmp_path):
    run = tmp_path / "run"
    code, err = invoke("train-teacher", "--data", "ring", "--out", run, "--steps", 50, "--batch-size", 16,
                       "--ckpt-every", 1, "--quiet", *MLP, "train.lr=1e30", "train.optimizer=adam",
                       "train.max_bad_steps=3", "train.log_every=1")
    assert code == 2 and err.count("\n") == 1 and "diverged" in err, err
    ckpts = list_checkpoints(run / "checkpoints")
    assert ckpts
    for path in ckpts:
        for name, sd in load_checkpoint(path)["nets"].items():
            assert all(torch.isfinite(v).all() for v in sd.values()), (path.name, name)


def test_resume_survives_a_stats_line_cut_short_by_a_crash(teacher, tmp_path):
    run = tmp_path / "t"
    shutil.copytree(teacher, run)
    with open(run / "stats.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # kill -9 in the middle of an append
    code, err = invoke("train-teacher", "--data", "ring", "--out", run, "--resume", "--steps", 4,
                       "--batch-size", 16, "--quiet", *MLP)
    assert code == 0, err
    assert [s for s, _ in losses(run)][-1] == 4


def test_resume_refuses_when_every_checkpoint_is_broken(teacher, tmp_path):
    run = tmp_path / "t"
    shutil.copytree(teacher, run)
    for p in (run / "checkpoints").glob("ckpt-*.safetensors"):
        p.write_bytes(p.read_bytes()[:50])
    code, err = invoke("train-teacher", "--data", "ring", "--out", run, "--resume", "--steps", 4,
                       "--batch-size", 16, "--quiet", *MLP)
    assert code != 0 and "no intact checkpoint" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# ---- 2. corrupted checkpoints: one line each, skipped; resume says which one it uses ------------------------
def _state(i: int) -> dict:
    return {"step": i, "w": torch.full((64,), float(i)), "nested": {"a": [torch.arange(i + 1), 1.5, None]}}


def test_truncated_or_corrupted_checkpoints_are_reported_in_one_line_and_skipped(tmp_path, caplog):
    d = tmp_path / "checkpoints"
    paths = [save_checkpoint(d, i, _state(i), keep=0) for i in range(1, 6)]
    assert_same_tree(load_checkpoint(paths[0]), _state(1))
    paths[4].with_suffix(".json").unlink()                                  # 5: killed before its sidecar
    paths[3].write_bytes(paths[3].read_bytes()[:100])                         # 4: truncated
    raw = bytearray(paths[2].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    paths[2].write_bytes(bytes(raw))                                          # 3: one byte flipped
    paths[1].with_suffix(".json").write_text("{not json")                     # 2: sidecar garbage
    expect = {5: "incomplete", 4: "corrupt or truncated", 3: "corrupt or truncated", 2: "incomplete"}
    for step, word in expect.items():
        with pytest.raises(UserError, match=word) as e:
            load_checkpoint(paths[step - 1])
        assert "\n" not in str(e.value) and paths[step - 1].name in str(e.value)
    with caplog.at_level(logging.WARNING):
        state, path = load_latest(d)
    assert path == paths[0] and state["step"] == 1
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 4 and all("\n" not in m for m in skipped), skipped


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny teacher on ring (2-D), 3 steps, a checkpoint at every step; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("rel")
    code, err = invoke("train-teacher", "--data", "ring", "--out", root / "t", *TINY, "--ckpt-every", 1, *MLP)
    assert code == 0, err
    return root / "t"


def test_resume_skips_a_corrupted_newest_checkpoint_and_says_which_it_uses(teacher, tmp_path):
    run = tmp_path / "t"
    shutil.copytree(teacher, run)
    newest = run / "checkpoints" / "ckpt-00000003.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])
    out = tmp_path / "s.npz"
    one_line_error(["sample", "--model", newest, "--n", 4, "--out", out], "corrupt or truncated")
    code, err = invoke("sample", "--model", run, "--n", 4, "--nfe", 2, "--out", out, "--quiet")
    assert code == 0 and out.exists(), err  # sampling a run folder uses the newest intact checkpoint ...
    assert re.fullmatch(r"ctmkit: skipping .*ckpt-00000003.* corrupt or truncated .*\n", err), err  # ... and says so
    code, err = invoke("train-teacher", "--data", "ring", "--out", run, "--resume", "--steps", 4,
                       "--batch-size", 16, "--ckpt-every", 1, "--quiet", *MLP)
    assert code == 0, err
    assert re.search(r"skipping .*ckpt-00000003.*corrupt or truncated", err), err
    assert re.search(r"resum\w* .*ckpt-00000002", err), err
    assert load_checkpoint(run / "checkpoints" / "ckpt-00000004.safetensors")["step"] == 4


# ---- 3. bad input on the command line (cases not covered by test_cli.py) ------------------------------------
def _png(path: Path, size=(4, 4), mode="L") -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)


def _npy(d: Path, a: np.ndarray) -> Path:
    np.save(d / "a.npy", a)
    return d / "a.npy"


def _mixed_sizes(d: Path) -> Path:
    _png(d / "imgs" / "a.png", (4, 4))
    _png(d / "imgs" / "b.png", (6, 4))
    return d / "imgs"


def _garbage_png(d: Path, with_good: bool) -> Path:
    if with_good:
        _png(d / "imgs" / "a.png")
    (d / "imgs").mkdir(exist_ok=True)
    (d / "imgs" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return d / "imgs"


def _empty_class(d: Path) -> Path:
    _png(d / "imgs" / "cat" / "a.png")
    (d / "imgs" / "dog").mkdir()
    return d / "imgs"


def _npz_labels(d: Path, labels) -> Path:
    np.savez(d / "l.npz", x=np.zeros((3, 2), np.float32) + np.arange(3)[:, None], labels=np.array(labels))
    return d / "l.npz"


def _mnist_label_12(d: Path) -> Path:
    (d / "m").mkdir()
    imgs = np.zeros((2, 4, 4), np.uint8)
    (d / "m" / "train-images-idx3-ubyte").write_bytes(np.array([2051, 2, 4, 4], ">i4").tobytes() + imgs.tobytes())
    (d / "m" / "train-labels-idx1-ubyte").write_bytes(np.array([2049, 2], ">i4").tobytes() + bytes([3, 12]))
    return d / "m"


def _cifar_label_10(d: Path) -> Path:
    (d / "c").mkdir()
    with open(d / "c" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    return d / "c"


def _config_file(d: Path, text: str | bytes) -> Path:
    p = d / "c.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _train(data, *extra) -> list:
    return ["train-teacher", "--data", data, *TINY, *MLP, *extra]


def _over(*overrides) -> list:  # no --steps flag: it would replace train.steps before it is checked
    return ["train-teacher", "--data", "ring", "--quiet", *MLP, *overrides]


def _distill(*overrides) -> list:
    return ["distill", "--teacher", "exact", "--data", "ring", "--quiet", *MLP, *overrides]


def _sample(t: Path, *extra, out="s.npz") -> list:
    return ["sample", "--model", t, "--n", 4, "--nfe", 1, *extra, "--out", out]


def _eval_ref(t: Path, ref: Path, d: Path) -> list:
    return ["eval", "--model", t, "--ref", ref, "--heun", 1, "--n", 8, "--out", d / "e.json"]


BAD_CLI = {
    # id: (argv(tmp_path, teacher) without --out for training commands, keyword of the error line)
    "npy-5d": (lambda d, t: _train(_npy(d, np.zeros((4, 2, 3, 4, 5), np.float32))), "shape"),
    "npy-inf": (lambda d, t: _train(_npy(d, np.array([[0.0, 1.0], [np.inf, 2.0]] * 3))), "NaN or Inf"),
    "npy-nan-images": (lambda d, t: _train(_npy(d, np.full((3, 4, 4), np.nan, np.float32))), "NaN"),
    "folder-mixed-sizes": (lambda d, t: _train(_mixed_sizes(d)), "differ in size"),
    "folder-garbage-png": (lambda d, t: _train(_garbage_png(d, True)), "cannot read image file"),
    "folder-only-garbage-png": (lambda d, t: _train(_garbage_png(d, False)), "cannot read image file"),
    "folder-empty-class": (lambda d, t: _train(_empty_class(d)), "no image files"),
    "npz-labels-negative": (lambda d, t: _train(_npz_labels(d, [0, -1, 1])), "labels must be >= 0"),
    "npz-labels-fractional": (lambda d, t: _train(_npz_labels(d, [0, 0.5, 1])), "integers"),
    "mnist-label-out-of-range": (lambda d, t: _train(_mnist_label_12(d)), "out of range"),
    "cifar-label-out-of-range": (lambda d, t: _train(_cifar_label_10(d)), "out of range"),
    "lr-negative": (lambda d, t: _over("train.lr=-1"), "train.lr"),
    "lr-nan": (lambda d, t: _over("lr=.nan"), "train.lr"),
    "steps-zero": (lambda d, t: _over("train.steps=0"), "train.steps"),
    "steps-flag-zero": (lambda d, t: _train("ring", "--steps", 0), "train.steps"),
    "batch-size-flag-zero": (lambda d, t: _train("ring", "--batch-size", 0), "batch_size"),
    "seed-negative": (lambda d, t: _train("ring", "--seed", -1), "train.seed"),
    "steps-too-big": (lambda d, t: _over("train.steps=" + "9" * 30), "train.steps"),
    "ema-wrong-type": (lambda d, t: _over("train.ema=foo"), "train.ema"),
    "ema-out-of-range": (lambda d, t: _over("train.ema=[0.9, 1.5]"), "train.ema"),
    "dropout-out-of-range": (lambda d, t: _over("model.dropout=2"), "model.dropout"),
    "hidden-zero": (lambda d, t: _over("model.hidden=0"), "model.hidden"),
    "channel-mult-wrong-type": (lambda d, t: _over("model.channel_mult=[1, x]"), "model.channel_mult"),
    "device-unknown": (lambda d, t: _over("train.device=tpu"), "train.device"),
    "p-std-negative": (lambda d, t: _over("p_std=-1"), "p_std"),
    "sigma-min-above-max": (lambda d, t: _over("sigma_min=100"), "sigma_min"),
    "max-k-too-large": (lambda d, t: _distill("ctm.max_k=100"), "ctm.max_k"),
    "target-ema-one": (lambda d, t: _distill("ctm.target_ema=1"), "ctm.target_ema"),
    "huber-c-negative": (lambda d, t: _distill("ctm.huber_c=-1"), "ctm.huber_c"),
    "disc-hidden-zero": (lambda d, t: _distill("ctm.disc_hidden=0"), "ctm.disc_hidden"),
    "unknown-ctm-key": (lambda d, t: _distill("ctm.nope=1"), "ctm.nope"),
    "config-file-unknown-key": (lambda d, t: _over("--config", _config_file(d, "train:\n  foo: 1\n")), "train.foo"),
    "unknown-key-typo": (lambda d, t: _distill("ctm.gan_strat=3"), "did you mean ctm.gan_start?"),
    "config-file-unclosed-list": (lambda d, t: _over("--config", _config_file(d, "train:\n  lr: [1, 2\n  steps: 3\n")),
                                  "at line 3, column 8"),
    "config-file-section-not-mapping": (lambda d, t: _over("--config", _config_file(d, "train: 5\n"),
                                                           "train.steps=3"), "train"),
    "config-file-wrong-type": (lambda d, t: _over("--config", _config_file(d, "train: {lr: [1]}\n")),
                               "train.lr"),
    "config-file-binary": (lambda d, t: _over("--config", _config_file(d, b"\xff\xfe\x00\x81 garbage")), "YAML"),
    "config-file-bad-date": (lambda d, t: _over("--config", _config_file(d, "data: 2024-13-45\n")), "YAML"),
    "override-not-key-value": (lambda d, t: _over("steps"), "key=value"),
    "teacher-shape-mismatch": (lambda d, t: ["distill", "--teacher", t, "--data",
                                             _npy(d, np.random.default_rng(0).normal(size=(50, 3))),
                                             *TINY], "shape"),
    "teacher-not-a-run": (lambda d, t: (d / "x").mkdir() or ["distill", "--teacher", d / "x", "--data", "ring",
                                                              *TINY, *MLP], "model.json"),
    "teacher-is-a-json-file": (lambda d, t: ["distill", "--teacher", t / "model.json", "--data", "ring",
                                             *TINY, *MLP], "model.json"),
    "sample-nfe-negative": (lambda d, t: ["sample", "--model", t, "--nfe", -1, "--out", "s.npz"], "--nfe"),
    "sample-gamma-negative": (lambda d, t: _sample(t, "--gamma", -0.1), "--gamma"),
    "sample-gamma-nan": (lambda d, t: _sample(t, "--gamma", "nan"), "--gamma"),
    "sample-out-parent-is-a-file": (lambda d, t: (d / "f").write_text("x") and _sample(t, out=d / "f" / "s.npz"),
                                    "not a folder"),
    "sample-out-wrong-suffix": (lambda d, t: _sample(t, out=d / "s.txt"), ".npz"),
    "eval-out-parent-is-a-file": (lambda d, t: (d / "f").write_text("x") and [
        "eval", "--model", t, "--data", "ring", "--heun", "2", "--n", 8, "--out", d / "f" / "e.json"], "not a folder"),
    "eval-ref-is-an-npy-of-images": (lambda d, t: _eval_ref(t, _npy(d, np.zeros((4, 8, 8), np.uint8)), d),
                                     "fid-ref --data"),
    "eval-ref-npz-without-mu-sigma": (lambda d, t: _eval_ref(t, _npz_labels(d, [0, 1, 2]), d), "not mu and sigma"),
    "eval-ref-text-file": (lambda d, t: _eval_ref(t, _config_file(d, "mu: 1\n"), d), "not a NumPy file"),
    "eval-ref-folder": (lambda d, t: _eval_ref(t, d, d), "directory"),
    "sample-out-is-a-folder": (lambda d, t: (d / "s.npz").mkdir() or _sample(t, out=d / "s.npz"), "directory"),
    "nll-shape-mismatch": (lambda d, t: ["nll", "--model", t, "--data", _npy(d, np.zeros((8, 3), np.float32)),
                                         "--n", 4], "shape"),
    "train-out-under-a-file": (lambda d, t: (d / "f").write_text("x") and [*_train("ring"), "--out", d / "f" / "r"],
                               "not a directory"),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_bad_cli_input_gives_one_line_and_writes_nothing(case, teacher, tmp_path):
    make, keyword = BAD_CLI[case]
    argv = [str(a) for a in make(tmp_path, teacher)]
    if argv[0] in ("train-teacher", "distill") and "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    argv = [str(tmp_path / a) if a in ("s.npz",) else a for a in argv]
    before = files_under(tmp_path)
    one_line_error(argv, keyword)
    assert files_under(tmp_path) == before, "a failed command left files behind"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder(teacher, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_error(_sample(teacher, out=ro / "s.npz"), "not writable")
        one_line_error([*_train("ring"), "--out", ro / "run"], "ro")
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """atomic_write_bytes: a failure while writing leaves neither the target nor a temp file behind."""
    from ctmkit.io import atomic

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        atomic.atomic_write_bytes(tmp_path / "x.npz", b"data" * 1000)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", 1, _state(1))
    assert files_under(tmp_path) == {"ck"}


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    """Outputs (samples, checkpoints, reports) follow the umask like open() would, not mkstemp's private 0600."""
    from ctmkit.io import atomic

    old = os.umask(0o027)
    try:
        atomic.atomic_write_text(tmp_path / "a.json", "{}")
        save_checkpoint(tmp_path / "ck", 1, _state(1))
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    want = (tmp_path / "plain").stat().st_mode & 0o777
    assert want == 0o640
    for f in [tmp_path / "a.json", *(tmp_path / "ck").iterdir()]:
        assert f.stat().st_mode & 0o777 == want, f


# ---- 4. property tests: readers and the config parser fail only with UserError ------------------------------
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _loads_or_user_error(spec: Path) -> None:
    try:
        x = load_data(str(spec)).x     # image files decode when read: a corrupt one fails here
    except UserError as e:
        assert len(str(e).splitlines()) == 1, repr(str(e))
        return
    assert torch.isfinite(x).all() and x.shape[0] >= 1


_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_BYTES = st.one_of(st.binary(max_size=300),
                   st.binary(max_size=200).map(lambda b: _NPY_MAGIC + b),
                   st.binary(max_size=200).map(lambda b: b"PK\x03\x04" + b),
                   st.binary(max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b))


@PROPS
@given(content=_BYTES, suffix=st.sampled_from([".npy", ".npz"]))
def test_random_bytes_as_npy_or_npz(content, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"d{suffix}"
        p.write_bytes(content)
        _loads_or_user_error(p)


def _mutate(blob: bytes, data) -> bytes:
    """A valid file with a few bytes flipped and/or cut short."""
    b = bytearray(blob)
    for _ in range(data.draw(st.integers(0, 4))):
        b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    return bytes(b[:data.draw(st.integers(0, len(b)))])


@PROPS
@given(data=st.data())
def test_mutated_npy_npz_and_png_files(data):
    import io

    from PIL import Image
    a = np.random.default_rng(0).normal(size=(6, 4, 4)).astype(np.float32)
    buf = io.BytesIO()
    kind = data.draw(st.sampled_from(["npy", "npz", "png"]))
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "npy":
            np.save(buf, a)
            p = Path(tmp) / "d.npy"
        elif kind == "npz":
            np.savez(buf, x=a, labels=np.arange(6) % 2)
            p = Path(tmp) / "d.npz"
        else:
            Image.fromarray((a[0] * 40 + 128).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
            (Path(tmp) / "imgs").mkdir()
            p = Path(tmp) / "imgs" / "a.png"
        p.write_bytes(_mutate(buf.getvalue(), data))
        _loads_or_user_error(p if kind != "png" else p.parent)


_ARRAY_DTYPES = st.sampled_from([np.uint8, np.int8, np.int32, np.uint16, np.float16, np.float32, np.float64,
                                 np.bool_])


@PROPS
@given(x=hnp.arrays(_ARRAY_DTYPES, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)),
       labels=st.one_of(st.none(), hnp.arrays(st.sampled_from([np.int64, np.int8, np.float32, np.uint8]),
                                              hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=5))),
       key=st.sampled_from(["x", "data", "images", "samples", "other"]))
def test_random_arrays_and_labels_in_npz(x, labels, key):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "d.npz"
        np.savez(p, **{key: x}, **({} if labels is None else {"labels": labels}))
        _loads_or_user_error(p)


@PROPS
@given(images=st.lists(st.tuples(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I", "F", "LA", "CMYK"]),
                                 st.integers(1, 5), st.integers(1, 5), st.sampled_from(["PNG", "BMP", "GIF"]),
                                 st.integers(0, 2)),
                       min_size=1, max_size=4))
def test_random_image_folders(images):
    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imgs"
        for i, (mode, w, h, fmt, cls) in enumerate(images):
            ext = {"PNG": ".png", "BMP": ".bmp", "GIF": ".gif"}[fmt]
            path = root / f"c{cls}" / f"{i}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = Image.new(mode, (w, h))
            try:
                img.save(path, format=fmt)
            except (OSError, ValueError, KeyError):  # a mode this format cannot store: write bytes anyway
                path.write_bytes(bytes(range(w * h)))
        _loads_or_user_error(root)


@PROPS
@given(magic=st.sampled_from([2051, 2049, 0, -1]), dims=st.lists(st.integers(-2, 2 ** 31 - 1), min_size=3,
                                                                 max_size=3),
       small=st.lists(st.integers(0, 5), min_size=3, max_size=3), use_small=st.booleans(),
       payload=st.binary(max_size=200), gz=st.booleans(), labels=st.one_of(st.none(), st.binary(max_size=20)))
def test_random_mnist_idx_files(magic, dims, small, use_small, payload, gz, labels):
    dims = small if use_small else dims
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw = np.array([magic, *dims], ">i4").tobytes() + payload
        name = "train-images-idx3-ubyte" + (".gz" if gz else "")
        (folder / name).write_bytes(gzip.compress(raw) if gz else raw)
        if labels is not None:
            (folder / "train-labels-idx1-ubyte").write_bytes(np.array([2049, dims[0]], ">i4").tobytes() + labels)
        _loads_or_user_error(folder)


_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=5),
                  st.binary(max_size=5))
_PICKLED = st.recursive(_LEAF, lambda c: st.one_of(st.lists(c, max_size=3), st.tuples(c, c),
                                                   st.dictionaries(st.sampled_from([b"data", b"labels", "data",
                                                                                    "labels", 1]), c, max_size=3)),
                        max_leaves=8)


@PROPS
@given(obj=_PICKLED, n=st.integers(0, 3), dtype=st.sampled_from([np.uint8, np.float32, np.int64]),
       width=st.sampled_from([3072, 3071, 10]), labels=_PICKLED, raw=st.one_of(st.none(), st.binary(max_size=100)),
       protocol=st.sampled_from([2, pickle.HIGHEST_PROTOCOL]))
def test_random_cifar_batches(obj, n, dtype, width, labels, raw, protocol):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if raw is not None:
            blob = raw
        elif isinstance(obj, dict) and n % 2:  # a plausible batch with random parts
            blob = pickle.dumps({b"data": np.zeros((n, width), dtype), b"labels": labels}, protocol=protocol)
        else:
            blob = pickle.dumps(obj, protocol=protocol)
        (folder / "data_batch_1").write_bytes(blob)
        _loads_or_user_error(folder)


def _config_or_user_error(cls, **kw) -> None:
    try:
        cfg = load_config(cls, **kw)
    except UserError as e:
        assert len(str(e).splitlines()) == 1, repr(str(e))
        return
    assert isinstance(cfg, cls)


_KEYS = sorted(set(valid_keys(DistillConfig)) | set(valid_keys(TeacherConfig)))
_YAML_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=6),
                       st.dates())
_YAML_KEY = st.one_of(st.sampled_from(sorted({k.split(".")[0] for k in _KEYS} | {k.split(".")[-1] for k in _KEYS})),
                      st.text(max_size=4), st.integers(-3, 3), st.none())
_YAML_DOC = st.recursive(_YAML_LEAF, lambda c: st.one_of(st.lists(c, max_size=3),
                                                         st.dictionaries(_YAML_KEY, c, max_size=4)), max_leaves=12)


@PROPS
@given(doc=st.one_of(_YAML_DOC, st.dictionaries(_YAML_KEY, _YAML_DOC, max_size=4)),
       text=st.one_of(st.none(), st.text(max_size=80), st.binary(max_size=40)),
       cls=st.sampled_from([TeacherConfig, DistillConfig]),
       overrides=st.lists(st.sampled_from(["train.steps=3", "model.hidden=8", "ctm.max_k=2"]), max_size=2))
def test_random_yaml_config_files(doc, text, cls, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.yaml"
        if text is None:
            p.write_text(yaml.safe_dump(doc))
        else:
            p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        _config_or_user_error(cls, config_file=str(p), overrides=list(overrides))


_VALUE_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(
    ["-1", "0", "1e999", ".nan", "-.inf", "[1, 2]", "[]", "{a: 1}", "true", "null", "2024-13-45", "2024-01-01",
     "0x10", "1_000", "'x'", "[[[", "&a [*a]", "!!python/object:os.system", "9" * 40, "~", "[0.9, 0.99]"]))


@PROPS
@given(items=st.lists(st.one_of(st.text(max_size=20),
                                st.tuples(st.one_of(st.sampled_from(_KEYS + [k.split(".")[-1] for k in _KEYS]),
                                                    st.text(max_size=8)), _VALUE_TEXT).map("=".join)),
                      max_size=3),
       cls=st.sampled_from([TeacherConfig, DistillConfig]),
       flags=st.dictionaries(st.sampled_from(["train.steps", "train.batch_size", "train.seed", "data"]),
                             st.one_of(st.none(), st.integers(-5, 2 ** 64), st.text(max_size=5)), max_size=2))
def test_random_key_value_overrides(items, cls, flags):
    _config_or_user_error(cls, overrides=items, **flags)


# ---- 5. checkpoints never run code ------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command that creates `marker` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _disguise(path: Path, blob: bytes) -> Path:
    """Write `blob` as a checkpoint file with a matching SHA-256 sidecar (what an attacker can do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    path.with_suffix(".json").write_text(json.dumps({"step": 1, "sha256": hashlib.sha256(blob).hexdigest(),
                                                     "file": path.name}))
    return path


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_payload_checkpoint_is_refused_and_never_executed(how, teacher, tmp_path):
    marker = tmp_path / "pwned"
    obj = {"nets": {"ema0": _Payload(marker)}, "step": 1}
    if how == "pickle":
        blob = pickle.dumps(obj)
    else:
        import io
        buf = io.BytesIO()
        torch.save(obj, buf)
        blob = buf.getvalue()
    run = tmp_path / "evil"
    run.mkdir()
    shutil.copy(teacher / "model.json", run / "model.json")
    ckpt = _disguise(run / "checkpoints" / "ckpt-00000001.safetensors", blob)
    with pytest.raises(UserError, match="not a ctmkit safetensors checkpoint") as e:
        load_checkpoint(ckpt)
    assert "\n" not in str(e.value)
    assert load_latest(run / "checkpoints") is None
    out = tmp_path / "s.npz"
    one_line_error(["sample", "--model", ckpt, "--n", 2, "--out", out], "not a ctmkit safetensors checkpoint")
    one_line_error(["sample", "--model", run, "--n", 2, "--out", out], "only broken checkpoints (newest: check")
    one_line_error(["distill", "--teacher", run, "--data", "ring", "--out", tmp_path / "d", *TINY, *MLP],
                   "not a ctmkit safetensors checkpoint")
    pt = _disguise(tmp_path / "model.pt", blob)  # a .pt file given as the model
    one_line_error(["sample", "--model", pt, "--n", 2, "--out", out], "not a ctmkit safetensors checkpoint")
    pt.with_suffix(".json").unlink()
    one_line_error(["sample", "--model", pt, "--n", 2, "--out", out], "incomplete")
    assert not marker.exists(), "the pickle payload was executed"
    assert not out.exists()


def test_crafted_safetensors_with_malformed_state_is_refused(teacher, tmp_path):
    from safetensors.torch import save as st_save
    run = tmp_path / "r"
    shutil.copytree(teacher, run)
    ckpts = run / "checkpoints"
    for p in ckpts.iterdir():
        p.unlink()
    cases = {"dangling tensor": {"__t__": "nope"}, "not a dict": {"__l__": [1, 2]},
             "unhashable key": {"__d__": [[{"__l__": []}, 1]]}, "no nets": {"__d__": [["step", 1]]}}
    for i, (what, skeleton) in enumerate(cases.items(), 1):
        blob = st_save({"x": torch.zeros(2)}, metadata={"ctmkit_state": json.dumps(skeleton)})
        path = _disguise(ckpts / f"ckpt-{i:08d}.safetensors", blob)
        if what == "no nets":
            one_line_error(["sample", "--model", path, "--n", 2, "--out", tmp_path / "s.npz"], "EMA")
        else:
            with pytest.raises(UserError, match="malformed state"):
                load_checkpoint(path)
    # weights that do not fit model.json (e.g. copied from another run): one line, not a RuntimeError dump
    other = {"nets": {"ema0": {"net.inp.weight": torch.zeros(3, 3)}}, "step": 1}
    path = save_checkpoint(ckpts, 9, other)
    one_line_error(["sample", "--model", path, "--n", 2, "--out", tmp_path / "s.npz"], "do not fit")
    (run / "model.json").write_text(json.dumps({"kind": "ctm"}))
    one_line_error(["sample", "--model", path, "--n", 2, "--out", tmp_path / "s.npz"], "malformed")


_UNSAFE = [
    (re.compile(r"\btorch\.load\("), "weights_only=True", "torch.load without weights_only=True"),
    (re.compile(r"\bpickle\.(load|loads)\("), None, "pickle.load outside RestrictedUnpickler"),
    (re.compile(r"\bnp\.load\("), "allow_pickle=False", "np.load without allow_pickle=False"),
    (re.compile(r"\byaml\.(load|unsafe_load|full_load)\("), None, "yaml.load (use yaml.safe_load)"),
    (re.compile(r"\b(marshal|dill|joblib|cloudpickle|shelve)\b"), None, "another code-running deserialiser"),
    # TorchScript only for the FID Inception network, a file inside an installed package (never a user path)
    (re.compile(r"\btorch\.jit\.load\("), "inception_path()", "torch.jit.load of a user-supplied file"),
    (re.compile(r"\btorch\.hub\."), None, "torch.hub (downloads and runs code)"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), None, "eval/exec"),
]


def test_source_never_deserialises_code():
    """Grep: no torch.load without weights_only=True, no pickle.load outside the restricted unpickler, ..."""
    found = []
    for path in sorted((ROOT / "ctmkit").rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split("#", 1)[0]
            for pattern, required, what in _UNSAFE:
                if pattern.search(code):
                    call = " ".join(lines[i:i + 3])  # the call may continue on the next lines
                    if required is None or required not in call:
                        found.append(f"{path.relative_to(ROOT)}:{i + 1}: {what}: {line.strip()}")
    assert not found, "\n".join(found)
    readers = (ROOT / "ctmkit" / "data" / "readers.py").read_text()
    assert "RestrictedUnpickler(f, encoding=\"bytes\").load()" in readers
