"""CTM students of latent text-to-image teachers (docs/method.md section 9), on the tiny random Stable Diffusion
pipelines of tests/test_latent_teacher.py (latents [4, 8, 8]): a student starts as its teacher (full and LoRA), the
LoRA student's teacher is the shared module with its adapters off (= the teacher loaded apart), its checkpoints hold
only the trained tensors, `prepare --pipeline` -> `distill` -> `sample --prompt` end to end (full, LoRA, guided), a
resumed run equals an uninterrupted one bit for bit, and the one-line refusals."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from ctmkit import load_model, load_teacher
from ctmkit.config import DistillConfig, load_config
from ctmkit.data import load_data
from ctmkit.io.checkpoint import load_latest
from ctmkit.nets.lora import is_trained
from ctmkit.train.ctm import CTMRun
from tests.test_latent_data import check_one_jump, cli, cli_ok, image_folder, refused
from tests.test_latent_teacher import tiny_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

QUICK = ["--steps", 2, "--batch-size", 2, "ctm.num_scales=6", "ctm.max_k=2", "train.phema=[]", "train.ema=[0.9]",
         "--quiet"]


def prepared(root, prediction: str = "epsilon"):
    """(pipeline folder, prepared latent folder of 5 random images) under root."""
    tiny_pipeline(root, prediction)
    image_folder(root / "src")
    cli_ok("prepare", "--pipeline", root / "pipe", root / "src", root / "lat", "--quiet")
    return root / "pipe", root / "lat"


@pytest.fixture(scope="module")
def eps(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("eps"))


@pytest.fixture(scope="module")
def vpred(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("v"), "v_prediction")


def make_run(pipe, lat, out, *overrides) -> CTMRun:
    cfg = load_config(DistillConfig, None, None, ["train.steps=2", "train.batch_size=2", "ctm.num_scales=6",
                                                  "ctm.max_k=2", "train.phema=[]", *overrides],
                      data=str(lat), teacher=f"diffusers:{pipe}")
    return CTMRun(cfg, out, load_data(lat))


def probe(teacher):
    cond = teacher.encode_prompt(["a cat", "the dog", "", "red"])
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return z, torch.tensor([0.05, 0.5, 3.0, 14.0]), cond


def assert_starts_as_its_teacher(run: CTMRun, pipe) -> None:
    """The run's teacher and its student g(z, t, s) for several s are the teacher loaded apart, bit for bit."""
    teacher = load_teacher(f"diffusers:{pipe}")
    z, t, cond = probe(teacher)
    with torch.no_grad():
        want = teacher(z, t, cond)
        assert torch.equal(run.teacher(z, t, cond), want)
        for s in (t, t / 2, torch.full_like(t, 0.03)):
            assert torch.equal(run.net.g(z, t, s, cond), want)


@pytest.mark.parametrize("lora", [0, 2])
def test_a_student_starts_as_its_teacher(eps, vpred, tmp_path, lora):
    for (pipe, lat), form in ((eps, "auto"), (vpred, "auto")):          # auto keeps a latent teacher's form
        run = make_run(pipe, lat, tmp_path / f"{form}{lora}", f"ctm.lora_rank={lora}", f"ctm.student_precond={form}")
        assert_starts_as_its_teacher(run, pipe)
        shared = run.net.backbone is run.teacher.teacher.backbone if lora else run.net.backbone is not \
            run.teacher.backbone
        assert shared
    if lora:    # what trains: the adapters (B at zero) and the s embedding, nothing else
        names = run.trained.names
        assert names and all(is_trained(n) for n in names) and any("s_embed" in n for n in names)
        assert all(not p.any() for n, p in run.trained.tensors().items() if "lora_B" in n)
        assert {n for n, p in run.net.named_parameters() if p.requires_grad} == set(names)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_teacher_dtype_is_applied_without_diffusers_float32_warning(eps, tmp_path, dtype):
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append                                          # diffusers' loggers do not propagate
    logging.getLogger("diffusers").addHandler(handler)
    try:
        run = make_run(*eps, tmp_path / "r", f"ctm.teacher_dtype={dtype}")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert {p.dtype for p in run.teacher.backbone.denoiser.parameters()} == {getattr(torch, dtype)}
    assert not [r for r in records if "kept in float32" in r.getMessage()]


def test_lora_teacher_is_the_shared_module_with_adapters_off(vpred, tmp_path):
    pipe, lat = vpred
    run = make_run(pipe, lat, tmp_path / "r", "ctm.lora_rank=2", "train.lr=0.05")
    run.fit(progress=False)
    teacher = load_teacher(f"diffusers:{pipe}")
    z, t, cond = probe(teacher)
    with torch.no_grad():
        want = teacher(z, t, cond)
        assert torch.equal(run.teacher(z, t, cond), want)                 # adapters off: the teacher's weights
        assert not torch.allclose(run.net.g(z, t, t / 2, cond), want)     # the student has moved
    state, _ = load_latest(tmp_path / "r" / "checkpoints")
    full = sum(p.numel() for p in run.net.parameters())
    for key in ("net", "target", "ema0"):                                 # only the trained tensors, by name
        assert sorted(state["nets"][key]) == sorted(run.trained.names)
        assert sum(v.numel() for v in state["nets"][key].values()) < full / 10
    model = load_model(tmp_path / "r")                                    # base from the pipeline + adapters
    with torch.no_grad():
        g = run.net.g(z, t, t / 2, cond)
        for p, q in zip(run.trained.values, run.emas[0].values):
            p.data = q.data.clone()                                       # the EMA's weights into the live net
        assert torch.equal(model.g(z, t, t / 2, cond), run.net.g(z, t, t / 2, cond))
        assert not torch.equal(g, model.g(z, t, t / 2, cond))


@pytest.mark.parametrize("lora", [0, 2])
def test_prepare_distill_sample_end_to_end(eps, tmp_path, lora):
    pipe, lat = eps
    run = tmp_path / "run"
    out = cli_ok("distill", "--teacher", f"diffusers:{pipe}", "--data", lat, "--out", run, *QUICK,
                 f"ctm.lora_rank={lora}")
    assert "CTM distilled" in out
    card = json.loads((run / "model.json").read_text())
    assert card["kind"] == "ctm" and card["data"]["kind"] == "latent" and card["latent"]["image_shape"] == [3, 16, 16]
    assert card["guidance"] == {"label_dropout": 0.1} and ("lora" in card["latent"]) == bool(lora)
    cfg = (run / "config.yaml").read_text()
    assert "gan: false" in cfg and "distance: huber" in cfg                # the latent defaults
    args = ["sample", "--model", run, "--prompt", "a cat", "--prompt", "a red dog", "--n", 2, "--seed", 4, "--quiet"]
    cli_ok(*args, "--nfe", 1, "--out", tmp_path / "one.npz")
    one = check_one_jump(run, tmp_path / "one.npz")
    assert one["samples"].shape == (4, 16, 16, 3) and one["prompts"].tolist() == ["a cat"] * 2 + ["a red dog"] * 2
    cli_ok(*args, "--nfe", 3, "--gamma", 0.5, "--batch-size", 3, "--out", tmp_path / "a.npz")
    cli_ok(*args, "--nfe", 3, "--gamma", 0.5, "--batch-size", 1, "--out", tmp_path / "b.npz")
    a, b = np.load(tmp_path / "a.npz")["latents"], np.load(tmp_path / "b.npz")["latents"]
    assert np.allclose(a, b, atol=1e-4 * np.abs(a).max()) and np.isfinite(a).all()     # per-sample seeds


@pytest.mark.parametrize("lora", [0, 2])
def test_a_resumed_run_equals_an_uninterrupted_one(eps, tmp_path, lora):
    pipe, lat = eps
    base = ["distill", "--teacher", f"diffusers:{pipe}", "--data", lat, "--batch-size", 2, "ctm.num_scales=6",
            "ctm.max_k=3", "train.phema=[]", "--ckpt-every", 2, "--quiet", f"ctm.lora_rank={lora}"]
    cli_ok(*base, "--out", tmp_path / "whole", "--steps", 4)
    cli_ok(*base, "--out", tmp_path / "parts", "--steps", 2)
    cli_ok(*base, "--out", tmp_path / "parts", "--steps", 4, "--resume")
    a, _ = load_latest(tmp_path / "whole" / "checkpoints")
    b, _ = load_latest(tmp_path / "parts" / "checkpoints")
    assert a["step"] == b["step"] == 4
    for key in ("net", "target", "ema0"):
        assert a["nets"][key].keys() == b["nets"][key].keys()
        assert all(torch.equal(v, b["nets"][key][k]) for k, v in a["nets"][key].items()), key


def test_guided_distillation_runs_and_samples_at_its_scale(eps, tmp_path):
    pipe, lat = eps
    run = tmp_path / "g"
    cli_ok("distill", "--teacher", f"diffusers:{pipe}", "--data", lat, "--out", run, *QUICK, "ctm.guidance=2",
           "ctm.lora_rank=2", "train.grad_checkpointing=true")
    card = json.loads((run / "model.json").read_text())
    assert card["guidance"] == {"scale": [2.0]}
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert np.isfinite(stats[-1]["loss"]) and "loss_dsm" in stats[-1]
    cli_ok("sample", "--model", run, "--prompt", "a dog", "--n", 1, "--nfe", 2, "--out", tmp_path / "s.npz",
           "--quiet")
    refused("was distilled for guidance 2 only", "sample", "--model", run, "--prompt", "a dog", "--guidance", 3,
            "--out", tmp_path / "t.npz")


def test_refusals_are_one_line(eps, tmp_path):
    pipe, lat = eps
    tiny_pipeline(tmp_path / "other", seed=1)                              # the same configs, other weights
    run = ["--out", tmp_path / "run", "--steps", 1, "--quiet"]
    refused("whose VAE differs", "distill", "--teacher", f"diffusers:{tmp_path / 'other' / 'pipe'}", "--data", lat,
            *run)
    small = shutil.copytree(pipe, tmp_path / "small")                      # latents [4, 4, 4]: another UNet size
    cfg = json.loads((small / "unet" / "config.json").read_text())
    (small / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 4}))
    refused("whose latent shape differs", "distill", "--teacher", f"diffusers:{small}", "--data", lat, *run)
    refused("must be a prepared latent folder", "distill", "--teacher", f"diffusers:{pipe}", "--data", "ring", *run)
    refused("ctm.lora_rank=4 trains adapters", "distill", "--teacher", "exact", "--data", "ring", "ctm.lora_rank=4",
            *run)
    refused("train.grad_checkpointing=true needs a diffusers student", "distill", "--teacher", "exact", "--data",
            "ring", "train.grad_checkpointing=true", *run)
    refused("ctm.teacher_dtype must be one of", "distill", "--teacher", f"diffusers:{pipe}", "--data", lat,
            "ctm.teacher_dtype=half", *run)
    assert not (tmp_path / "run").exists()
    code, out = cli("config", "distill")
    assert code == 0 and all(k in out for k in ("lora_rank:", "teacher_dtype:", "gan_latent:", "grad_checkpointing:"))
