"""ctmkit.data: normalisation round trips, exact mixtures, built-ins, readers, bad input."""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from ctmkit.core.mixtures import GaussianMixture
from ctmkit.data import Dataset, Normalizer, RestrictedUnpickler, builtin_names, load_data
from ctmkit.errors import UserError

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def save_npy(tmp_path: Path, a: np.ndarray, name: str = "x.npy") -> str:
    p = tmp_path / name
    np.save(p, a)
    return str(p)


def write_gmm(tmp_path: Path, obj, name: str = "g.json") -> str:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return f"gmm:{p}"


# ---- normalisation round trips ------------------------------------------------------------------
@pytest.mark.parametrize("shape,layout,c", [
    ((5, 6, 7), "NHW", 1), ((5, 6, 7, 1), "NHWC", 1), ((5, 6, 7, 3), "NHWC", 3), ((5, 6, 7, 4), "NHWC", 4),
    ((5, 1, 6, 7), "NCHW", 1), ((5, 3, 6, 7), "NCHW", 3)])
def test_uint8_image_round_trip_is_exact(tmp_path, shape, layout, c):
    a = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    a.flat[0], a.flat[1] = 0, 255
    d = load_data(save_npy(tmp_path, a))
    assert d.kind == "image" and d.normalizer.layout == layout and d.normalizer.dtype == "uint8"
    assert d.x.dtype == torch.float32 and d.shape == (c, 6, 7)
    assert d.x.min() == -1 and d.x.max() == 1
    back = d.normalizer.to_data(d.x)
    assert back.dtype == np.uint8 and np.array_equal(back, a)


@pytest.mark.parametrize("lo,hi,expect", [(0.0, 1.0, (0.0, 1.0)), (-1.0, 1.0, (-1.0, 1.0)),
                                          (-3.0, 7.0, (-3.0, 7.0))])
@pytest.mark.parametrize("shape", [(4, 5, 6), (4, 5, 6, 3), (4, 3, 5, 6)])
def test_float_image_round_trip(tmp_path, lo, hi, expect, shape):
    a = np.random.default_rng(1).uniform(lo, hi, size=shape)  # float64 data -> "float32"
    a.flat[0], a.flat[1] = lo, hi
    d = load_data(save_npy(tmp_path, a))
    assert (d.normalizer.lo, d.normalizer.hi) == expect and d.normalizer.dtype == "float32"
    back = d.normalizer.to_data(d.x)
    assert back.dtype == np.float32 and back.shape == a.shape
    np.testing.assert_allclose(back, a, atol=1e-5 * (hi - lo))
    # image float data is clipped to [lo, hi] on the way back
    wide = d.normalizer.to_data(d.x * 3)
    assert wide.max() <= expect[1] and wide.min() >= expect[0]


def test_float_image_within_unit_range_is_not_stretched(tmp_path):
    a = np.full((3, 4, 4), 0.25, dtype=np.float32)
    a[0, 0, 0] = 0.75
    d = load_data(save_npy(tmp_path, a))
    assert (d.normalizer.lo, d.normalizer.hi) == (0.0, 1.0)
    assert torch.allclose(d.x[1], torch.full((1, 4, 4), -0.5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.uint8, np.int32])
def test_vector_round_trip_and_std(tmp_path, dtype):
    rng = np.random.default_rng(2)
    a = (rng.normal(size=(400, 3)) * [1.0, 10.0, 0.1] + [5.0, -3.0, 100.0])
    a = np.clip(a, 0, 255).round() if dtype in (np.uint8, np.int32) else a
    a = a.astype(dtype)
    d = load_data(save_npy(tmp_path, a))
    assert d.kind == "vector" and d.shape == (3,) and d.normalizer.layout == "ND"
    x = d.x.double()
    # one scalar scale: overall model-space std 0.5, zero mean per dim
    assert math.isclose(x.var(0, unbiased=False).mean().sqrt().item(), 0.5, rel_tol=1e-4)
    assert x.mean(0).abs().max() < 1e-4
    back = d.normalizer.to_data(d.x)
    if dtype == np.uint8:
        assert back.dtype == np.uint8 and np.array_equal(back, a)
    else:
        assert back.dtype == np.float32
        np.testing.assert_allclose(back, a.astype(np.float64), rtol=1e-5, atol=1e-3)


def test_normalizer_dict_round_trip_and_shape_checks():
    for norm in (Normalizer("vector", "ND", "float32", shift=[1.0, 2.0], scale=0.3),
                 Normalizer("image", "NHWC", "uint8", lo=0.0, hi=255.0)):
        d = json.loads(json.dumps(norm.to_dict()))
        assert Normalizer.from_dict(d) == norm
    with pytest.raises(UserError, match="missing key 'layout'"):
        Normalizer.from_dict({"kind": "image"})
    with pytest.raises(UserError, match="invalid normalizer"):
        Normalizer.from_dict({"kind": "image", "layout": "XYZ", "dtype": "uint8"})
    norm = Normalizer("image", "NHW", "uint8", lo=0.0, hi=255.0)
    with pytest.raises(UserError, match=r"expected data of shape \[N, H, W\]"):
        norm.to_model(np.zeros((2, 3, 4, 5)))
    with pytest.raises(UserError, match="does not fit image data"):
        norm.to_data(torch.zeros(2, 3, 4, 5))
    out = norm.to_data(torch.tensor([[[[2.0, -2.0, float("nan")]]]]))
    assert out.tolist() == [[[255, 0, 0]]]


# ---- mixtures -----------------------------------------------------------------------------------
def test_gmm_json_mixture_matches_normalised_data(tmp_path):
    means = [[10.0, -4.0, 0.0], [13.0, -2.0, 1.0], [9.0, 0.0, -2.0]]
    stds, weights = [0.5, 1.0, 0.3], [2.0, 1.0, 1.0]  # weights normalised on load
    d = load_data(write_gmm(tmp_path, {"means": means, "stds": stds, "weights": weights}), n=4000, seed=3)
    assert d.shape == (3,) and d.mixture is not None and d.sampler is not None and d.labels is None
    assert torch.allclose(d.mixture.weights, torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    data_gmm = GaussianMixture(torch.tensor(means), torch.tensor(stds), torch.tensor(weights))
    xd = d.normalizer.to_model(data_gmm.sample(200_000, torch.Generator().manual_seed(0)).numpy()).double()
    xm = d.mixture.sample(200_000, torch.Generator().manual_seed(1)).double()
    assert torch.allclose(xd.mean(0), xm.mean(0), atol=0.01)
    assert torch.allclose(torch.cov(xd.T), torch.cov(xm.T), atol=0.01)
    assert math.isclose(xm.var(0).mean().sqrt().item(), 0.5, rel_tol=0.01)  # exact moments -> std 0.5
    # log-density change of variables: log p_model(T x) = log p_data(x) - D log(scale)
    x = data_gmm.sample(64, torch.Generator().manual_seed(2))
    lp_model = d.mixture.log_prob(d.normalizer.to_model(x.numpy()).double())
    lp_data = data_gmm.log_prob(x.double()) - 3 * math.log(d.normalizer.scale)
    assert torch.allclose(lp_model, lp_data, atol=1e-4)
    # the normaliser maps the mixture means exactly
    shift = torch.tensor(d.normalizer.shift, dtype=torch.float64)
    means64 = torch.tensor(means, dtype=torch.float64)
    assert torch.allclose(d.mixture.means, (means64 - shift) * d.normalizer.scale)
    assert torch.allclose(d.mixture.stds, torch.tensor(stds, dtype=torch.float64) * d.normalizer.scale)


# ---- built-ins ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", builtin_names())
def test_builtins_load_and_sample_reproducibly(name):
    d = load_data(name, n=500, seed=1)
    assert isinstance(d, Dataset) and d.spec == name and d.x.dtype == torch.float32
    assert torch.isfinite(d.x).all()
    if name == "digits":
        assert d.shape == (1, 8, 8) and d.num_classes == 10 and d.labels is not None and len(d.x) == 500
        assert d.normalizer.to_dict() == {"kind": "image", "layout": "NHW", "dtype": "float32", "shift": None,
                                          "scale": 1.0, "lo": 0.0, "hi": 16.0}
        assert d.x.min() >= -1 and d.x.max() <= 1
        assert set(np.unique(d.normalizer.to_data(d.x))) <= set(range(17))
    else:
        assert d.shape == (2,) and d.kind == "vector" and len(d.x) == 500 and d.sampler is not None
        assert (d.mixture is not None) == (name in ("ring", "labelled_ring", "labelled_blobs", "grid"))
        assert abs(d.x.double().var(0).mean().sqrt().item() - 0.5) < 0.05
        assert torch.equal(load_data(name, n=500, seed=1).x, d.x)
        assert not torch.equal(load_data(name, n=500, seed=2).x, d.x)
        assert load_data(name).x.shape == (20000, 2)
        assert load_data(name, n=10).normalizer == d.normalizer  # deterministic, independent of n/seed
    a = d.fresh(64, torch.Generator().manual_seed(5))
    b = d.fresh(64, torch.Generator().manual_seed(5))
    c = d.fresh(64, torch.Generator().manual_seed(6))
    assert a.shape == (64,) + d.shape and torch.equal(a, b) and not torch.equal(a, c)
    xb, yb = d.sample_batch(32, torch.Generator().manual_seed(0))
    assert xb.shape == (32,) + d.shape and (yb is None) == (d.labels is None)


def test_builtin_mixture_log_prob_is_a_density():
    d = load_data("ring", n=2000)
    # the model-space mixture integrates to 1: Monte-Carlo over a box covering it
    g = torch.Generator().manual_seed(0)
    box = 1.2
    u = (torch.rand(200_000, 2, generator=g, dtype=torch.float64) * 2 - 1) * box
    mass = d.mixture.log_prob(u).exp().mean().item() * (2 * box) ** 2
    assert abs(mass - 1) < 0.05
    assert d.mixture.log_prob(d.x).mean() > d.mixture.log_prob(torch.zeros(1, 2)).item()


def test_finite_dataset_batches_and_fresh(tmp_path):
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10) % 3
    p = tmp_path / "d.npz"
    np.savez(p, data=x, labels=y)
    d = load_data(str(p))
    assert d.num_classes == 3 and d.labels.dtype == torch.int64 and d.sampler is None and d.mixture is None
    xb, yb = d.sample_batch(50, torch.Generator().manual_seed(0))
    back = d.normalizer.to_data(xb)
    np.testing.assert_allclose(back[:, 0] / 2, np.round(back[:, 0] / 2), atol=1e-4)
    assert np.array_equal(yb.numpy(), np.round(back[:, 0] / 2).astype(int) % 3)  # labels stay with their rows
    f = d.fresh(10, torch.Generator().manual_seed(0))
    assert len(torch.unique(f, dim=0)) == 10  # without replacement
    assert d.fresh(25).shape == (25, 2)
    assert load_data(str(p), n=4).x.shape == (4, 2) and load_data(str(p), n=4).labels.tolist() == [0, 1, 2, 0]


def test_npz_only_array_and_y_labels(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, whatever=np.ones((3, 4, 4), np.uint8), y=np.array([0, 4, 1]))
    d = load_data(str(p))
    assert d.shape == (1, 4, 4) and d.num_classes == 5


# ---- image folders ------------------------------------------------------------------------------
def _png(path: Path, size=(6, 5), mode="L", value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 7)).save(path)


def test_image_folder_with_classes(tmp_path):
    _png(tmp_path / "cats" / "a.png", value=10)
    _png(tmp_path / "cats" / "b.png", value=20)
    _png(tmp_path / "dogs" / "c.jpg", mode="RGB", value=200)
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_data(str(tmp_path))
    assert d.num_classes == 2 and d.labels.tolist() == [0, 0, 1]
    assert d.normalizer.layout == "NHWC" and d.normalizer.dtype == "uint8" and d.shape == (3, 5, 6)
    back = d.normalizer.to_data(d.x)
    assert back.shape == (3, 5, 6, 3) and back[0, 0, 0].tolist() == [10, 10, 10]
    capped = load_data(str(tmp_path), n=1)
    assert capped.x.shape == (1, 1, 5, 6) and capped.num_classes == 2 and capped.labels.tolist() == [0]


def test_image_folder_flat_grayscale(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", value=50 * i)
    d = load_data(str(tmp_path))
    assert d.labels is None and d.num_classes == 0 and d.normalizer.layout == "NHW" and d.shape == (1, 5, 6)
    assert d.normalizer.to_data(d.x)[:, 0, 0].tolist() == [0, 50, 100]


# ---- MNIST idx ----------------------------------------------------------------------------------
def _idx(path: Path, magic: int, arr: np.ndarray, gz: bool) -> None:
    raw = np.array([magic, *arr.shape], dtype=">i4").tobytes() + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_tiny(tmp_path, gz):
    imgs = np.random.default_rng(0).integers(0, 256, size=(7, 4, 5), dtype=np.uint8)
    _idx(tmp_path / "train-images-idx3-ubyte", 2051, imgs, gz)
    _idx(tmp_path / "train-labels-idx1-ubyte", 2049, np.arange(7) % 10, gz)
    d = load_data(str(tmp_path))
    assert d.shape == (1, 4, 5) and d.num_classes == 10 and d.labels.tolist() == list(range(7))
    assert np.array_equal(d.normalizer.to_data(d.x), imgs)
    assert np.array_equal(d.normalizer.to_data(load_data(str(tmp_path), n=3).x), imgs[:3])


@pytest.mark.skipif(not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason="no real MNIST here")
def test_mnist_real_folder():
    d = load_data(str(MNIST_DIR), n=500)
    assert d.x.shape == (500, 1, 28, 28) and d.num_classes == 10
    assert d.labels[:5].tolist() == [5, 0, 4, 1, 9]
    back = d.normalizer.to_data(d.x)
    assert back.dtype == np.uint8 and back.shape == (500, 28, 28) and back.max() == 255


# ---- CIFAR-10 batches ---------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches(tmp_path, protocol):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    raw = []
    for i in (1, 2):
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        raw.append(data)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": [i, 9, 0], b"batch_label": b"x"}, f, protocol=protocol)
    for spec in (str(folder), str(tmp_path)):  # the batches folder or its parent
        d = load_data(spec)
        assert d.shape == (3, 32, 32) and d.num_classes == 10 and d.labels.tolist() == [1, 9, 0, 2, 9, 0]
        back = d.normalizer.to_data(d.x)
        assert back.shape == (6, 32, 32, 3) and d.normalizer.layout == "NHWC"
        # row layout: 1024 red, then green, then blue values, each row-major 32x32
        assert back[4, 2, 5, 1] == raw[1][1, 1024 + 2 * 32 + 5]
        assert np.array_equal(back[:3], raw[0].reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar_python2_pickle(tmp_path):
    """The real batches were written by Python 2 cPickle: str opcodes, numpy.core module names."""
    raw = np.random.default_rng(0).integers(0, 256, size=(2, 3072), dtype=np.uint8)
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
             b"(K\x01K\x02M\x00\x0c\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
             b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             b"\x89T" + struct.pack("<i", raw.size) + raw.tobytes() + b"tb")
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x02}(U\x04data" + array + b"U\x06labels](K\x03K\x07eu.")
    d = load_data(tmp_path)  # a Path is accepted too
    assert d.labels.tolist() == [3, 7]
    assert np.array_equal(d.normalizer.to_data(d.x), raw.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned.txt"
    folder = tmp_path / "cifar"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f)
    with pytest.raises(UserError, match=r"refusing to unpickle '(posix|nt|os)\.system'"):
        load_data(str(folder))
    assert not marker.exists()
    with open(folder / "data_batch_1", "rb") as f, pytest.raises(UserError, match="refusing"):
        RestrictedUnpickler(f).load()
    assert not marker.exists()


# ---- bad input ----------------------------------------------------------------------------------
def _bad_npy(a):
    return lambda tmp: save_npy(tmp, a)


def _npz(**arrays):
    def make(tmp: Path) -> str:
        np.savez(tmp / "d.npz", **arrays)
        return str(tmp / "d.npz")
    return make


def _file(name: str, content: bytes):
    def make(tmp: Path) -> str:
        (tmp / name).write_bytes(content)
        return str(tmp / name)
    return make


def _gmm(obj):
    return lambda tmp: write_gmm(tmp, obj)


GOOD = {"means": [[0.0, 1.0], [2.0, 3.0]], "stds": [0.1, 0.2], "weights": [1.0, 1.0]}
NAN_AT_3 = np.zeros((5, 2))
NAN_AT_3[3, 1] = np.nan
INF_AT_1 = np.zeros((4, 3, 3), np.float32)
INF_AT_1[1, 0, 0] = np.inf

BAD = {
    "missing path": (lambda tmp: str(tmp / "nope.npy"), r"data path '.*nope\.npy' does not exist"),
    "unknown built-in": (lambda tmp: "rings", r"unknown data set 'rings'.*ring, grid, moons"),
    "1-d array": (_bad_npy(np.zeros(5)),
                  r"expected \[N, D\] vectors or \[N, H, W\(, C\)\] images, got shape \(5,\)"),
    "5-d array": (_bad_npy(np.zeros((2, 2, 2, 2, 2))), r"got shape \(2, 2, 2, 2, 2\)"),
    "ambiguous 4-d": (_bad_npy(np.zeros((2, 5, 6, 7))), r"got shape \(2, 5, 6, 7\)"),
    "bool": (_bad_npy(np.zeros((3, 2), bool)), "dtype bool; expected uint8 or floating"),
    "strings": (_bad_npy(np.array([["a", "b"]])), "dtype <U1"),
    "complex": (_bad_npy(np.zeros((3, 2), np.complex64)), "dtype complex64"),
    "object": (_bad_npy(np.array([[1, None]], dtype=object)), "cannot read .* as a .npy array"),
    "empty": (_bad_npy(np.zeros((0, 3))), r"data is empty \(shape \(0, 3\)\)"),
    "nan": (_bad_npy(NAN_AT_3), r"data contains NaN or Inf values \(first at index 3\)"),
    "inf": (_bad_npy(INF_AT_1), r"NaN or Inf values \(first at index 1\)"),
    "too big": (_bad_npy(np.array([[1e300, 0.0]])), "beyond the float32 range"),
    "corrupt npy": (_file("c.npy", b"garbage"), "cannot read .* as a .npy array"),
    "corrupt npz": (_file("c.npz", b"garbage"), "cannot read .* as a .npz archive"),
    "npz many keys": (_npz(a=np.zeros((2, 2)), b=np.zeros((2, 2))), r"put the data under one of x, data"),
    "labels length": (_npz(x=np.zeros((3, 2)), labels=np.array([0, 1])),
                      "labels have shape .2,. but the data has 3"),
    "labels negative": (_npz(x=np.zeros((3, 2)), labels=np.array([0, -1, 1])), "labels must be >= 0"),
    "labels huge": (_npz(x=np.zeros((2, 2)), labels=np.array([0, 2**40])), "label 1099511627776 is too"),
    "labels float": (_npz(x=np.zeros((3, 2)), y=np.array([0.5, 1, 1])), "labels must be integers"),
    "unsupported file": (_file("d.csv", b"1,2"), "unsupported data file"),
    "json without gmm:": (_file("g.json", b"{}"), "write gmm:"),
    "gmm missing file": (lambda tmp: f"gmm:{tmp / 'none.json'}", "mixture file .* does not exist"),
    "gmm invalid json": (_gmm("{means: 1"), "is not valid JSON"),
    "gmm not object": (_gmm([1, 2]), "must hold an object"),
    "gmm missing key": (_gmm({"means": [[0.0]], "stds": [1.0]}), "missing key 'weights'"),
    "gmm ragged": (_gmm({**GOOD, "means": [[0.0, 1.0], [2.0]]}), r"'means' must be a \[K\]\[D\] list"),
    "gmm means 1-d": (_gmm({**GOOD, "means": [0.0, 1.0]}), r"'means' must be a non-empty \[K\]\[D\]"),
    "gmm mismatch": (_gmm({**GOOD, "stds": [0.1]}), "2 means but 1 stds and 2 weights"),
    "gmm zero std": (_gmm({**GOOD, "stds": [0.1, 0.0]}), "stds must be positive"),
    "gmm negative weight": (_gmm({**GOOD, "weights": [1.0, -0.5]}), "weights must be non-negative"),
    "gmm zero-sum weights": (_gmm({**GOOD, "weights": [0.0, 0.0]}), "positive sum"),
    "gmm nan": (_gmm('{"means": [[NaN, 0]], "stds": [1], "weights": [1]}'), "'means' contains NaN or Inf"),
    "gmm string": (_gmm({**GOOD, "stds": ["a", 1]}), "'stds' must be a"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_user_error(tmp_path, case):
    make, match = BAD[case]
    with pytest.raises(UserError, match=match):
        load_data(make(tmp_path))


def test_bad_n_and_spec():
    with pytest.raises(UserError, match="n must be a positive integer"):
        load_data("ring", n=0)
    with pytest.raises(UserError, match="non-empty string"):
        load_data("  ")
    with pytest.raises(UserError, match="seed must be an integer"):
        load_data("ring", seed=1.5)


def test_bad_image_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no image files"):
        load_data(str(empty))
    sizes = tmp_path / "sizes"
    _png(sizes / "a.png", size=(4, 4))
    _png(sizes / "b.png", size=(5, 4))
    with pytest.raises(UserError, match=r"images differ in size: '.*a\.png' is 4x4 but '.*b\.png' is 5x4"):
        load_data(str(sizes))
    broken = tmp_path / "broken"
    _png(broken / "a.png")
    (broken / "b.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read image file '.*b\.png'"):
        load_data(str(broken))
    truncated = tmp_path / "truncated"
    _png(truncated / "a.png", size=(64, 64))
    _png(truncated / "b.png", size=(64, 64))
    (truncated / "b.png").write_bytes((truncated / "a.png").read_bytes()[:60])
    lazy = load_data(str(truncated))     # the header is intact: found when the pixels are decoded
    assert lazy[[0]].shape == (1, 1, 64, 64)
    with pytest.raises(UserError, match=r"cannot read image file '.*b\.png'"):
        lazy[[1]]
    empty_class = tmp_path / "classes"
    _png(empty_class / "a" / "x.png")
    (empty_class / "b").mkdir()
    with pytest.raises(UserError, match="class folder '.*b' has no image files"):
        load_data(str(empty_class))


def test_bad_mnist_and_cifar(tmp_path):
    imgs = np.zeros((4, 3, 3), np.uint8)
    bad_magic = tmp_path / "m1"
    bad_magic.mkdir()
    _idx(bad_magic / "train-images-idx3-ubyte", 2049, imgs, gz=False)
    with pytest.raises(UserError, match="magic 2049, expected 2051"):
        load_data(str(bad_magic))
    short = tmp_path / "m2"
    short.mkdir()
    _idx(short / "train-images-idx3-ubyte", 2051, imgs, gz=True)
    raw = gzip.decompress((short / "train-images-idx3-ubyte.gz").read_bytes())
    (short / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(UserError, match="wrong size for its header"):
        load_data(str(short))
    (short / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read idx file"):
        load_data(str(short))
    count = tmp_path / "m3"
    count.mkdir()
    _idx(count / "train-images-idx3-ubyte", 2051, imgs, gz=False)
    _idx(count / "train-labels-idx1-ubyte", 2049, np.zeros(3), gz=False)
    with pytest.raises(UserError, match="has 3 labels but the images file has 4 images"):
        load_data(str(count))
    cifar = tmp_path / "c"
    cifar.mkdir()
    with open(cifar / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(UserError, match=r"no uint8 \[N, 3072\] 'data' array"):
        load_data(str(cifar))
    with open(cifar / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(UserError, match="label 10 is out of range for 10 classes"):
        load_data(str(cifar))
    (cifar / "data_batch_1").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="cannot read .* as a CIFAR-10 python batch"):
        load_data(str(cifar))


# ---- property: any .npy either loads or raises UserError ----------------------------------------
_DTYPES = st.sampled_from([np.uint8, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_,
                           np.complex64])


_SHAPES = st.one_of(hnp.array_shapes(min_dims=1, max_dims=5, min_side=1, max_side=5),
                    hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(dtype=_DTYPES, shape=_SHAPES))
def test_any_npy_loads_or_raises_user_error(a):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "a.npy"
        np.save(p, a)
        try:
            d = load_data(str(p))
        except UserError as e:
            assert "\n" not in str(e) and str(e)
            return
    assert isinstance(d, Dataset) and d.x.dtype == torch.float32 and torch.isfinite(d.x).all()
    assert d.x.shape[0] == a.shape[0] and d.kind in ("vector", "image")
    back = d.normalizer.to_data(d.x)
    assert back.shape == a.shape
    if a.dtype == np.uint8:
        assert np.array_equal(back, a)
