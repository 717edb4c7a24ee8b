"""The reference implementation's training details as settings: target-network dropout, per-preset student dropout,
the GAN stage's own learning rate / batch / M, the paper presets' values, the Inception feature distance for the
CTM loss, and the two-jump sampler on training-grid indices."""

from __future__ import annotations

import json

import pytest
import torch

from ctmkit.config import DistillConfig, load_config
from ctmkit.core.sampling import gamma_sample, two_jump_as_gamma, two_jump_sample
from ctmkit.core.schedules import karras_sigmas
from ctmkit.data import load_data
from ctmkit.errors import UserError
from ctmkit.metrics.fid import fid_available
from ctmkit.nets.dropout import Dropout, set_dropout
from ctmkit.nets.mlp import MLP
from ctmkit.train.ctm import CTMRun

TINY = ["model.hidden=16", "model.depth=1", "model.emb_dim=16"]


def _ring_run(tmp_path, overrides, batch=16, steps=4):
    cfg = load_config(DistillConfig, None, None, [*TINY, *overrides], data="ring", teacher="exact",
                      **{"train.steps": steps, "train.batch_size": batch})
    return CTMRun(cfg, tmp_path / "ctm", load_data("ring"))


def test_dropout_follows_the_training_mode_unless_set_explicitly() -> None:
    torch.manual_seed(0)
    net = MLP(2, hidden=32, depth=2, emb_dim=8, dropout=0.5)
    x, t = torch.randn(64, 2), torch.ones(64)
    net.eval()
    assert torch.equal(net(x, t, t), net(x, t, t))            # eval: deterministic
    set_dropout(net, True)
    assert not torch.equal(net(x, t, t), net(x, t, t))        # forced on, although in eval mode
    net.train()
    set_dropout(net, False)
    assert torch.equal(net(x, t, t), net(x, t, t))            # forced off, although in training mode
    set_dropout(net, None)
    assert not torch.equal(net(x, t, t), net(x, t, t))        # back to following train()
    d = Dropout(0.3)
    assert "active" in repr(d) and not list(d.parameters())


@pytest.mark.parametrize("on", [False, True])
def test_target_network_dropout_is_the_setting_and_survives_eval(tmp_path, on: bool) -> None:
    run = _ring_run(tmp_path, ["model.dropout=0.5", f"ctm.target_dropout={str(on).lower()}", "ctm.gan=false"])
    run.target.eval()                                         # what a later eval() call would do
    x, t, s = torch.randn(64, 2), torch.full((64,), 3.0), torch.full((64,), 0.5)
    same = torch.equal(run.target(x, t, s), run.target(x, t, s))
    assert same is (not on)
    assert run.train_step()["_ok"]                            # a full iteration with the stochastic target


def test_student_dropout_overrides_the_backbone_dropout(tmp_path) -> None:
    assert _ring_run(tmp_path, ["model.dropout=0.2"]).spec.kwargs["dropout"] == 0.2          # unchanged (< 0)
    assert _ring_run(tmp_path, ["model.dropout=0.2", "ctm.student_dropout=0.0"]).spec.kwargs["dropout"] == 0.0
    with pytest.raises(UserError, match="student_dropout"):
        load_config(DistillConfig, None, None, ["ctm.student_dropout=1.5"])


def test_gan_stage_has_its_own_lr_batch_and_m(tmp_path) -> None:
    run = _ring_run(tmp_path, ["ctm.gan_start=2", "ctm.gan_lr=1e-5", "ctm.gan_batch_size=48", "ctm.max_k=17",
                               "ctm.gan_max_k=2", "ctm.pairs=uniform"], batch=16)
    for step in range(4):
        run.step = step
        d = run.draw()
        k = d.u - d.n
        if step < 2:
            assert d.x0.shape[0] == 16
        else:
            assert d.x0.shape[0] == 48 and int(k.max()) <= 2
        assert run.train_step()["_ok"]
        assert run.opts["opt"].param_groups[0]["lr"] == (1e-5 if step >= 2 else 4e-4)


def test_gan_stage_batch_must_split_over_micro_batches(tmp_path) -> None:
    with pytest.raises(UserError, match="gan_batch_size=30 must be divisible"):
        _ring_run(tmp_path, ["ctm.gan_batch_size=30", "train.micro_batches=4"], batch=16)
    with pytest.raises(UserError, match="gan_max_k"):
        load_config(DistillConfig, None, None, ["ctm.gan_max_k=18"])


def test_paper_presets_carry_the_reference_values() -> None:
    c10, i64 = load_config(DistillConfig, "cifar10"), load_config(DistillConfig, "imagenet64")
    for c in (c10, i64):
        assert (c.ctm.g_every, c.ctm.cutout_ratio, c.ctm.target_dropout) == (2, 0.2, True)
    assert c10.ctm.student_dropout == 0.13 and i64.ctm.student_dropout == 0.0
    assert (i64.ctm.gan_lr, i64.ctm.gan_max_k, i64.ctm.gan_batch_size) == (8e-6, 20, 4224)


def test_two_jump_sampler_follows_the_reference_formula() -> None:
    grid = karras_sigmas(18)
    calls = []

    def G(x, t, s, labels=None):                              # a linear jump: easy to follow by hand
        calls.append((float(t[0]), float(s[0])))
        return x * (s / t)[:, None] + 0.1

    z, z2 = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    out = two_jump_sample(G, z, grid, 12, 6, renoise=z2)
    t0, t1, t2, tn = (float(grid[i]) for i in (0, 12, 6, 17))
    x = z * t0 * (t1 / t0) + 0.1
    x = x + (t2**2 - t1**2) ** 0.5 * z2
    assert torch.allclose(out, x * (tn / t2) + 0.1, rtol=0, atol=1e-12)
    assert calls == [(t0, t1), (t2, tn)]
    # i1 == i2: no re-noising, exactly gamma-sampling NFE 2 through t_i
    same = two_jump_sample(G, z, grid, 9, 9, renoise=z2)
    assert torch.equal(same, gamma_sample(G, z, torch.stack([grid[0], grid[9], grid[17]])))
    with pytest.raises(ValueError, match="i2 <= i1"):
        two_jump_sample(G, z, grid, 6, 12)
    # the same sampler written as gamma-sampling on (t_0, t_i2, t_min) (how `ctmkit eval --two-jump` runs it)
    ts, gamma = two_jump_as_gamma(grid, 12, 6)
    assert 0 < gamma < 1
    as_gamma = gamma_sample(G, z, ts, gamma, step_noise=z2[:, None])
    assert torch.allclose(as_gamma, out, rtol=0, atol=1e-12)


def test_two_jump_through_the_cli(tmp_path) -> None:
    from .test_cli import ctmkit, ok
    from .test_layout import LEGACY_RUN
    out = tmp_path / "s.npz"
    run = ["sample", "--model", LEGACY_RUN, "--n", "16", "--out", out, "--quiet"]
    ok(ctmkit(*run, "--two-jump", "12,6", cwd=tmp_path))
    for bad, says in [(["--two-jump", "6,12"], "0 < I2 <= I1 < 17"), (["--two-jump", "12,6", "--nfe", "2"],
                      "leave out --nfe"), (["--grid", "9"], "only with --two-jump"), (["--two-jump", "3"], "two grid")]:
        r = ctmkit(*run, *bad, cwd=tmp_path)
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr
    ok(ctmkit("eval", "--model", LEGACY_RUN, "--data", "ring", "--nfe", "1", "--gamma", "0", "--two-jump", "12,6",
              "--heun", "", "--n", "20", "--seeds", "1", "--out", tmp_path / "e.json", cwd=tmp_path))
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    grid = karras_sigmas(18)
    jump = [r for r in rows if "ts" in r]
    assert len(jump) == 1 and jump[0]["ts"] == pytest.approx([80.0, float(grid[6]), 0.002])
    assert jump[0]["gamma"] == pytest.approx(two_jump_as_gamma(grid, 12, 6)[1])


needs_fid = pytest.mark.skipif(not fid_available(), reason="the fid extra (Inception network) is not installed")


@needs_fid
def test_inception_feature_map_is_a_differentiable_distance() -> None:
    from ctmkit.core.losses import make_distance
    from ctmkit.metrics.perceptual import InceptionFeatureMap
    fmap = InceptionFeatureMap(75)
    d = make_distance("feature", 3 * 16 * 16, feature=fmap)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).requires_grad_(True)
    assert torch.allclose(d(a, a), torch.zeros(3), atol=1e-7)
    dist = d(a, b)
    assert dist.shape == (3,) and bool((dist > 0).all())
    dist.sum().backward()
    assert b.grad.abs().sum() > 0
    gray = torch.rand(2, 1, 8, 8, generator=g)
    assert fmap(gray).shape[0] == 2
    with pytest.raises(UserError, match=">= 75"):
        InceptionFeatureMap(64)


@needs_fid
def test_feature_distance_trains_a_ctm_on_images(tmp_path) -> None:
    cfg = load_config(DistillConfig, None, None, [
        "model.channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
        "ctm.teacher_free=true", "ctm.distance=feature", "ctm.feature_size=75", "ctm.gan=false", "log_every=2",
        "ctm.num_scales=6", "ctm.max_k=5"], data="digits", teacher="exact", **{"train.steps": 2, "train.batch_size": 4})
    CTMRun(cfg, tmp_path / "ctm", load_data("digits", n=64)).fit(progress=False)
    line = json.loads((tmp_path / "ctm" / "stats.jsonl").read_text().splitlines()[-1])
    assert line["bad_steps"] == 0 and line["loss_ctm"] > 0


def test_feature_distance_needs_images(tmp_path) -> None:
    with pytest.raises(UserError, match="needs image data"):
        _ring_run(tmp_path, ["ctm.distance=feature"])


def test_xflip_flips_about_half_of_each_image_batch(tmp_path):
    unet = ["model.channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]"]
    data = load_data("digits", n=256)
    runs = []
    for flip in ("false", "true"):
        cfg = load_config(DistillConfig, None, None, [*unet, f"xflip={flip}", "ctm.teacher_free=true"],
                          data="digits", teacher="exact", **{"train.batch_size": 200})
        runs.append(CTMRun(cfg, tmp_path / f"r{flip}", data))
    plain, flipped = (r.global_batch()[0] for r in runs)
    same = (plain == flipped).flatten(1).all(1)
    mirrored = (plain.flip(-1) == flipped).flatten(1).all(1)
    assert bool((same | mirrored).all())
    symmetric = (plain == plain.flip(-1)).flatten(1).all(1)
    assert 60 <= int((mirrored & ~symmetric).sum()) <= 140           # about half of 200 (binomial, 5 std)
    assert load_config(DistillConfig, "cifar10").xflip and not load_config(DistillConfig, "digits").xflip
