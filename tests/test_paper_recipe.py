"""The paper's distance and discriminator in training (ctmkit/train/ctm.py, docs/method.md section 3): the config
keys and their checks, the presets that name them, the refusals without weight files, and CTM runs with
`ctm.distance=lpips` (random VGG16 weights) and `ctm.discriminator=projected` (stand-in feature networks: no real
weights exist here) that train, keep the feature networks frozen and resume exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ctmkit.config import DistillConfig, load_config
from ctmkit.data import load_data
from ctmkit.errors import UserError
from ctmkit.io.checkpoint import load_latest
from ctmkit.nets.lpips import LPIPS
from ctmkit.nets.projected import ProjectedDiscriminator
from ctmkit.train.ctm import CTMRun
from tests.test_lpips import random_vgg_file
from tests.test_projected import stand_ins

UNET = ["model.channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]"]
SMALL = [*UNET, "ctm.teacher_free=true", "ctm.num_scales=6", "ctm.max_k=5", "log_every=1", "ckpt_every=1"]


def test_config_keys_and_validation() -> None:
    cfg = load_config(DistillConfig, None, None, ["ctm.distance=lpips", "lpips_vgg=w/vgg16.pth", "lpips_size=64",
                                                  "ctm.discriminator=projected", "disc_deit=d.pth", "disc_effnet=e"])
    c = cfg.ctm
    assert (c.distance, c.lpips_vgg, c.lpips_size) == ("lpips", "w/vgg16.pth", 64)
    assert (c.discriminator, c.disc_deit, c.disc_effnet) == ("projected", "d.pth", "e")
    d = load_config(DistillConfig).ctm
    assert (d.distance, d.discriminator, d.lpips_size, d.lpips_vgg, d.disc_deit) == ("huber", "small", 224, "", "")
    for bad, words in [("ctm.lpips_size=8", "lpips_size must be >= 16"), ("ctm.distance=vgg", "'lpips'"),
                       ("ctm.discriminator=stylegan", "'small' or 'projected'")]:
        with pytest.raises(UserError, match=words):
            load_config(DistillConfig, None, None, [bad])


def test_paper_presets_name_the_papers_distance_and_discriminator_cpu_presets_do_not() -> None:
    for name in ("cifar10", "imagenet64"):
        c = load_config(DistillConfig, name).ctm
        assert (c.distance, c.discriminator) == ("lpips", "projected")
        assert (c.lpips_vgg, c.disc_deit, c.disc_effnet) == (
            "vgg16-397923af.pth", "deit_base_distilled_patch16_224.fb_in1k.safetensors",
            "tf_efficientnet_lite0.in1k.safetensors")
    for name in ("toy", "digits", "mnist_cpu", "mnist"):
        c = load_config(DistillConfig, name).ctm
        assert (c.distance, c.discriminator) == ("huber", "small")


def test_a_paper_preset_without_the_files_says_to_set_the_keys(tmp_path, monkeypatch) -> None:
    """Checked before the teacher is loaded: the placeholder names of the preset are not files here."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DistillConfig, "cifar10", None, [*UNET, "train.device=cpu"])
    with pytest.raises(UserError) as e:
        CTMRun(cfg, tmp_path / "ctm", load_data("digits", n=64))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ctm.lpips_vgg: 'vgg16-397923af.pth' is not a file")
    assert "placeholder" in msg and "set ctm.lpips_vgg=PATH" in msg and "download.pytorch.org" in msg
    random_vgg_file(tmp_path / "vgg16-397923af.pth")
    with pytest.raises(UserError, match=r"ctm.disc_deit: 'deit_base.*placeholder.*set ctm.disc_deit=PATH"):
        CTMRun(cfg, tmp_path / "ctm", load_data("digits", n=64))


@pytest.mark.parametrize("setting", ["ctm.distance=lpips", "ctm.discriminator=projected"])
def test_the_papers_parts_need_images(tmp_path, setting) -> None:
    cfg = load_config(DistillConfig, None, None, ["model.hidden=16", "model.depth=1", setting])
    with pytest.raises(UserError, match=f"{setting} needs image data"):
        CTMRun(cfg, tmp_path / "ctm", load_data("ring"))


def test_the_cli_refuses_lpips_without_weights_in_one_line(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "ctmkit", "distill", "--data", "digits", "--teacher", "exact",
                          "--out", str(tmp_path / "ctm"), "--steps", "1", "--quiet", "ctm.teacher_free=true",
                          "ctm.distance=lpips"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "ctm.lpips_vgg is not set" in lines[0] and "vgg16-397923af.pth" in lines[0]


@pytest.fixture()
def paper_run(tmp_path, monkeypatch):
    """CTMRun(steps) on digits with LPIPS (random VGG16 file, 16-pixel side) and the projected discriminator over
    the stand-in feature networks; the DeiT / EfficientNet files only need to exist for the early check."""
    monkeypatch.setattr("ctmkit.train.ctm.reference_feature_nets", lambda deit, effnet, seed: stand_ins(seed, (32, 32)))
    vgg = random_vgg_file(tmp_path / "vgg16.pth")
    for name in ("deit.safetensors", "effnet.safetensors"):
        (tmp_path / name).write_bytes(b"")
    data = load_data("digits", n=64)

    def make(steps: int, out: str = "ctm", resume: bool = False) -> CTMRun:
        cfg = load_config(DistillConfig, None, None, [
            *SMALL, "ctm.distance=lpips", f"ctm.lpips_vgg={vgg}", "ctm.lpips_size=16", "ctm.discriminator=projected",
            f"ctm.disc_deit={tmp_path / 'deit.safetensors'}", f"ctm.disc_effnet={tmp_path / 'effnet.safetensors'}",
            "ctm.cutout_ratio=0.2"], data="digits", teacher="exact", **{"train.steps": steps, "train.batch_size": 4})
        return CTMRun(cfg, tmp_path / out, data, resume=resume)
    return make


def test_a_run_with_lpips_and_the_projected_discriminator_trains_only_the_heads(paper_run) -> None:
    run = paper_run(3)
    assert isinstance(run.distance, LPIPS) and isinstance(run.disc, ProjectedDiscriminator)
    frozen = [p.detach().clone() for m in run.disc.frozen for p in m.parameters()]
    vgg = [p.detach().clone() for p in run.distance.parameters()]
    heads = {k: v.detach().clone() for k, v in run.disc.state_dict().items()}
    assert heads and all(k.startswith("heads.") for k in heads)
    for _ in range(3):                                # g_every 1: generator and discriminator steps every iteration
        stats = run._step()
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float))
        assert stats["loss_ctm"] > 0 and "loss_d" in stats and "loss_gan_g" in stats
    after = [p for m in run.disc.frozen for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after))                       # projections, networks
    assert all(torch.equal(a, b) for a, b in zip(vgg, run.distance.parameters()))     # VGG16
    changed = [k for k, v in run.disc.state_dict().items() if not torch.equal(v, heads[k])]
    assert any(k.endswith("original") for k in changed)                               # the heads learn


def test_a_resumed_run_gets_the_same_projections_and_weights(paper_run) -> None:
    paper_run(2, "straight").fit(progress=False)
    paper_run(1, "split").fit(progress=False)
    resumed = paper_run(2, "split", resume=True)
    resumed.fit(progress=False)
    a, b = (load_latest(p / "checkpoints")[0] for p in (resumed.out.parent / "straight", resumed.out))
    for name in ("net", "target", "disc"):
        assert set(a["nets"][name]) == set(b["nets"][name])
        for k, v in a["nets"][name].items():
            assert torch.equal(v, b["nets"][name][k]), (name, k)


def test_the_defaults_keep_the_small_discriminator_and_huber(tmp_path) -> None:
    from ctmkit.nets.disc import ImageDiscriminator
    cfg = load_config(DistillConfig, None, None, SMALL, data="digits", teacher="exact",
                      **{"train.steps": 1, "train.batch_size": 4})
    run = CTMRun(cfg, tmp_path / "ctm", load_data("digits", n=64))
    assert isinstance(run.disc, ImageDiscriminator) and not isinstance(run.distance, LPIPS)
    assert run.disc_kw() == {} and run._step()["loss_d"] > 0
