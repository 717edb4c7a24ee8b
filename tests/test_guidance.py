"""Classifier-free guidance (docs/method.md section 8) against exact ground truth: the null label, labelled mixtures,
the guided denoiser D_w, label dropout, and guided distillation (one scale and a range)."""

import json

import pytest
import torch

from ctmkit.config import DistillConfig, TeacherConfig, load_config
from ctmkit.core.guidance import NULL_LABEL, guided
from ctmkit.core.mixtures import GaussianMixture
from ctmkit.core.solvers import flow_map
from ctmkit.data import load_data
from ctmkit.errors import UserError
from ctmkit.nets.mlp import MLP
from ctmkit.train.ctm import CTMRun
from ctmkit.train.teacher import TeacherRun

TINY = ["model.hidden=16", "model.depth=1", "log_every=1"]


def labelled(classes=(0, 1, 1, 2)):
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.3, -1.2]], dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.2, 0.3, 0.25, 0.1]), torch.tensor([0.1, 0.4, 0.3, 0.2]),
                           torch.tensor(classes))


def test_a_labelled_mixture_denoises_per_class_and_the_null_label_is_the_whole_mixture():
    m = labelled()
    x, sigma = torch.randn(64, 2, dtype=torch.float64) * 2, torch.rand(64, dtype=torch.float64) * 3 + 0.05
    whole = GaussianMixture(m.means, m.stds, m.weights)
    assert torch.allclose(m(x, sigma, torch.full((64,), NULL_LABEL)), whole(x, sigma), rtol=0, atol=1e-12)
    for c, comps in ((0, [0]), (1, [1, 2]), (2, [3])):
        part = GaussianMixture(m.means[comps], m.stds[comps], m.weights[comps])
        assert torch.allclose(m(x, sigma, torch.full((64,), c)), part(x, sigma), rtol=0, atol=1e-12)
    mixed = torch.tensor([0, 1, 2, -1] * 16)
    per = torch.stack([m(x[i:i + 1], sigma[i:i + 1], mixed[i:i + 1])[0] for i in range(64)])
    assert torch.allclose(m(x, sigma, mixed), per, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="classes"):
        m(x, sigma)
    with pytest.raises(ValueError, match="classes"):
        GaussianMixture(m.means, m.stds, m.weights, torch.tensor([0, 2, 2, 2]))   # class 1 unused


def test_guided_denoiser_is_the_two_branch_formula_and_w1_is_the_denoiser_itself():
    m = labelled()
    x, sigma, c = torch.randn(32, 2, dtype=torch.float64), torch.full((32,), 0.7, dtype=torch.float64), \
        torch.randint(0, 3, (32,))
    assert guided(m, 1.0) is m and guided(m, torch.ones(32)) is m
    d_c, d_u = m(x, sigma, c), m(x, sigma, torch.full_like(c, -1))
    for w in (0.0, 2.0, 4.5):
        assert torch.allclose(guided(m, w)(x, sigma, c), d_u + w * (d_c - d_u), rtol=0, atol=1e-12)
    assert torch.allclose(guided(m, 0.0)(x, sigma, c), d_u, rtol=0, atol=1e-12)
    w = torch.linspace(0, 4, 32)
    assert torch.allclose(guided(m, w)(x, sigma, c), d_u + w[:, None].double() * (d_c - d_u), atol=1e-12)
    with pytest.raises(ValueError, match=">= 0"):
        guided(m, -1.0)
    with pytest.raises(ValueError, match="labels"):
        guided(m, 2.0)(x, sigma, None)


def test_the_null_label_adds_no_class_embedding_and_conditional_nets_refuse_no_labels():
    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=1, emb_dim=8, num_classes=3).eval()
    x, nt = torch.randn(6, 2), torch.randn(6)
    labels = torch.tensor([0, 1, 2, -1, -1, 1])
    out = net(x, nt, None, labels)
    table, net.label_embed = net.label_embed, None          # the same network without its class embedding
    bare = net(x, nt, None, None)
    net.label_embed = table
    assert torch.equal(out[3:5], bare[3:5]) and not torch.allclose(out[:3], bare[:3])
    assert torch.equal(out[[0, 1, 2, 5]], net(x[[0, 1, 2, 5]], nt[[0, 1, 2, 5]], None, labels[[0, 1, 2, 5]]))
    with pytest.raises(ValueError, match="conditioned on 3 classes"):
        net(x, nt)


def test_teacher_label_dropout_gives_a_null_branch_and_needs_labels(tmp_path):
    data = load_data("labelled_ring")
    cfg = load_config(TeacherConfig, None, None, [*TINY, "label_dropout=0.2"], data="labelled_ring",
                      **{"train.steps": 3, "train.batch_size": 32})
    TeacherRun(cfg, tmp_path / "t", data).fit(progress=False)
    card = json.loads((tmp_path / "t" / "model.json").read_text())
    assert card["guidance"] == {"label_dropout": 0.2}
    cfg = load_config(TeacherConfig, None, None, [*TINY, "label_dropout=0.2"], data="ring",
                      **{"train.steps": 3, "train.batch_size": 32})
    with pytest.raises(UserError, match="labelled data"):
        TeacherRun(cfg, tmp_path / "u", load_data("ring"))


def _distill(tmp_path, name, over, steps=4, data="labelled_ring"):
    cfg = load_config(DistillConfig, None, None, [*TINY, *over], data=data, teacher="exact",
                      **{"train.steps": steps, "train.batch_size": 32})
    run = CTMRun(cfg, tmp_path / name, load_data(data))
    run.fit(progress=False)
    return run


def test_guidance_one_is_unguided_distillation_bitwise(tmp_path):
    a = _distill(tmp_path, "a", [])
    b = _distill(tmp_path, "b", ["ctm.guidance=1"])
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    card = json.loads((tmp_path / "a" / "model.json").read_text())
    assert card["guidance"] == {"label_dropout": 0.1}        # the exact labelled mixture's null branch, distilled


def test_guided_distillation_records_its_scale_and_refuses_what_cannot_be_guided(tmp_path):
    fixed = _distill(tmp_path, "fixed", ["ctm.guidance=2"])
    assert json.loads((tmp_path / "fixed" / "model.json").read_text())["guidance"] == {"scale": [2.0]}
    assert not fixed.cfg.ctm.gan                              # guided distillation runs without the GAN term
    rng = _distill(tmp_path, "range", ["ctm.guidance=[1, 4]"])
    assert json.loads((tmp_path / "range" / "model.json").read_text())["guidance"] == {"scale": [1.0, 4.0]}
    assert rng.net.backbone.w_embed is not None
    with pytest.raises(UserError, match="needs class labels"):
        _distill(tmp_path, "ring", ["ctm.guidance=2"], data="ring")
    with pytest.raises(UserError, match=r"0 <= lo < hi"):
        _distill(tmp_path, "bad", ["ctm.guidance=[4, 1]"])
    with pytest.raises(UserError, match=r"w >= 0"):
        _distill(tmp_path, "neg", ["ctm.guidance=-1"])


def test_a_labelled_teacher_without_label_dropout_cannot_be_guided(tmp_path):
    data = load_data("labelled_ring")
    cfg = load_config(TeacherConfig, None, None, TINY, data="labelled_ring",
                      **{"train.steps": 2, "train.batch_size": 32})
    TeacherRun(cfg, tmp_path / "t", data).fit(progress=False)
    cfg = load_config(DistillConfig, None, None, [*TINY, "ctm.guidance=2"], data="labelled_ring",
                      teacher=str(tmp_path / "t"), **{"train.steps": 2, "train.batch_size": 32})
    with pytest.raises(UserError, match="null branch"):
        CTMRun(cfg, tmp_path / "c", data)


def test_a_range_student_starts_independent_of_w():
    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=1, emb_dim=8, num_classes=4, guidance_embed=True).eval()
    x, nt, ns, c = torch.randn(8, 2), torch.randn(8), torch.randn(8), torch.randint(0, 4, (8,))
    plain = net(x, nt, ns, c)
    assert torch.equal(net(x, nt, ns, c, torch.full((8,), 3.5)), plain)
    assert torch.count_nonzero(net.w_embed.fc2.weight) == 0


def _exact_jump(mixture, w, x_t, t, labels):
    return flow_map(guided(mixture, w), x_t.double(), t, 0.002, steps=256, labels=labels).float()


def test_guided_distillation_tracks_the_exact_guided_flow(tmp_path):
    """A short distillation at W = 4 from the exact labelled mixture learns the guided flow map, not the plain one:
    its one-step samples are nearer the exact guided ODE solution from the same noise than the unguided one is."""
    torch.manual_seed(0)
    over = ["model.hidden=128", "model.depth=3", "lr=1e-3", "train.ema=[0.99]", "ctm.target_ema=0.99",
            "log_every=100", "ctm.guidance=4"]
    cfg = load_config(DistillConfig, None, None, over, data="labelled_blobs", teacher="exact",
                      **{"train.steps": 600, "train.batch_size": 128})
    data = load_data("labelled_blobs")
    run = CTMRun(cfg, tmp_path / "g4", data)
    run.fit(progress=False)
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(512, 2, generator=g), torch.randint(0, 2, (512,), generator=g)
    t = 80.0
    exact4, exact1 = _exact_jump(data.mixture, 4.0, z * t, t, c), _exact_jump(data.mixture, 1.0, z * t, t, c)
    with torch.no_grad():
        one_step = run.emas[0](z * t, torch.full((512,), t), torch.full((512,), 0.002), c)
    err = (one_step - exact4).norm(dim=1).mean().item()
    gap = (exact1 - exact4).norm(dim=1).mean().item()
    assert err < gap / 2, (err, gap)      # gap measured: 0.383
