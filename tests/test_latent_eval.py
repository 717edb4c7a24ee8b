"""`ctmkit eval --prompts FILE` on latent text-to-image models (docs/method.md section 9), with the tiny random
Stable Diffusion pipeline and prepared folder of tests/test_latent_student.py (latents [4, 8, 8], images 16 x 16):
a distilled CTM against its teacher and the teacher alone (against images, and against FID statistics) write one
row per point, the samples scored are `ctmkit sample --prompts`'s images, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctmkit import load_model
from ctmkit.eval.prompt_eval import PromptDraws
from ctmkit.metrics.fid import fid_available
from tests.test_latent_data import cli_ok, refused
from tests.test_latent_student import QUICK, prepared

pytest.importorskip("diffusers")

PROMPTS = ["a cat", "a red dog"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """(pipeline folder, image folder it was prepared from, prepared latent folder, CTM run, prompt file)."""
    root = tmp_path_factory.mktemp("evalp")
    pipe, lat = prepared(root)
    cli_ok("distill", "--teacher", f"diffusers:{pipe}", "--data", lat, "--out", root / "run", *QUICK)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    return pipe, root / "src", lat, root / "run", root / "prompts.txt"


def test_eval_prompts_on_a_distilled_run_and_its_teacher(distilled, tmp_path):
    pipe, src, _, run, prompts = distilled
    out = cli_ok("eval", "--model", run, "--teacher", f"diffusers:{pipe}", "--prompts", prompts, "--data", src,
                 "--nfe", "1,2", "--gamma", "0,1", "--heun", "1", "--n", 5, "--seeds", 1, "--metric", "swd",
                 "--out", tmp_path / "ev.json")
    res = json.loads((tmp_path / "ev.json").read_text())
    assert (tmp_path / "ev.png").is_file() and "swd_ratio=" in out
    assert res["prompt_count"] == 2 and res["per_prompt"] == 2 and res["data"] == str(src)
    assert [(r["model"], r["sampler"], r["nfe"], r["gamma"]) for r in res["rows"]] == [
        ("ctm", "gamma", 1, 0.0), ("ctm", "gamma", 2, 0.0), ("ctm", "gamma", 1, 1.0), ("ctm", "gamma", 2, 1.0),
        ("teacher", "heun", 1, 0.0)]
    assert all(r["guidance"] == 1.0 and np.isfinite(r["value"]) for r in res["rows"])     # the CTM's own scale


def test_the_scored_samples_are_sample_prompts_images(distilled, tmp_path):
    _, _, _, run, prompts = distilled
    cli_ok("sample", "--model", run, "--prompts", prompts, "--n", 2, "--seed", 1, "--nfe", 2, "--gamma", 0.5,
           "--out", tmp_path / "s.npz", "--quiet")
    images = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"])          # uint8 [4, 16, 16, 3]
    x = torch.cat(list(PromptDraws(PROMPTS)(load_model(run), 5, 2, 0.5, 1, 500, "gamma")))   # 5 // 2 a prompt
    assert torch.equal(x, images.permute(0, 3, 1, 2).double().div(255).mul(2).sub(1).float())


def test_eval_prompts_on_the_teacher_alone(distilled, tmp_path):
    pipe, src, _, _, prompts = distilled
    metric = "auto" if fid_available() else "swd"                              # auto: fid for unlabelled images
    cli_ok("eval", "--model", f"diffusers:{pipe}", "--prompts", prompts, "--data", src, "--heun", "1,3", "--n", 4,
           "--seeds", 1, "--metric", metric, "--out", tmp_path / "t.json")
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["metric"] == ("fid" if fid_available() else "swd_ratio") and res["model_kind"] == "teacher"
    assert [(r["sampler"], r["nfe"], r["guidance"]) for r in res["rows"]] == [("heun", 1, 7.5), ("heun", 3, 7.5)]
    if fid_available():                                                        # FID statistics of the images instead
        cli_ok("fid-ref", "--data", src, "--out", tmp_path / "ref.npz")
        cli_ok("eval", "--model", f"diffusers:{pipe}", "--prompts", prompts, "--ref", tmp_path / "ref.npz", "--heun",
               "1", "--n", 4, "--out", tmp_path / "r.json")
        rows = json.loads((tmp_path / "r.json").read_text())["rows"]
        assert len(rows) == 1 and rows[0]["value"] > 0


def test_refusals_are_one_line(distilled, tmp_path):
    pipe, src, lat, run, prompts = distilled
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "three.txt").write_text("a cat\nthe dog\nred\n")
    out = ["--out", tmp_path / "ev.json", "--heun", "", "--n", 4]
    refused("is a text-to-image model: give --prompts FILE", "eval", "--model", run, "--data", src, *out)
    refused("is a text-to-image model: give --prompts FILE", "eval", "--model", f"diffusers:{pipe}", "--data", src,
            *out)
    ring = Path(__file__).parent / "fixtures" / "run_v0_ring_ctm"
    refused("--prompts needs a latent text-to-image model", "eval", "--model", ring, "--data", "ring", "--prompts",
            prompts, *out)
    refused("holds no prompts", "eval", "--model", run, "--data", src, "--prompts", tmp_path / "empty.txt", *out)
    refused("is a prepared latent folder", "eval", "--model", run, "--data", lat, "--prompts", prompts, *out)
    refused("decodes images of shape (3, 16, 16)", "eval", "--model", run, "--data", "digits", "--prompts", prompts,
            *out)
    refused("--n 2 is fewer than the 3 prompts", "eval", "--model", run, "--data", src, "--prompts",
            tmp_path / "three.txt", *out[:-1], 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "three.txt"]
