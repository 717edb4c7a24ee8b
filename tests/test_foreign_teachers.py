"""Foreign teachers (docs/method.md section 7) on tiny random models built here (nothing downloads): a diffusers
pipeline folder read in the EDM convention must reproduce the scheduler's own deterministic loop exactly (DDIM with
eta = 0 and the flow-matching Euler loop are the Euler method of the PF-ODE on the scheduler's sigmas), the student
starts as the teacher, and `py:` teachers load the user's own denoiser."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ctmkit import load_teacher, solve_pf_ode
from ctmkit.core.precond import CTM, vp_sigmas
from ctmkit.errors import UserError

diffusers = pytest.importorskip("diffusers")


def tiny_unet(channels: int = 1, classes: int | None = None, out_channels: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=out_channels or channels, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=classes)
    with torch.no_grad():                 # a random but clearly non-trivial network
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def save_pipeline(folder, unet, scheduler):
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    return folder


def ddim(prediction: str, beta_schedule: str = "linear"):
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, clip_sample=False,
                                   set_alpha_to_one=True, prediction_type=prediction)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("classes", [None, 3])
def test_euler_on_the_teacher_is_the_ddim_loop(tmp_path, prediction, classes):
    unet, sched = tiny_unet(classes=classes), ddim(prediction)
    folder = save_pipeline(tmp_path, unet, sched)
    teacher = load_teacher(f"diffusers:{folder}")
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 1]) if classes else None
    x_vp = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(x_vp, t, class_labels=labels).sample
            x_vp = sched.step(out, t, x_vp, eta=0.0).prev_sample
    sig = vp_sigmas(sched.alphas_cumprod)[sched.timesteps.long()]
    sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    ours = solve_pf_ode(teacher, x * float((1 + sig[0] ** 2).sqrt()), sigmas, "euler", labels)
    err = float((ours - x_vp).abs().max())
    assert err < 5e-6 * max(1.0, float(x_vp.abs().max())), err   # float32 round-off: measured <= 3e-6
    card = teacher.card
    assert card.shape == (1, 8, 8) and card.num_classes == (classes or 0)
    assert card.sigma_min == pytest.approx(float(vp_sigmas(sched.alphas_cumprod)[0]))
    assert 150 < card.sigma_max < 160          # a linear-beta DDPM with 1000 steps spans about 0.01 to 157


def test_euler_on_the_teacher_is_the_flow_matching_loop(tmp_path):
    unet = tiny_unet(channels=3)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    folder = save_pipeline(tmp_path, unet, sched)
    teacher = load_teacher(f"diffusers:{folder}")
    sched.set_timesteps(sigmas=np.linspace(0.995, 0.02, 12))
    taus = sched.sigmas.double()                                  # ends with 0
    g = torch.Generator().manual_seed(2)
    x_f = torch.randn(3, 3, 8, 8, generator=g) * float(taus[0])
    start = x_f.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x_f = sched.step(unet(x_f, t).sample, t, x_f).prev_sample
    sigmas = taus / (1 - taus)
    ours = solve_pf_ode(teacher, start / float(1 - taus[0]), sigmas, "euler")
    err = float((ours - x_f).abs().max())
    assert err < 5e-6 * max(1.0, float(x_f.abs().max())), err
    assert teacher.card.sigma_max == pytest.approx(199.0)


def test_learned_variance_uses_the_first_channels(tmp_path):
    unet, sched = tiny_unet(out_channels=2), ddim("epsilon")
    teacher = load_teacher(f"diffusers:{save_pipeline(tmp_path, unet, sched)}")
    x, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 3.0)
    t = teacher.precond.noise(sigma)
    with torch.no_grad():
        eps = unet(x / (1 + 9) ** 0.5, t).sample[:, :1]
    assert torch.allclose(teacher(x, sigma), x - 3.0 * eps, atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow"])
def test_student_starts_as_the_teacher(tmp_path, kind):
    sched = ddim(kind) if kind != "flow" else diffusers.FlowMatchEulerDiscreteScheduler()
    teacher = load_teacher(f"diffusers:{save_pipeline(tmp_path, tiny_unet(classes=3), sched)}")
    student = CTM(teacher.card.backbone.build(), 0.5, teacher.precond)
    missing = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not missing.unexpected_keys and not missing.missing_keys
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 2, 1, 0])
    t = torch.tensor([0.5, 3.0, 20.0, 100.0])
    with torch.no_grad():
        want = teacher(x, t, labels)
        for s in (t, t / 2, torch.full_like(t, 0.02)):
            assert torch.equal(student.g(x, t, s, labels), want)


def test_bad_diffusers_folders_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="unet/ and scheduler/"):
        load_teacher(f"diffusers:{tmp_path}")
    folder = save_pipeline(tmp_path / "p", tiny_unet(), diffusers.EulerAncestralDiscreteScheduler(
        prediction_type="epsilon"))
    load_teacher(f"diffusers:{folder}")                # any alphas_cumprod scheduler is a VP teacher
    cfg = (folder / "scheduler" / "scheduler_config.json")
    cfg.write_text(cfg.read_text().replace("EulerAncestralDiscreteScheduler", "NoSuchScheduler"))
    with pytest.raises(UserError, match="unknown scheduler class 'NoSuchScheduler'"):
        load_teacher(f"diffusers:{folder}")


PY_TEACHER = '''
import torch
class Shrink(torch.nn.Module):
    sigma_min, sigma_max, shape = 0.01, 50.0, (2,)
    def forward(self, x, sigma, labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        return x * 0.25 / (s ** 2 + 0.25)
def make():
    return Shrink()
'''


def test_py_teacher_loads_the_users_denoiser(tmp_path, monkeypatch):
    (tmp_path / "my_teacher_mod.py").write_text(PY_TEACHER)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        teacher = load_teacher("py:my_teacher_mod:make")
        assert (teacher.sigma_min, teacher.sigma_max, teacher.shape) == (0.01, 50.0, (2,))
        x = torch.randn(3, 2)
        assert torch.allclose(teacher(x, torch.full((3,), 1.0)), x * 0.2)
        for bad, says in [("py:nope_mod:make", "cannot import module"), ("py:my_teacher_mod:nothing", "no attribute"),
                          ("py:my_teacher_mod", "py:MODULE:ATTR")]:
            with pytest.raises(UserError, match=says):
                load_teacher(bad)
    finally:
        sys.modules.pop("my_teacher_mod", None)


@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_distillation_starts_the_student_as_the_teacher(tmp_path, kind):
    from ctmkit.config import DistillConfig, load_config
    from ctmkit.data import load_data
    from ctmkit.train.ctm import CTMRun
    sched = ddim(kind) if kind != "flow" else diffusers.FlowMatchEulerDiscreteScheduler()
    folder = save_pipeline(tmp_path / "pipe", tiny_unet(classes=10), sched)
    cfg = load_config(DistillConfig, None, None, ["ctm.gan=false"], data="digits", teacher=f"diffusers:{folder}",
                      **{"train.steps": 1, "train.batch_size": 4})
    run = CTMRun(cfg, tmp_path / "ctm", load_data("digits", n=64))
    assert (cfg.sigma_min, cfg.sigma_max) == (run.teacher.card.sigma_min, run.teacher.card.sigma_max)
    assert run.spec.arch == "diffusers_unet2d" and run.model_card().precond == run.teacher.card.precond
    x, labels, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 5, 9]), torch.tensor([0.05, 2.0, 60.0])
    with torch.no_grad():
        assert torch.equal(run.net.g(x, t, t / 3, labels), run.teacher(x, t, labels))


# epsilon runs by default; the other forms' conversions are checked in-process above, their CLI runs (20-30 s each)
# are marked slow to keep the default suite under 10 minutes
@pytest.mark.parametrize("kind", ["epsilon", *(pytest.param(k, marks=pytest.mark.slow)
                                              for k in ("v_prediction", "sample", "flow"))])
def test_cli_distills_and_samples_a_diffusers_teacher(tmp_path, kind):
    from .test_cli import ctmkit, ok
    sched = ddim(kind) if kind != "flow" else diffusers.FlowMatchEulerDiscreteScheduler()
    folder = save_pipeline(tmp_path / "pipe", tiny_unet(classes=10), sched)
    spec = f"diffusers:{folder}"
    ok(ctmkit("distill", "--teacher", spec, "--data", "digits", "--out", tmp_path / "ctm", "--steps", "2",
              "--batch-size", "8", "--quiet", cwd=tmp_path))
    import json

    import yaml
    cfg = yaml.safe_load((tmp_path / "ctm" / "config.yaml").read_text())
    card = load_teacher(spec).card
    assert (cfg["sigma_min"], cfg["sigma_max"]) == (card.sigma_min, card.sigma_max)
    want = "flow" if kind == "flow" else "vp"
    student = json.loads((tmp_path / "ctm" / "model.json").read_text()).get("precond")   # epsilon: EDM's form (auto)
    assert (student is None) if kind == "epsilon" else student["kind"] == want
    assert card.precond["kind"] == want and (kind == "flow" or 0.0099 < card.sigma_min < 0.0101)
    for i, (model, extra) in enumerate([(tmp_path / "ctm", ["--nfe", "2"]), (spec, ["--nfe", "9"])]):
        ok(ctmkit("sample", "--model", model, "--n", "10", *extra, "--labels", "3", "--out", tmp_path / f"s{i}.npz",
                  "--quiet", cwd=tmp_path))
        assert np.load(tmp_path / f"s{i}.npz")["samples"].shape[0] == 10
    if kind != "epsilon":
        return
    r = ctmkit("distill", "--teacher", spec, "--data", "ring", "--out", tmp_path / "bad", "--steps", "1", "--quiet",
               cwd=tmp_path)
    assert r.returncode != 0 and "shape (1, 8, 8)" in r.stderr and "Traceback" not in r.stderr


def test_a_diffusers_spec_without_diffusers_is_one_clear_error(tmp_path, monkeypatch):
    folder = save_pipeline(tmp_path, tiny_unet(), ddim("epsilon"))
    monkeypatch.setitem(sys.modules, "diffusers", None)          # as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'ctmkit\[diffusers\]'"):
        load_teacher(f"diffusers:{folder}")


def test_cli_distills_a_py_teacher_into_a_ctmkit_network(tmp_path):
    from .test_cli import MLP, ctmkit, ok
    (tmp_path / "my_teacher_mod.py").write_text(PY_TEACHER)
    r = ok(ctmkit("distill", "--teacher", "py:my_teacher_mod:make", "--data", "ring", "--out", tmp_path / "ctm",
                  "--steps", "2", "--batch-size", "8", *MLP, cwd=tmp_path))
    assert "cannot extend" in r.stderr and "using the teacher's sigma range [0.01, 50]" in r.stderr
    ok(ctmkit("sample", "--model", tmp_path / "ctm", "--n", "5", "--out", tmp_path / "s.npz", "--quiet", cwd=tmp_path))


def test_student_in_edm_form_keeps_the_teachers_weights(tmp_path):
    """ctm.student_precond=edm: the student takes EDM's preconditioning (the reference's CIFAR-10 student of a VP
    teacher), with the teacher's weights copied and no `precond` in its card."""
    from ctmkit.config import DistillConfig, load_config
    from ctmkit.data import load_data
    from ctmkit.train.ctm import CTMRun
    folder = save_pipeline(tmp_path / "pipe", tiny_unet(classes=10), ddim("epsilon"))
    cfg = load_config(DistillConfig, None, None, ["ctm.gan=false", "ctm.student_precond=edm"], data="digits",
                      teacher=f"diffusers:{folder}", **{"train.steps": 2, "train.batch_size": 4})
    run = CTMRun(cfg, tmp_path / "ctm", load_data("digits", n=64))
    assert run.model_card().precond is None and run.spec.arch == "diffusers_unet2d"
    teacher_sd = run.teacher.state_dict()
    assert all(torch.equal(v, teacher_sd[k]) for k, v in run.net.state_dict().items() if k in teacher_sd)
    run.fit(progress=False)
    with pytest.raises(UserError, match="student_precond"):
        load_config(DistillConfig, None, None, ["ctm.student_precond=vp"])


@pytest.mark.parametrize("prediction,form", [("epsilon", "edm"), ("v_prediction", "teacher"), ("sample", "teacher")])
def test_auto_student_form_is_edm_for_noise_predicting_teachers(tmp_path, prediction, form):
    """ctm.student_precond=auto (the default): EDM's form for a teacher that predicts the noise (its x0 error grows
    with sigma; bench/RESULTS.md), the teacher's own form otherwise."""
    from ctmkit.config import DistillConfig, load_config
    from ctmkit.core.precond import predicts_noise
    from ctmkit.data import load_data
    from ctmkit.train.ctm import CTMRun
    folder = save_pipeline(tmp_path / "pipe", tiny_unet(classes=10), ddim(prediction))
    cfg = load_config(DistillConfig, None, None, ["ctm.gan=false"], data="digits", teacher=f"diffusers:{folder}",
                      **{"train.steps": 1, "train.batch_size": 4})
    assert cfg.ctm.student_precond == "auto"
    card = CTMRun(cfg, tmp_path / "ctm", load_data("digits", n=64)).model_card()
    assert (card.precond is None) == (form == "edm")
    assert card.precond is None or card.precond["prediction"] == prediction
    assert all(predicts_noise({"kind": k}) for k in ("edm_vp", "edm_ve", "edm_iddpm"))
    assert not predicts_noise(None) and not predicts_noise({"kind": "flow"})


def test_a_resumed_run_keeps_its_students_form(tmp_path):
    """A run started with the student in the teacher's form is not resumed in EDM's form (the auto default)."""
    from ctmkit.config import DistillConfig, load_config
    from ctmkit.data import load_data
    from ctmkit.train.ctm import CTMRun
    folder = save_pipeline(tmp_path / "pipe", tiny_unet(classes=10), ddim("epsilon"))
    data = load_data("digits", n=64)

    def cfg(steps, form):
        return load_config(DistillConfig, None, None, ["ctm.gan=false", f"ctm.student_precond={form}"], data="digits",
                           teacher=f"diffusers:{folder}", **{"train.steps": steps, "train.batch_size": 4})
    CTMRun(cfg(1, "teacher"), tmp_path / "ctm", data).fit(progress=False)
    with pytest.raises(UserError, match="resume with ctm.student_precond=teacher"):
        CTMRun(cfg(2, "auto"), tmp_path / "ctm", data, resume=True)
    CTMRun(cfg(2, "teacher"), tmp_path / "ctm", data, resume=True).fit(progress=False)
