"""Classifier-free guidance of every kind of teacher (core/guidance.py; docs/method.md sections 7 and 8), on tiny
networks built here (nothing downloads): the guided denoiser D_w = D(x, s, null) + w (D(x, s, c) - D(x, s, null))
must equal the two-branch formula computed by hand, with the null input written out explicitly: no class embedding
for a ctmkit network, EDM's zero class vector for an EDM pickle built with label_dropout, the named null class index
for a class-conditional diffusers UNet2DModel. w = 1 is exactly D(x, s, c). And the refusals: a diffusers UNet
without a named null class given the null label, a null class out of range, an EDM pickle without label dropout."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from ctmkit import load_teacher
from ctmkit.core.guidance import guided
from ctmkit.core.precond import CTM, EDMDenoiser, vp_sigmas
from ctmkit.errors import UserError
from ctmkit.eval.guide import resolve_scale
from ctmkit.io.card import ModelCard
from ctmkit.nets.mlp import MLP
from ctmkit.teachers import EXACT_LABEL_DROPOUT, teacher_facts

from .test_edm_teachers import write_edm_pickle

SCALES = (0.0, 0.5, 2.0, 3.5)
# D_w and the formula by hand run the same float32 kernels on the same inputs: equal to round-off of the final
# combination at most (measured: bitwise equal); the tolerance below is 1e-6 of the outputs' scale.
REL_TOL = 1e-6


def by_hand(d_c: torch.Tensor, d_null: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(w, dtype=d_c.dtype).reshape(-1, *[1] * (d_c.dim() - 1))
    return d_null + w * (d_c - d_null)


def assert_formula(teacher, x, sigma, labels, d_c, d_null):
    """D_w of `teacher` at several scales (and per-sample scales) against the formula on two explicit outputs."""
    scale = max(1.0, float(d_c.abs().max()), float(d_null.abs().max()))
    with torch.no_grad():
        assert guided(teacher, 1.0) is teacher and torch.equal(teacher(x, sigma, labels), d_c)   # w = 1: D itself
        for w in (*SCALES, torch.linspace(0, 3, len(x))):
            err = float((guided(teacher, w)(x, sigma, labels) - by_hand(d_c, d_null, w)).abs().max())
            assert err <= REL_TOL * scale, (w, err, scale)
    assert not torch.allclose(d_c, d_null, atol=1e-4)          # the two branches differ: the test has teeth


def test_a_ctmkit_teacher_is_the_two_branch_formula():
    torch.manual_seed(0)
    teacher = EDMDenoiser(MLP(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=3)).eval()
    x, sigma, labels = torch.randn(6, 2), torch.tensor([0.01, 0.3, 1.0, 2.0, 10.0, 80.0]), torch.tensor([0, 1, 2] * 2)
    unconditional = copy.deepcopy(teacher)
    with torch.no_grad():
        unconditional.backbone.label_embed.weight.zero_()      # the null branch by hand: no class embedding at all
        d_c, d_null = teacher(x, sigma, labels), unconditional(x, sigma, labels)
        assert torch.equal(teacher(x, sigma, torch.full_like(labels, -1)), d_null)
    assert_formula(teacher, x, sigma, labels, d_c, d_null)


@pytest.mark.parametrize("name", ["vp_songunet_ddpmpp_cond", "edm_dhariwal_cond"])
def test_an_edm_pickle_with_label_dropout_is_the_two_branch_formula(tmp_path, name):
    t = write_edm_pickle(name, tmp_path / "net.pkl", tmp_path / "EXECUTED", label_dropout=0.1)
    teacher = load_teacher(f"edm:{tmp_path / 'net.pkl'}")
    card = teacher.card
    assert card.null_branch and card.guidance == {"label_dropout": 0.1}
    assert teacher_facts(teacher)["label_dropout"] == 0.1
    assert ModelCard.from_dict(card.to_dict()).null_branch
    assert "label_dropout" not in card.backbone.kwargs and teacher.backbone.label_dropout == 0   # students: ctm.*
    x, sigma, labels = t["__x"], t["__sigma"], t["__labels"]
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    with torch.no_grad():
        d_c = teacher(x, sigma, onehot)                        # class vectors by hand: one-hot, and zeros (EDM's null)
        d_null = teacher(x, sigma, torch.zeros_like(onehot))
        assert float((d_c - t["__out"]).abs().max()) <= 1e-5 * max(1.0, float(t["__out"].abs().max()))
    assert_formula(teacher, x, sigma, labels, d_c, d_null)


def test_an_edm_pickle_without_label_dropout_has_no_null_branch(tmp_path):
    write_edm_pickle("vp_songunet_ddpmpp_cond", tmp_path / "net.pkl", tmp_path / "EXECUTED")
    teacher = load_teacher(f"edm:{tmp_path / 'net.pkl'}")
    assert teacher.card.conditional and not teacher.card.null_branch and teacher.card.guidance is None
    assert teacher_facts(teacher)["label_dropout"] == 0
    assert resolve_scale(teacher, 1.0) == 1.0
    with pytest.raises(UserError, match=r"--guidance 2 needs a null branch \(the label -1\): this teacher has none "
                                        r"\(train it with label_dropout > 0"):
        resolve_scale(teacher, 2.0)


needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers extra")


def tiny_pipeline(folder, classes: int | None = 4):
    """A class-conditional DDIM pipeline (epsilon) with `classes` class embeddings; the UNet is returned too."""
    import diffusers
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=classes)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    unet.save_pretrained(folder / "unet")
    sched.save_pretrained(folder / "scheduler")
    return folder, unet.eval(), sched


@needs_diffusers
@pytest.mark.parametrize("null_class", [3, 0])
def test_a_diffusers_teacher_with_a_named_null_class_is_the_two_branch_formula(tmp_path, null_class):
    folder, unet, sched = tiny_pipeline(tmp_path)
    teacher = load_teacher(f"diffusers:{folder}?null_class={null_class}")
    card = teacher.card
    assert card.null_branch and card.guidance == {"null_class": null_class}
    assert card.backbone.kwargs["null_class"] == null_class
    assert teacher_facts(teacher)["label_dropout"] == EXACT_LABEL_DROPOUT       # its students' default share
    assert card.num_classes == (3 if null_class == 3 else 4)   # a last, extra embedding is not a class of the data
    # at training timesteps the teacher is D = x - sigma eps(x / sqrt(1 + sigma^2), t, class): the UNet called by hand
    steps = torch.tensor([10, 100, 400, 700, 900, 999])
    sigma = vp_sigmas(sched.alphas_cumprod)[steps].float()
    x, labels = torch.randn(6, 1, 8, 8) * (1 + sigma[:, None, None, None]), torch.tensor([0, 1, 2, 2, 1, 0])

    def d(class_labels):
        eps = unet(x / (1 + sigma[:, None, None, None] ** 2).sqrt(), steps, class_labels=class_labels).sample
        return x - sigma[:, None, None, None] * eps

    with torch.no_grad():
        d_c, d_null = d(labels), d(torch.full_like(labels, null_class))
        scale = float(d_c.abs().max())
        assert float((teacher(x, sigma, labels) - d_c).abs().max()) <= 1e-5 * scale
        assert float((teacher(x, sigma, torch.full_like(labels, -1)) - d_null).abs().max()) <= 1e-5 * scale
        # the teacher's own two branches (index labels and the null label -1) against the formula
        d_c, d_null = teacher(x, sigma, labels), teacher(x, sigma, torch.full_like(labels, null_class))
    assert_formula(teacher, x, sigma, labels, d_c, d_null)


@needs_diffusers
def test_a_diffusers_students_backbone_keeps_the_null_class(tmp_path):
    folder, _, _ = tiny_pipeline(tmp_path, classes=11)
    teacher = load_teacher(f"diffusers:{folder}?null_class=10")
    card = ModelCard.from_dict(teacher.card.to_dict())         # what a run folder's model.json rebuilds
    student = CTM(card.backbone.build(), 0.5, teacher.precond).eval()
    assert student.backbone.null_class == 10 and card.num_classes == 10
    student.load_state_dict(teacher.state_dict(), strict=False)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 2.0, 60.0])
    with torch.no_grad():
        assert torch.equal(student.g(x, t, t / 3, torch.full((3,), -1)), student.g(x, t, t / 3, torch.full((3,), 10)))
        assert torch.equal(student.g(x, t, t, torch.full((3,), -1)), teacher(x, t, torch.full((3,), 10)))


@needs_diffusers
def test_distilling_a_diffusers_teacher_with_a_null_class(tmp_path):
    """The run's student spec carries the null class, and the student keeps a null branch (the teacher's share)."""
    from ctmkit.config import DistillConfig, load_config
    from ctmkit.data import load_data
    from ctmkit.train.ctm import CTMRun
    folder, _, _ = tiny_pipeline(tmp_path / "pipe", classes=11)
    spec = f"diffusers:{folder}?null_class=10"
    for i, guidance in enumerate(["[1]", "[2]"]):
        cfg = load_config(DistillConfig, None, None, ["ctm.gan=false", f"ctm.guidance={guidance}"], data="digits",
                          teacher=spec, **{"train.steps": 1, "train.batch_size": 4})
        run = CTMRun(cfg, tmp_path / f"ctm{i}", load_data("digits", n=64))
        card = run.model_card()
        assert run.spec.kwargs["null_class"] == 10 and card.backbone.kwargs["null_class"] == 10
        assert card.null_branch == (guidance == "[1]") and card.guidance_scale == ((1.0,) if i == 0 else (2.0,))


@needs_diffusers
def test_the_null_label_without_a_null_class_is_refused(tmp_path):
    folder, _, _ = tiny_pipeline(tmp_path)
    teacher = load_teacher(f"diffusers:{folder}")
    assert not teacher.card.null_branch and teacher_facts(teacher)["label_dropout"] == 0
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 5.0])
    with torch.no_grad():
        teacher(x, sigma, torch.tensor([0, 3]))                # class indices are fine
        with pytest.raises(ValueError, match=r"null label -1 needs the null class.*diffusers:DIR\?null_class=K"):
            teacher(x, sigma, torch.tensor([0, -1]))
        with pytest.raises(ValueError, match="null label -1 needs the null class"):
            guided(teacher, 2.0)(x, sigma, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="conditioned on 4 classes: pass labels"):
            teacher(x, sigma)
    with pytest.raises(UserError, match=r"null_class=K\)"):
        resolve_scale(teacher, 2.0)


@needs_diffusers
@pytest.mark.parametrize("setting, says", [
    ("null_class=4", r"null_class=4 is not a class index of this UNet2DModel: num_class_embeds=4, so 0\.\.3"),
    ("null_class=-1", "null_class=-1 is not a class index"),
    ("null_class=x", "null_class must be a class index, got 'x'"),
    ("null_clas=3", r"unknown setting 'null_clas=3'; settings: \?null_class=K"),
    ("null_class", "unknown setting 'null_class'")])
def test_a_bad_null_class_is_one_clear_error(tmp_path, setting, says):
    folder, _, _ = tiny_pipeline(tmp_path)
    with pytest.raises(UserError, match=says) as e:
        load_teacher(f"diffusers:{folder}?{setting}")
    assert "\n" not in str(e.value)


@needs_diffusers
def test_a_null_class_needs_a_class_conditional_unet(tmp_path):
    folder, _, _ = tiny_pipeline(tmp_path, classes=None)
    with pytest.raises(UserError, match=r"null_class=0 is not a class index.*not class-conditional"):
        load_teacher(f"diffusers:{folder}?null_class=0")
