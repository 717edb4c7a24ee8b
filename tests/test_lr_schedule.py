"""Learning-rate schedules (train.lr_schedule): the pure factor, what a run applies, and exact resumption."""

from __future__ import annotations

import math

import pytest
import torch

from ctmkit.core.schedules import lr_factor


def test_each_schedule_has_its_shape():
    assert [lr_factor(s, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, 100, warmup=10) for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    cos = [lr_factor(s, 110, warmup=10, schedule="cosine", final=0.02) for s in range(110)]
    assert cos[9] == 1.0 and cos[10] == 1.0 and cos[-1] == pytest.approx(0.02 + 0.98 * 0.5 * (1 + math.cos(
        math.pi * 99 / 100)), rel=1e-12)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))                      # decreasing after the warm-up
    assert cos[60] == pytest.approx(0.51, rel=1e-12)                             # half way: the mean of 1 and 0.02
    inv = [lr_factor(s, 10000, schedule="inv_sqrt", ref_steps=100) for s in (0, 100, 400, 2500)]
    assert inv == [1.0, 1.0, 0.5, 0.2]
    with pytest.raises(ValueError, match="unknown"):
        lr_factor(0, 10, schedule="step")


def stop_at(run, step: int) -> None:
    """Run `run` as if interrupted by a signal after `step` steps (it checkpoints and refuses to go on)."""
    from ctmkit.errors import UserError
    one_step = run._step

    def step_then_maybe_stop():
        stats = one_step()
        run._stop = run.step >= step
        return stats
    run._step = step_then_maybe_stop
    with pytest.raises(UserError, match=f"interrupted at step {step}"):
        run.fit(progress=False)


def _distill(out, steps, extra=()):
    from ctmkit.config import DistillConfig, load_config
    from ctmkit.data import load_data
    from ctmkit.train.ctm import CTMRun
    cfg = load_config(DistillConfig, None, None, ["model.hidden=16", "model.depth=1", "ctm.gan_start=8",
                                                  "ckpt_every=16", "train.lr_schedule=cosine", "train.lr_final=0.1",
                                                  "train.warmup=4", *extra],
                      data="ring", teacher="exact", **{"train.steps": steps, "train.batch_size": 32})
    return CTMRun(cfg, out, load_data("ring"))


def test_a_run_applies_the_schedule_to_every_optimiser_and_resumes_on_the_same_curve(tmp_path):
    from ctmkit.io.checkpoint import load_latest
    run = _distill(tmp_path / "a", 32, ["ctm.gan_lr=2e-4", "ctm.disc_lr=1e-3"])
    run.fit(progress=False)
    last = lr_factor(31, 32, 4, "cosine", 0.1)                   # the factor of the last step (0-based 31)
    assert run.opts["opt"].param_groups[0]["lr"] == pytest.approx(2e-4 * last, rel=1e-12)    # GAN stage's lr
    assert run.opts["disc_opt"].param_groups[0]["lr"] == pytest.approx(1e-3 * last, rel=1e-12)
    stop_at(_distill(tmp_path / "b", 32, ["ctm.gan_lr=2e-4", "ctm.disc_lr=1e-3"]), 16)
    resumed = _distill(tmp_path / "b", 32, ["ctm.gan_lr=2e-4", "ctm.disc_lr=1e-3"])
    resumed.resume = True
    resumed.fit(progress=False)
    a, b = load_latest(tmp_path / "a" / "checkpoints")[0], load_latest(tmp_path / "b" / "checkpoints")[0]
    assert a["step"] == b["step"] == 32
    for net in a["nets"]:                                         # same code, same machine: bitwise
        assert all(torch.equal(v, b["nets"][net][k]) for k, v in a["nets"][net].items()), net
