"""EDM's dataset format (zip or folder with dataset.json) read directly, and `ctmkit prepare` converting sources to a
uint8 .npy (+ labels) with bounded memory; bad input gives one clear line."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from ctmkit.data import load_data
from ctmkit.data.prepare import prepare
from ctmkit.errors import UserError

from .test_cli import ctmkit, ok


def _images(n: int, size=(6, 6), seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def edm_zip(path, imgs, labels=None):
    """A zip as EDM's dataset_tool writes it: 00000/img00000000.png ... and dataset.json."""
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(imgs))]
    with zipfile.ZipFile(path, "w") as zf:
        for name, a in zip(names, imgs):
            with zf.open(name, "w") as f:
                Image.fromarray(a).save(f, format="png")
        meta = {"labels": None if labels is None else [[n, int(c)] for n, c in zip(names, labels)]}
        zf.writestr("dataset.json", json.dumps(meta))
    return path


def test_edm_zip_and_folder_load_with_labels(tmp_path):
    imgs, labels = _images(7), [0, 2, 1, 2, 0, 1, 1]
    data = load_data(str(edm_zip(tmp_path / "d.zip", imgs, labels)))
    assert data.shape == (3, 6, 6) and data.labels.tolist() == labels and data.num_classes == 3
    folder = tmp_path / "f"
    with zipfile.ZipFile(tmp_path / "d.zip") as zf:
        zf.extractall(folder)
    same = load_data(str(folder))
    assert np.array_equal(same.x.numpy(), data.x.numpy()) and same.labels.tolist() == labels
    unlabelled = load_data(str(edm_zip(tmp_path / "u.zip", imgs)))
    assert unlabelled.labels is None


def test_prepare_writes_uint8_npy_and_labels_read_back_together(tmp_path):
    imgs, labels = _images(5), [1, 0, 1, 1, 0]
    info = prepare(edm_zip(tmp_path / "d.zip", imgs, labels), tmp_path / "p.npy", progress=False)
    assert info == {"n": 5, "shape": [6, 6, 3], "labelled": True}
    a = np.load(tmp_path / "p.npy")
    assert a.dtype == np.uint8 and np.array_equal(a, np.stack(imgs))
    assert np.load(tmp_path / "p.labels.npy").tolist() == labels
    assert load_data(str(tmp_path / "p.npy")).labels.tolist() == labels
    assert not list(tmp_path.glob(".*tmp*"))                  # no temp files left


def test_prepare_resolution_centre_crops_and_resizes(tmp_path):
    folder = tmp_path / "imgs" / "cats"
    folder.mkdir(parents=True)
    for i, a in enumerate(_images(3, size=(10, 16))):
        Image.fromarray(a).save(folder / f"{i}.png")
    (tmp_path / "imgs" / "dogs").mkdir()
    Image.fromarray(_images(1, size=(12, 9))[0]).save(tmp_path / "imgs" / "dogs" / "x.png")
    r = ctmkit("prepare", tmp_path / "imgs", tmp_path / "p.npy", cwd=tmp_path)
    assert r.returncode != 0 and "differ in size" in r.stderr and "--resolution" in r.stderr
    ok(ctmkit("prepare", tmp_path / "imgs", tmp_path / "p.npy", "--resolution", "8", "--quiet", cwd=tmp_path))
    a = np.load(tmp_path / "p.npy")
    assert a.shape == (4, 8, 8, 3) and np.load(tmp_path / "p.labels.npy").tolist() == [0, 0, 0, 1]


def test_prepare_from_arrays(tmp_path):
    imgs = np.stack(_images(4))
    np.savez(tmp_path / "a.npz", x=imgs, labels=np.array([0, 1, 2, 3]))
    prepare(tmp_path / "a.npz", tmp_path / "p.npy", progress=False)
    assert np.array_equal(np.load(tmp_path / "p.npy"), imgs)
    np.save(tmp_path / "f.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(UserError, match="not a set of uint8 images"):
        prepare(tmp_path / "f.npy", tmp_path / "q.npy", progress=False)


def test_bad_edm_inputs_are_one_clear_line(tmp_path):
    imgs = _images(3)
    z = edm_zip(tmp_path / "d.zip", imgs, [0, 1, 0])
    with zipfile.ZipFile(z, "a") as zf:                       # an image without a label
        with zf.open("00000/img00000099.png", "w") as f:
            Image.fromarray(imgs[0]).save(f, format="png")
    with pytest.raises(UserError, match="no label for '00000/img00000099.png'"):
        load_data(str(z))
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("00000/img00000000.png", b"not a png at all")
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    r = ctmkit("prepare", bad, tmp_path / "p.npy", "--quiet", cwd=tmp_path)
    assert r.returncode != 0 and "img00000000.png" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.npy").exists()
    neg = edm_zip(tmp_path / "neg.zip", imgs, [0, -1, 0])
    with pytest.raises(UserError, match="class indices >= 0"):
        load_data(str(neg))


def test_prepare_reads_a_cifar_parent_folder_as_arrays(tmp_path):
    """A folder holding cifar-10-batches-py is CIFAR-10 (as `--data` reads it), not a folder of class subfolders."""
    import pickle
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = np.random.default_rng(0).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": rows, b"labels": [4, 0, 9]}, f)
    info = prepare(tmp_path / "data", tmp_path / "c.npy", progress=False)
    assert info == {"n": 3, "shape": [32, 32, 3], "labelled": True}
    assert np.array_equal(np.load(tmp_path / "c.npy"), rows.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))
    assert np.load(tmp_path / "c.labels.npy").tolist() == [4, 0, 9]
