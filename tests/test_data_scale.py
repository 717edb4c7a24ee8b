"""Data at scale: items stay in data space (a .npy read row by row, uint8 as uint8, image files decoded per item) and
are converted per batch; training batches are a function of (seed, step), read ahead by DataLoader workers, so
workers, ranks and resumes change no number; statistics are streamed."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ctmkit.config import TeacherConfig, load_config
from ctmkit.data import load_data
from ctmkit.data.loader import BatchPlan, StepBatches, StepLoader
from ctmkit.data.normalize import fit_vectors
from ctmkit.errors import UserError
from ctmkit.metrics.frechet import feature_stats, streamed_stats
from ctmkit.train.teacher import TeacherRun

from .test_cli import ctmkit
from .test_scale import _cli, _torchrun, assert_moved, assert_same_nets, final_state

UNET = ["model.arch=unet", "model.channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1",
        "model.attn_resolutions=[]", "train.ema=[0.9]", "log_every=1"]


def _zip(path, n=24, side=8, seed=0):
    """An EDM dataset zip of n RGB side x side PNGs, 3 classes."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    names = [f"00000/img{i:08d}.png" for i in range(n)]
    with zipfile.ZipFile(path, "w") as zf:
        for name, a in zip(names, imgs):
            with zf.open(name, "w") as f:
                Image.fromarray(a).save(f, format="png")
        zf.writestr("dataset.json", json.dumps({"labels": [[nm, i % 3] for i, nm in enumerate(names)]}))
    return path, imgs


def test_npy_is_memory_mapped_and_uint8_converts_per_batch(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (50, 5, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "d.npy", a)
    d = load_data(str(tmp_path / "d.npy"))
    assert type(d.items).__name__ == "NpyRows" and d.items.dtype == np.uint8 and d.shape == (3, 5, 4)
    assert np.array_equal(np.asarray(d.items[10:20]), a[10:20]) and np.array_equal(d.items[-1], a[-1])
    assert load_data(str(tmp_path / "d.npy"), n=7).items.shape == (7, 5, 4, 3)
    raw = d.raw([4, 0, 4])
    assert raw.dtype == torch.uint8 and torch.equal(raw, torch.from_numpy(a[[4, 0, 4]]))
    want = torch.from_numpy((a[[4, 0, 4]].astype(np.float64) / 255 * 2 - 1).transpose(0, 3, 1, 2)).float()
    assert torch.equal(d[[4, 0, 4]], want)
    assert torch.equal(d.x, torch.cat(list(d.batches(size=7))))   # batch size changes no bit


def test_vector_statistics_and_checks_are_streamed(tmp_path):
    rng = np.random.default_rng(1)
    a = (rng.normal(size=(10000, 3)) * [1, 10, 100] + [5, -3, 1e4]).astype(np.float32)   # > one 4096-item chunk
    norm = fit_vectors(a, "float32")
    mean, var = a.mean(0, dtype=np.float64), float(a.var(0, dtype=np.float64).mean())
    assert np.allclose(norm.shift, mean, rtol=1e-12, atol=1e-9)
    assert abs(norm.scale - 0.5 / np.sqrt(var)) < 1e-12 * norm.scale
    a[5000, 1] = np.nan
    np.save(tmp_path / "bad.npy", a)
    with pytest.raises(UserError, match="NaN or Inf values \\(first at index 5000\\)"):
        load_data(str(tmp_path / "bad.npy"))


def test_streamed_stats_equal_feature_stats():
    f = torch.randn(1000, 7, dtype=torch.float64) * 3 + 2
    mu, s = feature_stats(f)
    mu2, s2 = streamed_stats(f[i:i + 300] for i in range(0, 1000, 300))
    assert np.allclose(mu, mu2, rtol=0, atol=1e-12) and np.allclose(s, s2, rtol=0, atol=1e-10)


def test_lazy_images_decode_per_item_from_a_zip(tmp_path):
    path, imgs = _zip(tmp_path / "d.zip")
    d = load_data(str(path))
    assert type(d.items).__name__ == "LazyImages" and d.shape == (3, 8, 8) and d.num_classes == 3
    assert np.array_equal(d.items[3], imgs[3]) and np.array_equal(d.items[[5, 1]], imgs[[5, 1]])
    assert np.array_equal(np.asarray(d.items[2:6]), imgs[2:6]) and len(d.items[2:6]) == 4
    assert np.array_equal(d.normalizer.to_data(d.x), imgs)
    assert load_data(str(path), n=5).items.shape == (5, 8, 8, 3)


def test_batch_plan_depends_on_seed_and_step_only(tmp_path):
    np.save(tmp_path / "d.npy", np.arange(40 * 4, dtype=np.float32).reshape(40, 4))
    d = load_data(str(tmp_path / "d.npy"))
    plan = BatchPlan(8, seed=3, xflip=True, later_size=16, from_step=5)
    idx, flip = plan.draw(2, len(d))
    again, flip2 = BatchPlan(8, seed=3, xflip=True).draw(2, len(d))
    assert np.array_equal(idx, again) and np.array_equal(flip, flip2) and len(idx) == 8
    assert not np.array_equal(idx, plan.draw(3, len(d))[0]) and not np.array_equal(idx, BatchPlan(8, 4).draw(2, 40)[0])
    assert len(plan.draw(5, len(d))[0]) == 16
    whole = StepBatches(d, plan)[7]
    halves = [StepBatches(d, plan, rank, 2)[7] for rank in (0, 1)]
    assert torch.equal(torch.cat([h["raw"] for h in halves]), whole["raw"])
    assert torch.equal(torch.cat([h["flip"] for h in halves]), whole["flip"])
    assert torch.equal(whole["raw"], torch.from_numpy(np.asarray(d.items)[plan.draw(7, 40)[0]]))


def test_worker_processes_read_the_same_batches(tmp_path):
    path, _ = _zip(tmp_path / "d.zip")
    d = load_data(str(path))
    batches = StepBatches(d, BatchPlan(6, seed=0, xflip=True))
    loader = StepLoader(batches, start=3, workers=2)
    try:
        for step in range(3, 8):
            got, want = loader.get(step), batches[step]
            assert got["step"] == step and torch.equal(got["raw"], want["raw"])
            assert torch.equal(got["labels"], want["labels"]) and torch.equal(got["flip"], want["flip"])
    finally:
        loader.close()


def _teacher_cfg(steps, extra=()):
    return load_config(TeacherConfig, None, None, [*UNET, "xflip=true", *extra], data="x",
                       **{"train.steps": steps, "train.batch_size": 8, "train.ckpt_every": 3})


def test_workers_and_resume_change_no_number(tmp_path):
    path, _ = _zip(tmp_path / "d.zip")
    d = load_data(str(path))
    TeacherRun(_teacher_cfg(6), tmp_path / "straight", d).fit(progress=False)
    TeacherRun(_teacher_cfg(3, ["train.workers=2"]), tmp_path / "split", d).fit(progress=False)
    TeacherRun(_teacher_cfg(6, ["train.workers=2"]), tmp_path / "split", d, resume=True).fit(progress=False)
    TeacherRun(_teacher_cfg(1), tmp_path / "first", d).fit(progress=False)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert_moved(a, final_state(tmp_path / "first"))
    assert_same_nets(a, b, atol=0)


def test_two_ranks_with_workers_equal_one_rank_on_files(tmp_path):
    """torchrun, 2 gloo processes each reading its half of every batch from a zip through a worker == 1 process."""
    path, _ = _zip(tmp_path / "d.zip")
    base = ["train-teacher", "--data", str(path), "--steps", "3", "--batch-size", "8", *UNET, "xflip=true",
            "model.conditional=true"]
    _cli([*base, "--out", str(tmp_path / "one")])
    _torchrun([*base, "--out", str(tmp_path / "two"), "train.workers=1"], tmp_path)
    assert_same_nets(final_state(tmp_path / "one"), final_state(tmp_path / "two"), atol=2e-6)


def test_a_corrupt_image_met_in_training_stops_with_its_name(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes((folder / "3.png").read_bytes()[:70])   # the header survives, the pixels not
    r = ctmkit("train-teacher", "--data", folder, "--out", tmp_path / "run", "--steps", "30", "--batch-size", "4",
               *UNET, "train.workers=1", "--quiet", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "3.png" in lines[0] and "training step" in lines[0], r.stderr


def test_big_endian_and_big_rows_read_in_pieces(tmp_path, monkeypatch):
    import ctmkit.data.readers as readers
    a = np.random.default_rng(2).normal(size=(30, 6)).astype(">f4")
    np.save(tmp_path / "be.npy", a)
    d = load_data(str(tmp_path / "be.npy"))
    assert torch.equal(d.raw([0, 29]), torch.from_numpy(a[[0, 29]].astype("<f4")))
    monkeypatch.setattr(readers, "PIECE", 7)    # a read of many pieces (one pread returns at most ~2 GiB)
    assert np.array_equal(np.asarray(d.items), a) and np.array_equal(d.items[[3, 1]], a[[3, 1]])
    (tmp_path / "be.npy").unlink()              # the open descriptor still reads the file
    assert np.array_equal(d.items[5], a[5])
