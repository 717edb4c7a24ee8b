"""Classifier-free guidance at sampling time (issue 27, point 4): `ctmkit sample --guidance W`, `eval --guidance
W1,W2` and `diagnose --guidance W1,W2`, held against the exact guided PF-ODE of the labelled mixture.

- the exact labelled mixture's guided Heun solve converges to an accurately solved guided ODE;
- `sample --guidance` on an unguided CTM with a null branch (w = 1: bitwise the samples without --guidance), a
  student distilled for one scale, one distilled for a range, models without a null branch, a negative scale: every
  refusal in one line, non-zero exit, nothing written;
- `eval` labels its rows with W; `diagnose` writes one set of coupled errors per W, W = 1 equal to the unguided ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ctmkit.cli import main
from ctmkit.core.guidance import guided
from ctmkit.core.mixtures import GaussianMixture
from ctmkit.core.sampling import heun_sample
from ctmkit.core.solvers import flow_map
from ctmkit.data.toy import labelled_ring_params

from .test_reliability import MLP, TINY, files_under, one_line_error

DATA = "labelled_ring"


def cli_ok(*args) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0 and res.exception is None, f"{res.output}\n{res.exception!r}"
    return res.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Tiny labelled_ring runs: CTMs with a null branch (unguided), for W = 2, for W in [1, 4], without a null branch;
    teachers with and without one."""
    root = tmp_path_factory.mktemp("guided")
    distill = {"null": [], "fixed": ["ctm.guidance=2"], "range": ["ctm.guidance=[1,4]"],
               "nonull": ["ctm.label_dropout=0"]}
    for name, extra in distill.items():
        cli_ok("distill", "--teacher", "exact", "--data", DATA, "--out", root / name, *TINY, *MLP, *extra)
    for name, extra in {"teacher_null": ["label_dropout=0.1"], "teacher": []}.items():
        cli_ok("train-teacher", "--data", DATA, "--out", root / name, *TINY, *MLP, *extra)
    return {name: root / name for name in [*distill, "teacher_null", "teacher"]}


def read(path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["samples"], f["labels"]


def sample(model, out, *extra) -> tuple[np.ndarray, np.ndarray]:
    cli_ok("sample", "--model", model, "--n", 12, "--out", out, "--quiet", *extra)
    return read(out)


def refused(model, tmp_path, keyword: str, *extra) -> None:
    """One line on stderr naming the problem, exit != 0, nothing written."""
    out = tmp_path / "refused"
    out.mkdir(parents=True)
    one_line_error(["sample", "--model", model, "--n", 4, "--out", out / "x.npz", "--quiet", *extra], keyword)
    assert files_under(out) == set()


# ---- the exact guided ODE ----------------------------------------------------------------------------------------
def test_the_exact_guided_heun_solve_converges_to_the_accurate_guided_flow():
    mix = GaussianMixture(*labelled_ring_params())
    assert guided(mix, 1.0) is mix
    d2 = guided(mix, 2.0)
    n = 32
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(n) % 4
    y = flow_map(d2, z * 80.0, 80.0, 0.002, steps=512, labels=labels)
    ref = d2(y, torch.full((n,), 0.002, dtype=torch.float64), labels)     # Heun's last step: Euler to sigma 0
    errs = [float((heun_sample(d2, z, nfe=k, labels=labels) - ref).norm(dim=1).mean()) for k in (35, 71, 201)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3, errs
    unguided = heun_sample(mix, z, nfe=201, labels=labels)
    assert float((unguided - ref).norm(dim=1).mean()) > 30 * errs[2]      # the guided flow goes elsewhere


# ---- ctmkit sample --guidance ------------------------------------------------------------------------------------
def test_an_unguided_ctm_with_a_null_branch_is_guided_and_w1_is_bitwise_unguided(runs, tmp_path):
    plain, labels = sample(runs["null"], tmp_path / "plain.npz")
    assert labels.tolist() == [0, 1, 2, 3] * 3                           # every class in turn without --labels
    one, labels1 = sample(runs["null"], tmp_path / "w1.npz", "--guidance", 1)
    assert np.array_equal(plain, one) and np.array_equal(labels, labels1)
    two, _ = sample(runs["null"], tmp_path / "w2.npz", "--guidance", 2, "--nfe", 2)
    zero, _ = sample(runs["null"], tmp_path / "w0.npz", "--guidance", 0, "--sampler", "heun", "--nfe", 3)
    assert np.isfinite(two).all() and np.isfinite(zero).all()
    assert not np.array_equal(two, sample(runs["null"], tmp_path / "p2.npz", "--nfe", 2)[0])


def test_a_teacher_with_a_null_branch_samples_the_guided_denoiser(runs, tmp_path):
    plain, _ = sample(runs["teacher_null"], tmp_path / "t1.npz", "--nfe", 5)
    assert np.array_equal(plain, sample(runs["teacher_null"], tmp_path / "t1g.npz", "--nfe", 5, "--guidance", 1)[0])
    two, _ = sample(runs["teacher_null"], tmp_path / "t2.npz", "--nfe", 5, "--guidance", 2)
    assert np.isfinite(two).all() and not np.array_equal(two, plain)


def test_a_student_for_one_scale_samples_at_that_scale_only(runs, tmp_path):
    own, _ = sample(runs["fixed"], tmp_path / "own.npz")
    assert np.array_equal(own, sample(runs["fixed"], tmp_path / "w2.npz", "--guidance", 2)[0])
    refused(runs["fixed"], tmp_path, "distilled for guidance 2 only", "--guidance", 3)


def test_a_student_for_a_range_needs_a_scale_inside_it(runs, tmp_path):
    inside, _ = sample(runs["range"], tmp_path / "in.npz", "--guidance", 2.5)
    other, _ = sample(runs["range"], tmp_path / "in4.npz", "--guidance", 4)
    assert np.isfinite(inside).all() and inside.shape == (12, 2) and not np.array_equal(inside, other)
    refused(runs["range"], tmp_path / "a", "outside this CTM's trained range 1..4", "--guidance", 5)
    refused(runs["range"], tmp_path / "b", "give --guidance W in that range")


@pytest.mark.parametrize("which, keyword", [("nonull", "this CTM has none"), ("teacher", "this teacher has none")])
def test_a_model_without_a_null_branch_is_refused(runs, tmp_path, which, keyword):
    refused(runs[which], tmp_path, keyword, "--guidance", 2)
    sample(runs[which], tmp_path / "w1.npz", "--guidance", 1, "--nfe", 3)          # w = 1 needs no null branch


def test_a_negative_scale_is_refused(runs, tmp_path):
    refused(runs["null"], tmp_path, "must be a number >= 0", "--guidance", -1)


def test_sample_help_teaches_the_convention():
    text = " ".join(CliRunner().invoke(main, ["sample", "--help"]).output.split())
    for words in ("guidance_scale", "1 = plain conditional", "0 = unconditional", "null branch", "ctm.guidance=W"):
        assert words in text, words


# ---- eval and diagnose --guidance --------------------------------------------------------------------------------
def test_eval_labels_its_rows_with_the_scale(runs, tmp_path):
    out = tmp_path / "e.json"
    text = cli_ok("eval", "--model", runs["null"], "--data", DATA, "--n", 64, "--seeds", 1, "--nfe", 1, "--gamma", 0,
                  "--heun", 3, "--teacher", runs["teacher_null"], "--guidance", "1,2", "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["guidance"]) for r in rows] == [("ctm", 1), ("teacher", 1), ("ctm", 2), ("teacher", 2)]
    assert "w=2" in text and rows[0]["value"] != rows[2]["value"]
    one_line_error(["eval", "--model", runs["null"], "--data", DATA, "--heun", 3, "--teacher", runs["teacher"],
                    "--guidance", "2", "--out", tmp_path / "f.json"], "this teacher has none")
    assert not (tmp_path / "f.json").exists()


def test_diagnose_writes_coupled_errors_per_scale_against_the_guided_ode(runs, tmp_path):
    args = ["diagnose", "--model", runs["null"], "--teacher", "exact", "--n", 8, "--nfe", "1,2", "--gamma", 0,
            "--grid", 4, "--steps", 24, "--quiet"]
    cli_ok(*args, "--out", tmp_path / "plain", "--no-map")
    cli_ok(*args, "--out", tmp_path / "guided", "--guidance", "1,2")
    plain = json.loads((tmp_path / "plain" / "diagnose.json").read_text())
    d = json.loads((tmp_path / "guided" / "diagnose.json").read_text())
    assert d["guidance"] == [1, 2] and [x["guidance"] for x in d["diagnoses"]] == [1, 2]
    assert d["diagnoses"][0]["coupled"] == plain["coupled"]          # w = 1: the unguided diagnosis, bitwise
    assert d["diagnoses"][0]["teacher_grid_floor"] == plain["teacher_grid_floor"]
    assert d["diagnoses"][1]["coupled"] != plain["coupled"] and d["diagnoses"][1]["teacher_grid_floor"] > 0
    assert {"coupled_error_w1.png", "jump_error_w2.png"} <= files_under(tmp_path / "guided")
    one_line_error([*args, "--model", runs["range"], "--out", tmp_path / "r"], "give --guidance W")


# ---- edit and ema take the scale too -----------------------------------------------------------------------------
def test_edit_guides_its_jumps_and_refuses_what_cannot_be_guided(runs, tmp_path):
    pts = np.array([[1.0, 0.5], [-1.5, 0.0]], np.float32)
    np.save(tmp_path / "pts.npy", pts)
    np.save(tmp_path / "m.npy", np.array([1, 0]))
    args = ["edit", "--task", "inpaint", "--input", tmp_path / "pts.npy", "--mask", tmp_path / "m.npy",
            "--labels", "1", "--num-samples", 3, "--nfe", 2, "--quiet"]
    cli_ok(*args, "--model", runs["null"], "--out", tmp_path / "plain.npz")
    cli_ok(*args, "--model", runs["null"], "--out", tmp_path / "w1.npz", "--guidance", 1)
    cli_ok(*args, "--model", runs["null"], "--out", tmp_path / "w3.npz", "--guidance", 3)
    plain, w1, w3 = (np.load(tmp_path / f"{n}.npz")["samples"] for n in ("plain", "w1", "w3"))
    assert np.array_equal(plain, w1) and not np.allclose(plain, w3)
    assert np.allclose(w3[:, 0], np.repeat(pts[:, 0], 3), atol=1e-5)             # the known coordinate kept
    out = tmp_path / "refused"
    out.mkdir()
    one_line_error([*args, "--model", runs["nonull"], "--out", out / "x.npz", "--guidance", 2], "null branch")
    one_line_error([*args, "--model", runs["fixed"], "--out", out / "x.npz", "--guidance", 3], "distilled for")
    assert files_under(out) == set()


def test_ema_sweeps_a_range_student_at_a_scale(runs):
    res = CliRunner().invoke(main, ["ema", str(runs["range"]), "--sweep", "0.05,0.1", "--teacher", "exact",
                                    "--n", "16", "--nfe", "1", "--guidance", "2"])
    assert res.exit_code == 0, res.output
    assert "sigma_rel 0.05" in res.output and "coupled error" in res.output
    one_line_error(["ema", runs["range"], "--sweep", "0.05", "--teacher", "exact", "--n", 16, "--nfe", 1],
                   "--guidance")


def test_conditional_image_networks_refuse_no_labels_and_take_the_null_label():
    from ctmkit.nets.edm_unets import SongUNet
    from ctmkit.nets.unet import UNet
    for net in (UNet(1, 8, model_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=3),
                SongUNet(8, 1, 1, label_dim=3, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])):
        x, nt = torch.randn(2, 1, 8, 8), torch.zeros(2)
        with pytest.raises(ValueError, match="conditioned on 3 classes"):
            net(x, nt)
        assert net(x, nt, None, torch.tensor([2, -1])).shape[0] == 2
