"""A short CTM distillation with the exact teacher learns the true flow map G*(x_t, t, s)."""

import json
import math

import torch

from ctmkit.config import DistillConfig, load_config
from ctmkit.data import load_data
from ctmkit.eval.diagnostics import flow_map_error
from ctmkit.train.ctm import CTMRun


def test_distillation_with_exact_teacher_approaches_the_true_flow_map(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(DistillConfig, None, None, ["model.hidden=128", "model.depth=3", "ctm.gan=false", "lr=1e-3",
                                                  "train.ema=[0.99]", "ctm.target_ema=0.99", "log_every=50"],
                      data="ring", teacher="exact", **{"train.steps": 600, "train.batch_size": 128})
    data = load_data("ring")
    run = CTMRun(cfg, tmp_path / "ctm", data)
    before = flow_map_error(run.net, data.mixture)
    run.fit(progress=False)
    after = flow_map_error(run.emas[0], data.mixture)
    assert after < before / 2.5, (before, after)  # measured: 0.293 -> 0.090 (3.3x) at 600 steps


def test_teacher_free_and_ablation_variants_train(tmp_path):
    """Self-learn mode (no teacher: x_u from the target network) and the DSM/GAN switches run and log their terms."""
    data = load_data("ring")
    for name, over in {"selflearn": ["ctm.teacher_free=true"], "nodsm": ["ctm.dsm=false"],
                       "fixed": ["ctm.dsm_weight=0.5", "ctm.gan_weight=0.1", "ctm.gan_start=2"]}.items():
        cfg = load_config(DistillConfig, None, None, ["model.hidden=16", "model.depth=1", "log_every=1", *over],
                          data="ring", teacher="exact", **{"train.steps": 4, "train.batch_size": 32})
        CTMRun(cfg, tmp_path / name, data).fit(progress=False)
        last = json.loads((tmp_path / name / "stats.jsonl").read_text().splitlines()[-1])
        assert all(math.isfinite(v) for v in last.values())
        assert ("loss_dsm" in last) == (name != "nodsm")
        if name == "fixed":
            assert last["lambda_dsm"] == 0.5 and "loss_d" in last


def test_student_starts_as_the_teacher_weight_for_weight(tmp_path):
    from ctmkit import load_model
    from ctmkit.config import TeacherConfig
    from ctmkit.core.precond import ctm_jump
    from ctmkit.train.teacher import TeacherRun
    data = load_data("moons")
    tcfg = load_config(TeacherConfig, None, None, ["model.hidden=32", "model.depth=2"], data="moons",
                       **{"train.steps": 5, "train.batch_size": 32})
    TeacherRun(tcfg, tmp_path / "t", data).fit(progress=False)
    teacher = load_model(tmp_path / "t")
    dcfg = load_config(DistillConfig, None, None, [], data="moons", teacher=str(tmp_path / "t"),
                       **{"train.steps": 1, "train.batch_size": 32})
    student = CTMRun(dcfg, tmp_path / "c", data).net.eval()
    x, t = torch.randn(64, 2), torch.rand(64) * 10 + 0.01
    with torch.no_grad():
        assert torch.allclose(student.denoise(x, t), teacher(x, t), atol=1e-6)
        # with s ignored at init, the jump is the teacher's one-step (DDIM) jump
        assert torch.allclose(student(x, t, t / 3), ctm_jump(x, t, t / 3, teacher(x, t)), atol=1e-5)
    assert torch.count_nonzero(student.backbone.s_embed.fc2.weight) == 0
