"""`ctmkit edit` (cli/edit.py, eval/editing.py, eval/edit_inputs.py): outputs in the data's own space, input-major,
independent of the batch size; every bad input refused in one line with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctmkit.core.editing import LUMA

from .test_cli_edges import cli_ok
from .test_layout import LEGACY_RUN
from .test_reliability import files_under, one_line_error


def image_run(path: Path, channels: int = 3, classes: int = 0, kind: str = "ctm") -> Path:
    """A run folder holding a tiny random 8x8 image CTM or teacher (uint8 data, NHWC for RGB, NHW for grey)."""
    from ctmkit.data.normalize import Normalizer
    from ctmkit.io.card import DataCard, ModelCard
    from ctmkit.io.checkpoint import save_checkpoint
    from ctmkit.io.runs import build_model
    from ctmkit.nets.registry import BackboneSpec
    norm = Normalizer("image", "NHWC" if channels == 3 else "NHW", "uint8", lo=0.0, hi=255.0)
    data = DataCard("imgs.npy", "image", (channels, 8, 8), classes, norm.to_dict())
    spec = BackboneSpec("unet", {"in_channels": channels, "resolution": 8, "model_channels": 8, "channel_mult": [1],
                                 "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
                                 "num_classes": classes, "fourier_scale": 1.0})
    card = ModelCard(kind, data, spec, 0.5, 0.002, 80.0, teacher="exact" if kind == "ctm" else None)
    import torch
    torch.manual_seed(0)
    model = build_model(card)
    path.mkdir()
    save_checkpoint(path / "checkpoints", 1, {"nets": {"ema0": model.state_dict()}})
    card.write(path)
    return path


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    return image_run(tmp_path_factory.mktemp("rgb") / "run")


def _images(path: Path, shape, seed=0) -> Path:
    np.save(path, np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))
    return path


def test_inpaint_a_2d_ctm_keeps_the_known_coordinate_input_major_and_batch_independent(tmp_path):
    pts = np.array([[1.0, 0.5], [-1.5, 0.0], [0.0, 2.0]], np.float32)
    np.save(tmp_path / "pts.npy", pts)
    np.save(tmp_path / "m.npy", np.array([1, 0]))
    args = ["edit", "--model", LEGACY_RUN, "--task", "inpaint", "--input", tmp_path / "pts.npy", "--mask",
            tmp_path / "m.npy", "--num-samples", 5, "--nfe", 3, "--gamma", 0.5, "--quiet"]
    cli_ok(*args, "--out", tmp_path / "a.npz")
    cli_ok(*args, "--out", tmp_path / "b.npz", "--batch-size", 4)
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert sorted(a.files) == ["inputs", "samples"] and a["samples"].shape == (15, 2)
    assert np.array_equal(a["inputs"], pts)
    assert np.allclose(a["samples"][:, 0], np.repeat(pts[:, 0], 5), atol=1e-5)     # input-major, x kept
    assert np.allclose(a["samples"], b["samples"], atol=1e-5)
    assert a["samples"][:5, 1].std() > 0                                          # draws differ


def test_invert_and_interpolate_write_noise_and_paths(tmp_path):
    pts = np.array([[1.0, 0.5], [-1.5, 0.0], [0.0, 2.0], [2.0, 0.0]], np.float32)
    np.save(tmp_path / "pts.npy", pts)
    cli_ok("edit", "--model", LEGACY_RUN, "--task", "invert", "--input", tmp_path / "pts.npy", "--steps", 8,
           "--out", tmp_path / "inv.npz", "--quiet")
    inv = np.load(tmp_path / "inv.npz")
    assert inv["samples"].shape == (4, 2) and inv["noise"].shape == (4, 2)
    cli_ok("edit", "--model", LEGACY_RUN, "--task", "interpolate", "--input", tmp_path / "pts.npy", "--steps", 8,
           "--num-samples", 5, "--out", tmp_path / "path.npz", "--quiet")
    path = np.load(tmp_path / "path.npz")
    assert path["samples"].shape == (10, 2) and np.allclose(path["lambdas"], np.linspace(0, 1, 5))
    assert np.allclose(path["noise"], inv["noise"])                         # the same inversion
    assert np.allclose(path["samples"][[0, 4, 5, 9]], inv["samples"], atol=1e-5)  # each path ends at its inputs'
    one_line_error(["edit", "--model", LEGACY_RUN, "--task", "interpolate", "--input", tmp_path / "pts.npy",
                    "--limit", 3, "--out", tmp_path / "odd.npz"], "pairs")


def test_superres_colorize_and_inpaint_on_a_tiny_rgb_model(tmp_path, rgb_run):
    low = _images(tmp_path / "low.npy", (2, 4, 4, 3))
    cli_ok("edit", "--model", rgb_run, "--task", "superres", "--factor", 2, "--input", low, "--num-samples", 3,
           "--nfe", 2, "--out", tmp_path / "sr.npz", "--quiet")
    sr = np.load(tmp_path / "sr.npz")
    assert sr["samples"].shape == (6, 8, 8, 3) and sr["samples"].dtype == np.uint8
    means = sr["samples"].astype(float).reshape(6, 4, 2, 4, 2, 3).mean((2, 4))
    clipped = ((sr["samples"] == 0) | (sr["samples"] == 255)).reshape(6, 4, 2, 4, 2, 3).any((2, 4))
    assert (~clipped).mean() > 0.5                  # block means kept up to uint8 rounding where nothing was clipped
    assert np.abs(means - np.repeat(np.load(low), 3, 0))[~clipped].max() <= 0.5 + 1e-9
    assert Image.open(tmp_path / "sr.png").size[0] > 0
    gray = _images(tmp_path / "gray.npy", (2, 8, 8))
    cli_ok("edit", "--model", rgb_run, "--task", "colorize", "--input", gray, "--num-samples", 2, "--nfe", 2,
           "--out", tmp_path / "col.npz", "--quiet")
    col = np.load(tmp_path / "col.npz")["samples"].astype(float)
    lum = col @ np.array(LUMA)
    inside = ((col > 0) & (col < 255)).all(-1)      # where no channel was clipped to the uint8 range
    assert inside.mean() > 0.5
    assert np.abs(lum - np.repeat(np.load(gray), 2, 0))[inside].max() <= 1.0
    imgs = _images(tmp_path / "imgs.npy", (2, 8, 8, 3))
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 1                                 # the left half is known, in every channel
    np.save(tmp_path / "mask.npy", mask)
    cli_ok("edit", "--model", rgb_run, "--task", "inpaint", "--mask", tmp_path / "mask.npy", "--input", imgs,
           "--num-samples", 2, "--out", tmp_path / "in.npz", "--quiet")
    got = np.load(tmp_path / "in.npz")["samples"]
    assert np.array_equal(got[:, :, :4], np.repeat(np.load(imgs), 2, 0)[:, :, :4])


def test_sdedit_and_labels_on_a_conditional_grey_model(tmp_path):
    run = image_run(tmp_path / "cond", channels=1, classes=3)
    imgs = _images(tmp_path / "g.npy", (3, 8, 8))
    base = ["edit", "--model", run, "--task", "sdedit", "--t0", 2.0, "--input", imgs, "--num-samples", 2]
    cli_ok(*base, "--labels", "2", "--out", tmp_path / "a.npz", "--quiet")
    assert np.load(tmp_path / "a.npz")["labels"].tolist() == [2] * 6
    np.save(tmp_path / "g.labels.npy", np.array([0, 1, 2]))           # the inputs' own labels
    cli_ok(*base, "--out", tmp_path / "b.npz", "--quiet")
    b = np.load(tmp_path / "b.npz")
    assert b["labels"].tolist() == [0, 0, 1, 1, 2, 2] and b["samples"].shape == (6, 8, 8)
    (tmp_path / "g.labels.npy").unlink()
    before = files_under(tmp_path)
    one_line_error([*base, "--out", tmp_path / "c.npz"], "give --labels")
    one_line_error([*base, "--labels", "0,1", "--out", tmp_path / "c.npz"], "one per input")
    one_line_error([*base, "--labels", "5", "--out", tmp_path / "c.npz"], "out of range")
    assert files_under(tmp_path) == before


def test_bad_inputs_are_refused_in_one_line_and_nothing_is_written(tmp_path, rgb_run):
    imgs = _images(tmp_path / "imgs.npy", (2, 8, 8, 3))
    small = _images(tmp_path / "small.npy", (2, 6, 6, 3))
    gray = _images(tmp_path / "gray.npy", (2, 8, 8))
    np.save(tmp_path / "m5.npy", np.ones((5, 5), np.uint8))
    np.save(tmp_path / "m2.npy", np.full((8, 8), 2, np.uint8))
    out = tmp_path / "o.npz"
    run = ["edit", "--model", rgb_run, "--out", out]
    before = files_under(tmp_path)
    cases = [
        (["--task", "inpaint", "--input", small, "--mask", tmp_path / "m5.npy"], "shape"),          # wrong shape
        (["--task", "inpaint", "--input", imgs, "--mask", tmp_path / "m5.npy"], "broadcast"),      # mask mismatch
        (["--task", "inpaint", "--input", imgs, "--mask", tmp_path / "m2.npy"], "0 (unknown)"),
        (["--task", "inpaint", "--input", imgs], "needs --mask"),
        (["--task", "colorize", "--input", imgs], "1-channel"),                                     # wrong channels
        (["--task", "superres", "--input", imgs, "--factor", 3], "does not divide"),
        (["--task", "superres", "--input", imgs, "--factor", 2], "1/2"),
        (["--task", "superres", "--input", small, "--mask", tmp_path / "m5.npy", "--factor", 2], "only to"),
        (["--task", "sdedit", "--input", imgs, "--t0", 100], "sigma range"),                        # t0 outside
        (["--task", "sdedit", "--input", imgs, "--t0", 0.001], "sigma range"),
        (["--task", "sdedit", "--input", imgs, "--t0", 1, "--labels", "1"], "not class-conditional"),
        (["--task", "invert", "--input", tmp_path / "nothing.npy"], "does not exist"),
        (["--task", "invert", "--input", imgs, "--gamma", 2], "gamma"),
    ]
    for extra, keyword in cases:
        one_line_error([*run, *extra], keyword)
    one_line_error(["edit", "--model", LEGACY_RUN, "--task", "colorize", "--input", gray, "--out", out],
                   "image model")
    grey_run = image_run(tmp_path / "grey", channels=1)
    before = files_under(tmp_path)
    one_line_error(["edit", "--model", grey_run, "--task", "colorize", "--input", gray, "--out", out], "RGB model")
    assert files_under(tmp_path) == before                        # nothing written
    out.write_bytes(b"x")
    one_line_error([*run, "--task", "invert", "--input", imgs], "--force")
    cli_ok(*run, "--task", "invert", "--input", imgs, "--steps", 2, "--force", "--quiet")
    assert set(np.load(out).files) == {"samples", "inputs", "noise"}


def test_a_teacher_edits_with_heun_steps(tmp_path):
    run = image_run(tmp_path / "teacher", channels=1, kind="teacher")
    imgs = _images(tmp_path / "g.npy", (2, 8, 8))
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 1
    Image.fromarray(mask * 255).save(tmp_path / "mask.png")             # a mask as a grey image: white = known
    cli_ok("edit", "--model", run, "--task", "inpaint", "--mask", tmp_path / "mask.png", "--input", imgs, "--nfe", 2,
           "--num-samples", 2, "--out", tmp_path / "t.npz", "--quiet")
    got = np.load(tmp_path / "t.npz")["samples"]
    assert got.shape == (4, 8, 8) and np.array_equal(got[:, 4:], np.repeat(np.load(imgs), 2, 0)[:, 4:])


def test_edit_under_torchrun_equals_one_process(tmp_path):
    """2 gloo ranks split the inversion chunks and the edit batches (batch k on rank k mod 2, per-sample seeds): the
    outputs are those of one process, bitwise; rank 0 alone writes."""
    from .test_cli import ctmkit, ok
    from .test_scale import _torchrun
    pts = np.random.default_rng(1).normal(size=(7, 2)).astype(np.float32)
    np.save(tmp_path / "pts.npy", pts)
    np.save(tmp_path / "m.npy", np.array([1, 0]))
    tasks = {"fill": ["--task", "inpaint", "--mask", str(tmp_path / "m.npy"), "--num-samples", "3", "--nfe", "2"],
             "inv": ["--task", "interpolate", "--steps", "4", "--num-samples", "3", "--limit", "6"]}
    for name, extra in tasks.items():
        args = ["edit", "--model", str(LEGACY_RUN), "--input", str(tmp_path / "pts.npy"), "--batch-size", "2", *extra]
        _torchrun([*args, "--out", str(tmp_path / f"{name}_two.npz")], tmp_path)
        ok(ctmkit(*args, "--out", tmp_path / f"{name}_one.npz", "--quiet", cwd=tmp_path))
        a, b = np.load(tmp_path / f"{name}_one.npz"), np.load(tmp_path / f"{name}_two.npz")
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), (name, key)
    assert np.load(tmp_path / "fill_one.npz")["samples"].shape == (21, 2)
    assert np.load(tmp_path / "inv_one.npz")["noise"].shape == (6, 2)


def test_the_demo_editing_examples_on_a_tiny_conditional_model(tmp_path):
    """eval/editing.py: edit_examples (the image demo's "Editing" section): the two grids, the hidden-pixel RMS
    and, with a classifier, its agreement with the items' classes; the report section that shows them."""
    import torch

    from ctmkit.data import load_data
    from ctmkit.demo import _editing_md
    from ctmkit.eval.editing import EXAMPLE_DRAWS, edit_examples
    from ctmkit.io.runs import load_model
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), labels=np.arange(20) % 3)
    data = load_data(str(tmp_path / "d.npz"))
    model = load_model(image_run(tmp_path / "run", channels=1, classes=3))
    seen = []

    def classifier(x):
        seen.append(x.shape)
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 3).float()   # always class 0

    e = edit_examples(model, data, tmp_path, classifier)
    assert (tmp_path / "edit_inpaint.png").is_file() and (tmp_path / "edit_superres.png").is_file()
    assert seen == [(16 * EXAMPLE_DRAWS, 1, 8, 8)] * 2
    idx = data.subset(16, torch.Generator().manual_seed(3))
    share0 = float((data.labels[idx] == 0).float().mean())
    for task in ("inpaint", "superres"):
        assert e[task]["rms_hidden"] > 0 and abs(e[task]["class_agreement"] - share0) < 1e-6
    md = "\n".join(_editing_md(e))
    assert "## Editing" in md and "edit_inpaint.png" in md and "edit_superres.png" in md
    assert _editing_md(None) == []
