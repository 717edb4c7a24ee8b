"""FID against reference statistics files in EDM's format: `ctmkit fid-ref` writes them, `ctmkit eval --ref` reads
them; the published files (cifar10-32x32.npz, ...) cannot be downloaded here, so the format is tested with files
ctmkit writes and reads back, and the Frechet distance against an independent computation (scipy's sqrtm)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg

from ctmkit.errors import UserError
from ctmkit.metrics.fid import fid_available, read_ref_stats, write_ref_stats
from ctmkit.metrics.frechet import frechet_distance

from .test_cli import UNET, ctmkit, ok

pytestmark = pytest.mark.skipif(not fid_available(), reason="the fid extra (Inception network) is not installed")


def independent_frechet(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)), with scipy's matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_agrees_with_an_independent_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    want = independent_frechet(*stats[0], *stats[1])
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(want, rel=1e-6)


def test_reference_files_round_trip_and_bad_files_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=2048), np.eye(2048) * 0.5
    write_ref_stats(tmp_path / "r.npz", mu, sigma)
    with np.load(tmp_path / "r.npz") as z:
        assert sorted(z.files) == ["mu", "sigma"] and z["mu"].dtype == np.float64 and z["sigma"].shape == (2048, 2048)
    m2, s2 = read_ref_stats(tmp_path / "r.npz")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(UserError, match=r"mu \[2048\]"):
        read_ref_stats(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="do not exist"):
        read_ref_stats(tmp_path / "none.npz")


@pytest.mark.slow     # about 40 s: kept out of the default suite (under 10 minutes)
def test_eval_with_ref_equals_eval_with_the_same_data(tmp_path):
    ok(ctmkit("train-teacher", "--data", "digits", "--out", tmp_path / "t", "--steps", "2", "--batch-size", "8",
              "--quiet", *UNET, cwd=tmp_path))
    ok(ctmkit("fid-ref", "--data", "digits", "--num-samples", "12", "--out", tmp_path / "ref.npz", "--quiet",
              cwd=tmp_path))
    common = ["eval", "--model", tmp_path / "t", "--heun", "3", "--nfe", "", "--n", "12", "--metric", "fid"]
    ok(ctmkit(*common, "--data", "digits", "--out", tmp_path / "a.json", cwd=tmp_path))
    ok(ctmkit(*common, "--ref", tmp_path / "ref.npz", "--out", tmp_path / "b.json", cwd=tmp_path))
    a, b = (json.loads((tmp_path / f"{k}.json").read_text())["rows"][0]["value"] for k in "ab")
    # The same 12 images featurised in one batch by the same code in the same environment on both sides (the test
    # cache is fresh, see conftest.py), and the .npz round trip of float64 statistics is exact: equal up to rounding.
    assert a == pytest.approx(b, rel=1e-9)
    r = ctmkit(*common, "--ref", tmp_path / "ref.npz", "--data", "digits", "--out", tmp_path / "c.json", cwd=tmp_path)
    assert r.returncode != 0 and "not both" in r.stderr
