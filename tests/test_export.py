"""`ctmkit export` and ctmkit.diffusers (CTMPipeline, CTMModel, CTMScheduler) on tiny random models made here: the
pipeline's images equal `ctmkit sample`'s (bit for bit on the CPU, after (s - lo) / (hi - lo)) for ctmkit's UNet,
EDM's SongUNet and a diffusers UNet2DModel backbone, conditional or not, guided or not; the folder holds no pickle
and loads in a fresh process with trust_remote_code unset; bad runs, folders and arguments are refused in one line
with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctmkit import load_model
from ctmkit.errors import UserError

from .test_cli_edges import cli_ok
from .test_reliability import files_under, one_line_error

diffusers = pytest.importorskip("diffusers")
from ctmkit.diffusers import CTMPipeline  # noqa: E402  (after the skip: needs diffusers)

ROOT = Path(__file__).resolve().parents[1]
UINT8_GREY = {"kind": "image", "layout": "NHW", "dtype": "uint8", "lo": 0.0, "hi": 255.0}
UINT8_RGB = {**UINT8_GREY, "layout": "NHWC"}
FLOAT_GREY = {"kind": "image", "layout": "NHW", "dtype": "float32", "lo": 0.0, "hi": 16.0}   # digits-like


def unet_spec(channels: int, classes: int, guidance_embed: bool = False) -> dict:
    kw = {"in_channels": channels, "resolution": 8, "model_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
          "attn_resolutions": [], "dropout": 0.0, "num_classes": classes, "fourier_scale": 1.0}
    return {"arch": "unet", "kwargs": {**kw, "guidance_embed": True} if guidance_embed else kw}


def song_spec(classes: int) -> dict:
    return {"arch": "edm_songunet", "kwargs": {"img_resolution": 8, "in_channels": 1, "out_channels": 1,
                                               "label_dim": classes, "model_channels": 8, "channel_mult": [1],
                                               "num_blocks": 1, "attn_resolutions": []}}


def diffusers_spec(classes: int) -> tuple[dict, dict]:
    """A tiny UNet2DModel backbone (the last class embedding its null class) and its VP preconditioning."""
    cfg = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "layers_per_block": 1,
           "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
           "norm_num_groups": 4, "num_class_embeds": classes + 1 if classes else None}
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    precond = {"kind": "vp", "prediction": "epsilon", "alphas_cumprod": torch.cumprod(1 - betas, 0).tolist()}
    return {"arch": "diffusers_unet2d", "kwargs": {"config": cfg, "null_class": classes if classes else None}}, precond


def make_run(path: Path, backbone: dict, shape=(1, 8, 8), classes: int = 0, norm=UINT8_GREY, precond=None,
             guidance=None, kind: str = "ctm", sigmas=(0.002, 80.0)) -> Path:
    """A run folder holding a tiny CTM (or teacher) with random, clearly non-trivial weights."""
    from ctmkit.io.card import ModelCard
    from ctmkit.io.checkpoint import save_checkpoint
    from ctmkit.io.runs import build_model
    card = ModelCard.from_dict({"kind": kind, "backbone": backbone, "sigma_data": 0.5, "sigma_min": sigmas[0],
                                "sigma_max": sigmas[1], "teacher": "runs/teacher", "precond": precond,
                                "guidance": guidance, "data": {"spec": "imgs.npy", "kind": norm["kind"],
                                                               "shape": list(shape), "num_classes": classes,
                                                               "normalizer": norm}})
    torch.manual_seed(0)
    model = build_model(card)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.mkdir()
    save_checkpoint(path / "checkpoints", 1, {"nets": {"ema0": model.state_dict()}})
    card.write(path)
    (path / "config.yaml").write_text("data: imgs.npy\nctm:\n  num_scales: 18\n")
    return path


def pipeline(out: Path) -> CTMPipeline:
    pipe = CTMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ctmkit_sample(model, tmp_path: Path, *args) -> np.ndarray:
    """`ctmkit sample`'s samples in [0, 1] NHWC: (s - lo) / (hi - lo), the pipeline's stated conversion."""
    out = tmp_path / f"s{len(list(tmp_path.glob('s*.npz')))}.npz"
    cli_ok("sample", "--model", model, "--out", out, "--quiet", *args)
    from ctmkit.data.normalize import Normalizer
    return Normalizer.from_dict(load_model(model).card.data.normalizer).to_unit(np.load(out)["samples"])


KINDS = {
    "unet_rgb": lambda p: make_run(p, unet_spec(3, 0), shape=(3, 8, 8), norm=UINT8_RGB),
    "unet_conditional": lambda p: make_run(p, unet_spec(1, 3), classes=3),
    "edm_songunet_conditional": lambda p: make_run(p, song_spec(3), classes=3, norm=FLOAT_GREY),
    "diffusers_unet2d": lambda p: make_run(p, *diffusers_spec(0)[:1], precond=diffusers_spec(0)[1],
                                           sigmas=(0.01, 150.0)),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_pipeline_samples_ctmkit_sample_bit_for_bit(tmp_path, kind):
    run = KINDS[kind](tmp_path / "run")
    cli_ok("export", run, tmp_path / "out")
    pipe = pipeline(tmp_path / "out")
    assert type(pipe.unet).__name__ == "CTMModel" and pipe.unet.card.backbone.arch == load_model(run).card.backbone.arch
    got = pipe(batch_size=5, num_inference_steps=3, gamma=0.5, generator=torch.Generator().manual_seed(7),
               output_type="np").images
    want = ctmkit_sample(run, tmp_path, "--n", 5, "--nfe", 3, "--gamma", 0.5, "--seed", 7)
    assert got.dtype == np.float32 and got.shape == (5, 8, 8, pipe.unet.card.shape[0]) and got.std() > 0.01
    assert np.array_equal(got, want)
    sigmas = [150.0, 3.0, 0.5, 0.01] if kind.startswith("diffusers") else [80.0, 3.0, 0.5, 0.002]
    got = pipe(batch_size=4, sigmas=sigmas, generator=torch.Generator().manual_seed(2), output_type="np").images
    ts = ",".join(map(str, sigmas))
    assert np.array_equal(got, ctmkit_sample(run, tmp_path, "--n", 4, "--ts", ts, "--seed", 2))
    assert np.array_equal(ctmkit_sample(tmp_path / "out", tmp_path, "--n", 4, "--ts", ts, "--seed", 2), got)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A class-conditional CTM with a null branch (label dropout), exported with an eval table."""
    root = tmp_path_factory.mktemp("exported")
    run = make_run(root / "run", unet_spec(1, 3), classes=3, norm=FLOAT_GREY, guidance={"label_dropout": 0.1})
    ev = {"metric": "classifier", "metric_doc": "Frechet distance in a classifier's features", "data": "digits",
          "rows": [{"model": "ctm", "sampler": "gamma", "nfe": 1, "gamma": 0.0, "value": 1.25},
                   {"model": "teacher", "sampler": "heun", "nfe": 35, "gamma": 0.0, "value": 0.5}]}
    (root / "ev.json").write_text(json.dumps(ev))
    cli_ok("export", run, root / "out", "--eval", root / "ev.json")
    return run, root / "out"


def test_the_folder_holds_no_pickle_and_loads_in_a_fresh_process(exported, tmp_path):
    run, out = exported
    files = sorted(files_under(out))
    assert files == ["README.md", "model_index.json", "samples.png", "scheduler", "scheduler/scheduler_config.json",
                     "unet", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    from safetensors import safe_open
    with safe_open(str(out / "unet/diffusion_pytorch_model.safetensors"), "pt") as f:
        assert all(k.startswith("ctm.") for k in f.keys())
    for name in files:
        if (out / name).is_file() and name.endswith(".json"):
            json.loads((out / name).read_text())                        # JSON, not a pickle
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "CTMPipeline"
    code = ("import sys, numpy, torch; from ctmkit.diffusers import CTMPipeline; "
            f"p = CTMPipeline.from_pretrained({str(out)!r}); p.set_progress_bar_config(disable=True); "
            "numpy.save(sys.argv[1], p(batch_size=6, num_inference_steps=2, generator=torch.Generator()"
            ".manual_seed(0), output_type='np').images); assert 'trust_remote_code' not in str(p.config)")
    # the fresh process runs on this one's kernel path (threads, ATen capability): a bitwise comparison needs it
    kernels = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY",) if k in os.environ}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.npy")], check=True, cwd=tmp_path,
                   env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()),
                        "PATH": "/usr/bin:/bin", **kernels})
    want = ctmkit_sample(run, tmp_path, "--n", 6, "--nfe", 2, "--seed", 0)     # classes in turn, as the pipeline
    assert np.array_equal(np.load(tmp_path / "a.npy"), want)


def test_guidance_scale_is_ctmkit_sample_guidance(exported, tmp_path):
    run, out = exported
    pipe = pipeline(out)
    got = pipe(batch_size=6, class_labels=[2, 0], num_inference_steps=2, guidance_scale=2.5,
               generator=torch.Generator().manual_seed(4), output_type="np").images
    want = ctmkit_sample(run, tmp_path, "--n", 6, "--labels", "2,0", "--nfe", 2, "--guidance", 2.5, "--seed", 4)
    plain = pipe(batch_size=6, class_labels=[2, 0], num_inference_steps=2, generator=torch.Generator().manual_seed(4),
                 output_type="np").images
    # The pipeline combines the network's g (g_null + w (g_c - g_null), then the scheduler's jump); ctmkit sample
    # combines the jumps G = (s/t) x + (1 - s/t) g. Equal in exact arithmetic, so they differ by float32 rounding
    # alone: a few ulps of the model-space values. Measured: 4e-7 (w 2.5), 9e-7 (w 5) here; 3.6e-7 on the digits CTM.
    assert np.abs(got - want).max() < 1e-5 and np.abs(got - plain).max() > 1e-3
    assert np.array_equal(plain, ctmkit_sample(run, tmp_path, "--n", 6, "--labels", "2,0", "--nfe", 2, "--seed", 4))


def test_a_range_student_takes_the_scale_as_ctmkit_sample_does(tmp_path):
    run = make_run(tmp_path / "run", unet_spec(1, 3, guidance_embed=True), classes=3,
                   guidance={"label_dropout": 0.1, "scale": [1.0, 3.0]})
    cli_ok("export", run, tmp_path / "out")
    pipe = pipeline(tmp_path / "out")
    got = pipe(batch_size=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert np.array_equal(got, ctmkit_sample(run, tmp_path, "--n", 3, "--guidance", 2, "--seed", 1))
    for w, says in ((None, "give --guidance W in that range"), (3.5, "outside this CTM's trained range")):
        with pytest.raises(UserError, match=says):
            pipe(batch_size=3, guidance_scale=w)


def test_the_model_card_has_the_hub_metadata_the_eval_table_and_the_code(exported):
    _, out = exported
    text = (out / "README.md").read_text()
    meta = text.split("---\n")[1]
    assert "library_name: diffusers" in meta and "pipeline_tag: unconditional-image-generation" in meta
    assert "license:" in meta and "runs/teacher" in meta
    assert "| ctm | gamma | 1 | 0.0 | 1.25 |" in text and "| teacher | heun | 35 | 0.0 | 0.5 |" in text
    assert "num_scales: 18" in text and "![samples](samples.png)" in text
    assert f'CTMPipeline.from_pretrained("{out.name}")' in text and "(s - 0) / (16 - 0)" in text
    from PIL import Image
    assert Image.open(out / "samples.png").size[0] > 64
    assert json.loads((out / "scheduler/scheduler_config.json").read_text())["num_train_timesteps"] == 18


def test_outputs_pil_pt_and_bf16_on_the_cpu(exported):
    _, out = exported
    pipe = pipeline(out)
    kw = {"batch_size": 4, "num_inference_steps": 2, "generator": torch.Generator().manual_seed(3)}
    arr = pipe(**kw, output_type="np").images
    pil = pipe(**kw).images
    assert len(pil) == 4 and pil[0].mode == "L" and np.array_equal(np.asarray(pil[0]), np.rint(arr[0, ..., 0] * 255))
    pt = pipe(**kw, output_type="pt", return_dict=False)[0]
    assert pt.shape == (4, 1, 8, 8) and torch.equal(pt.permute(0, 2, 3, 1), torch.from_numpy(arr))
    low = CTMPipeline.from_pretrained(out, dtype=torch.bfloat16)
    low.set_progress_bar_config(disable=True)
    assert low.unet.dtype == torch.bfloat16
    half = low(**kw, output_type="np").images
    # bf16 keeps 8 bits of mantissa in the network's matrix products (the sample, the noise levels and the jump stay
    # float32): a relative error of ~2^-8 per layer; measured 0.0005 mean, 0.003 max in [0, 1] units on this network.
    diff = np.abs(half - arr)
    assert 0 < diff.max() < 0.03 and diff.mean() < 0.005


def test_bad_calls_are_refused_in_one_line(exported):
    _, out = exported
    pipe = pipeline(out)
    for kwargs, says in (({"prompt": "a cat"}, "prompt= needs a text-conditioned"),
                         ({"class_labels": [3]}, "class_labels must be classes 0..2"),
                         ({"num_inference_steps": 2, "sigmas": [80.0, 0.002]}, "not both"),
                         ({"sigmas": [1.0, 5.0]}, "sigmas must be strictly decreasing"),
                         ({"gamma": 2.0}, "gamma must be in"),
                         ({"output_type": "latent"}, "output_type must be one of"),
                         ({"batch_size": 2, "generator": [torch.Generator()]}, "one per image")):
        with pytest.raises(ValueError, match=says) as e:
            pipe(**kwargs)
        assert "\n" not in str(e.value)


def test_bad_runs_and_folders_are_refused_in_one_line_and_nothing_is_written(tmp_path, exported, monkeypatch):
    run, out = exported
    vec = make_run(tmp_path / "vec", {"arch": "mlp", "kwargs": {"dim": 2, "hidden": 8, "depth": 1, "emb_dim": 8}},
                   shape=(2,), norm={"kind": "vector", "layout": "ND", "dtype": "float32", "shift": [0.0, 0.0]})
    teacher = make_run(tmp_path / "teacher", unet_spec(1, 0), kind="teacher")
    before = files_under(tmp_path)
    one_line_error(["export", vec, tmp_path / "x"], "diffusers pipelines are for images")
    one_line_error(["export", teacher, tmp_path / "x"], "takes a CTM run")
    one_line_error(["export", run, out], "pass --force")
    one_line_error(["export", run, run / "sub" / "x"], "does not exist")
    one_line_error(["export", run, run.parent], "holds the run")
    one_line_error(["export", run, tmp_path / "x", "--eval", run / "model.json"], "not a `ctmkit eval` result")
    assert files_under(tmp_path) == before
    import ctmkit.diffusers.export as export_module
    monkeypatch.setattr(export_module, "save_image_grid", _fail)     # a failure half-way: no half folder
    with pytest.raises(OSError):
        export_module.export_run(run, tmp_path / "x")
    monkeypatch.undo()
    assert files_under(tmp_path) == before
    cli_ok("export", run, tmp_path / "copy")
    (tmp_path / "copy" / "stale.txt").write_text("from before")
    cli_ok("export", run, tmp_path / "copy", "--force")                # replaced once the new folder is complete
    assert files_under(tmp_path / "copy") == files_under(out) and files_under(tmp_path) - before == {
        f"copy/{f}" for f in files_under(out)} | {"copy"}
    monkeypatch.setitem(sys.modules, "diffusers", None)               # the extra is missing
    one_line_error(["export", run, tmp_path / "y"], "pip install")


def _fail(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_missing_or_truncated_weight_file_is_refused_in_one_line(tmp_path, exported):
    _, out = exported
    import shutil
    for what in ("missing", "truncated"):
        bad = tmp_path / what
        shutil.copytree(out, bad)
        weights = bad / "unet/diffusion_pytorch_model.safetensors"
        if what == "missing":
            weights.unlink()
        else:
            weights.write_bytes(weights.read_bytes()[:200])
        one_line_error(["sample", "--model", bad, "--n", 2, "--out", tmp_path / f"{what}.npz"], what)
        with pytest.raises(UserError, match=what):
            load_model(bad)
        assert not (tmp_path / f"{what}.npz").exists()
    run = make_run(tmp_path / "run", unet_spec(1, 0))
    ckpt = next((run / "checkpoints").glob("*.safetensors"))
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    one_line_error(["export", run, tmp_path / "x"], "broken checkpoints")
    assert not (tmp_path / "x").exists()
    one_line_error(["sample", "--model", f"diffusers:{out}", "--n", 2, "--out", tmp_path / "d.npz"], "--model")


def test_importing_ctmkit_and_its_cli_does_not_import_diffusers():
    code = "import sys, ctmkit, ctmkit.cli, ctmkit.diffusers; assert 'diffusers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A full latent text-to-image CTM student (tests/test_latent_student.py's tiny pipeline, 2 steps), exported;
    (root, teacher pipeline, prepared data, run, export)."""
    from tests.test_latent_data import image_folder
    from tests.test_latent_teacher import tiny_pipeline
    root = tmp_path_factory.mktemp("latent")
    tiny_pipeline(root)
    image_folder(root / "src")
    cli_ok("prepare", "--pipeline", root / "pipe", root / "src", root / "lat", "--quiet")
    cli_ok("distill", "--teacher", f"diffusers:{root / 'pipe'}", "--data", root / "lat", "--out", root / "run",
           "--steps", 2, "--batch-size", 2, "ctm.num_scales=6", "ctm.max_k=2", "train.phema=[]", "train.ema=[0.9]",
           "train.lr=0.05", "--quiet")
    cli_ok("export", root / "run", root / "out")
    return root, root / "pipe", root / "lat", root / "run", root / "out"


PROMPTS = ["a cat", "a red dog"]


def prompt_sample(model, tmp_path, *args) -> dict:
    """`ctmkit sample --model MODEL --prompt a cat --prompt a red dog --n 2 ARGS` (one batch) as its .npz arrays."""
    out = tmp_path / f"p{len(list(tmp_path.glob('p*.npz')))}.npz"
    cli_ok("sample", "--model", model, *[a for p in PROMPTS for a in ("--prompt", p)], "--n", 2, "--batch-size", 8,
           *args, "--out", out, "--quiet")
    return dict(np.load(out))


def prompt_pipe(pipe, output_type: str, **kw):
    return pipe(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=3, gamma=0.5,
                generator=torch.Generator().manual_seed(4), output_type=output_type, **kw).images


def test_a_latent_student_exports_and_samples_ctmkit_sample_bit_for_bit(latent_run, tmp_path):
    root, teacher, _, run, out = latent_run
    names = set(files_under(out))
    assert {"vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "tokenizer/tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth", ".ckpt"))]          # no pickle
    card = json.loads((out / "unet" / "config.json").read_text())["card"]
    assert card["latent"]["folder"] == "." and str(teacher) not in json.dumps(card["latent"])
    assert card.pop("teacher") == f"diffusers:{teacher}" and str(teacher) not in json.dumps(card)   # provenance only
    want = prompt_sample(run, tmp_path, "--nfe", 3, "--gamma", 0.5, "--seed", 4)
    shutil.move(teacher, root / "gone")            # the export stands alone: the teacher's folder is not read
    try:
        pipe = pipeline(out)
        assert type(pipe.vae).__name__ == "AutoencoderKL" and type(pipe.text_encoder).__name__ == "CLIPTextModel"
        latents = prompt_pipe(pipe, "latent")
        assert latents.shape == (4, 4, 8, 8) and torch.equal(latents, torch.from_numpy(want["latents"]))  # bitwise
        images = prompt_pipe(pipe, "np")
        assert images.dtype == np.float32 and images.shape == (4, 16, 16, 3)
        assert np.array_equal(images, want["samples"] / np.float32(255))          # uint8 / 255, exactly
        pil = prompt_pipe(pipe, "pil")
        assert np.array_equal(np.stack([np.asarray(p) for p in pil]), want["samples"])
        pt = prompt_pipe(pipe, "pt")
        assert pt.shape == (4, 3, 16, 16) and np.array_equal(pt.permute(0, 2, 3, 1).numpy(), images)
        neg = prompt_pipe(pipe, "latent", negative_prompt="blurry", guidance_scale=2.0)
        again = prompt_sample(out, tmp_path, "--nfe", 3, "--gamma", 0.5, "--seed", 4, "--negative-prompt", "blurry",
                              "--guidance", 2.0)                      # ctmkit sample reads the export alone too
        err = (neg - torch.from_numpy(again["latents"])).abs().max().item()
        ulp = torch.finfo(torch.float32).eps * neg.abs().max().item()        # float32 spacing at the latents' scale
        # guided: the pipeline combines g, ctmkit sample the jumps (test_guidance_scale_is_ctmkit_sample_guidance):
        # two code paths, equal to float32 round-off (a few ulps of the scale; 3 seen)
        assert err <= 8 * ulp and (neg - latents).abs().max() > 1e-3, (err, ulp)
        print(f"guided latent export: max |diff| = {err:.2e}")
        mine = prompt_sample(out, tmp_path, "--nfe", 3, "--gamma", 0.5, "--seed", 4)
        assert np.array_equal(mine["samples"], want["samples"]) and np.array_equal(mine["latents"], want["latents"])
        assert load_model(out).card.latent["folder"] == str(out.resolve())
        one = pipe(prompt="a cat", generator=torch.Generator().manual_seed(4), output_type="latent").images
        assert one.shape == (1, 4, 8, 8)
    finally:
        shutil.move(root / "gone", teacher)


def test_latent_calls_are_refused_in_one_line(latent_run, exported):
    pipe = pipeline(latent_run[4])
    for kwargs, says in (({}, "this CTM is text-to-image: give prompt="),
                         ({"prompt": "a", "batch_size": 2}, "not batch_size or class_labels"),
                         ({"prompt": []}, "prompt= must be a string"),
                         ({"prompt": "a", "num_images_per_prompt": 0}, "num_images_per_prompt must be"),
                         ({"prompt": "a", "output_type": "tensor"}, "output_type must be one of")):
        with pytest.raises(ValueError, match=says) as e:
            pipe(**kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="prompt= needs a text-conditioned") as e:
        pipeline(exported[1])(negative_prompt="x")
    assert "\n" not in str(e.value)


def test_a_lora_student_exports_merged(latent_run, tmp_path):
    pytest.importorskip("peft")
    root, teacher, lat, _, _ = latent_run
    run = tmp_path / "lora"
    cli_ok("distill", "--teacher", f"diffusers:{teacher}", "--data", lat, "--out", run, "--steps", 2,
           "--batch-size", 2, "ctm.num_scales=6", "ctm.max_k=2", "train.phema=[]", "train.ema=[0.9]",
           "ctm.lora_rank=2", "train.lr=0.05", "--quiet")
    cli_ok("export", run, tmp_path / "out")
    card = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())["card"]
    assert "lora" not in card["latent"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out/unet/diffusion_pytorch_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    want = torch.from_numpy(prompt_sample(run, tmp_path, "--nfe", 3, "--gamma", 0.5, "--seed", 4)["latents"])
    got = prompt_pipe(pipeline(tmp_path / "out"), "latent")
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < 1e-4, err                          # merged weights: W + B A summed once, float round-off
    print(f"LoRA merged export: max |diff| / max |latent| = {err:.2e}")
