"""Prepared latent folders and prompt sampling for a latent text-to-image teacher (docs/method.md section 9), on the
tiny random Stable Diffusion pipeline of tests/test_latent_teacher.py (latents [4, 8, 8], images 16 x 16 RGB):
`ctmkit prepare --pipeline` from an image folder (= encoding by hand with the VAE, each prompt stored once) and from
prompts (= the teacher's Heun samples by hand, = `ctmkit sample --prompts`), reading in batches, `ctmkit sample
--prompt` end to end (decode = the pipeline's own VAE decode and postprocess), and the one-line refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ctmkit import load_model, load_teacher
from ctmkit.cli import main
from ctmkit.core.guidance import guided
from ctmkit.core.sampling import heun_sample, per_sample_normal
from ctmkit.data import latents as latents_mod
from ctmkit.data import load_data
from ctmkit.data.latents import LatentData
from ctmkit.data.readers import NpyRows
from ctmkit.errors import UserError
from ctmkit.eval.prompts import encode_prompts
from ctmkit.nets.vae import LatentVAE
from ctmkit.teachers.latent_data import check_latent_data
from tests.test_latent_teacher import tiny_pipeline

diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

TEXTS = ["a cat", "a red dog", "a cat", "", "the mat on a dog"]      # one repeat, one empty prompt


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    return tiny_pipeline(folder), folder / "pipe"


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.output


def cli_ok(*args) -> str:
    code, out = cli(*args)
    assert code == 0, out
    return out


def refused(match: str, *args) -> None:
    code, out = cli(*args)
    assert code == 2 and out.count("\n") == 1 and out.startswith("ctmkit: error:") and match in out, out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float round-off relative to the latents' size (batches of another size: other kernels)."""
    return float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


def check_one_jump(run, npz):
    """The latents of `sample --model RUN --prompt "a cat" --prompt "a red dog" --n 2 --seed 4 --nfe 1` (in `npz`)
    are one jump sigma_max -> sigma_min of the loaded model on the prompts' TextCond; returns the .npz."""
    model = load_model(run)
    cond = encode_prompts(model, ["a cat", "a red dog"])[torch.tensor([0, 0, 1, 1])]
    z = per_sample_normal(4, (4, 8, 8), 4) * model.card.sigma_max
    ones = lambda v: torch.full((4,), v)                                   # noqa: E731
    with torch.no_grad():
        want = model(z, ones(model.card.sigma_max), ones(model.card.sigma_min), cond)
    one = np.load(npz)
    assert np.allclose(one["latents"], want.numpy(), atol=1e-5 * float(want.abs().max()))
    return one


def image_folder(path, texts=TEXTS, size=16, seed=0):
    """Random RGB PNGs with a metadata.jsonl (file_name, text); returns the uint8 images [N, H, W, 3]."""
    path.mkdir()
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(texts), size, size, 3), dtype=np.uint8)
    lines = []
    for i, (im, text) in enumerate(zip(images, texts)):
        PIL.fromarray(im).save(path / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": text}))
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return images


def test_prepare_from_images_is_the_vae_by_hand_with_each_prompt_once(sd, tmp_path, monkeypatch):
    pipe, folder = sd
    images = image_folder(tmp_path / "src")
    monkeypatch.setattr(latents_mod, "SHARD_SIZE", 2)            # 5 items in 3 shards
    cli_ok("prepare", "--pipeline", folder, tmp_path / "src", tmp_path / "lat", "--batch-size", 2, "--quiet")
    data = load_data(tmp_path / "lat")
    assert isinstance(data, LatentData) and data.kind == "latent" and len(data) == 5 and data.shape == (4, 8, 8)
    shards = sorted(p.name for p in (tmp_path / "lat").glob("latents-*.npy"))
    assert shards == [f"latents-0000{k}.npy" for k in range(3)]
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        want = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    assert torch.allclose(data[np.arange(5)], want, atol=1e-5, rtol=0)
    assert data.prompts == ["a cat", "a red dog", "", "the mat on a dog"]        # each prompt once, first-seen order
    assert data.labels.tolist() == [0, 1, 0, 2, 3] and data.num_classes == 0
    teacher = load_teacher(f"diffusers:{folder}")
    cond = teacher.encode_prompt(TEXTS)
    assert torch.equal(data.text_cond(np.arange(5)).embeds, cond.embeds)
    assert torch.equal(data.null_embeds, cond.null_embeds)
    m = data.manifest
    assert m["count"] == 5 and m["prompts"] == 4 and m["latent_shape"] == [4, 8, 8] and m["image_shape"] == [3, 16, 16]
    assert m["vae"]["scaling_factor"] == pytest.approx(pipe.vae.config.scaling_factor)
    assert m["encoding"] == "posterior mean" and m["source"]["kind"] == "images"
    check_latent_data(data, teacher)                      # its own pipeline: accepted
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no temp folder left


def test_latents_are_read_per_batch(sd, tmp_path, monkeypatch):
    _, folder = sd
    image_folder(tmp_path / "src")
    monkeypatch.setattr(latents_mod, "SHARD_SIZE", 2)
    cli_ok("prepare", "--pipeline", folder, tmp_path / "src", tmp_path / "lat", "--quiet")
    rows, read = [], NpyRows._read
    monkeypatch.setattr(NpyRows, "_read", lambda self, start, count: rows.append(count) or read(self, start, count))
    data = load_data(tmp_path / "lat")
    assert rows == []                                          # nothing read up front
    part = data[[4, 0]]
    assert sum(rows) == 2                                      # the two rows asked for, and nothing else
    assert torch.equal(part, torch.cat([data[[4]], data[[0]]]))
    assert torch.equal(torch.cat(list(data.batches(size=2))), data[np.arange(5)])
    assert len(load_data(tmp_path / "lat", n=3)) == 3


def test_prepare_from_prompts_is_the_teachers_heun_samples(sd, tmp_path):
    _, folder = sd
    (tmp_path / "p.txt").write_text("a cat\n\na red dog\n")
    cli_ok("prepare", "--pipeline", folder, "--prompts", tmp_path / "p.txt", "--n", 2, "--nfe", 3, "--guidance", 2,
           "--seed", 5, tmp_path / "lat", "--quiet")
    data = load_data(tmp_path / "lat")
    teacher = load_teacher(f"diffusers:{folder}")
    cond, card = teacher.encode_prompt(["a cat", "a red dog"]), teacher.card
    want = []
    for i in range(4):                      # sample i: noise seeded by (seed, i), prompt i // 2, guided Heun
        z = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(5 * 1_000_003 + i))[:1]
        with torch.no_grad():
            want.append(heun_sample(guided(teacher, 2.0), z, nfe=3, labels=cond[[i // 2]],
                                    sigma_max=card.sigma_max, sigma_min=card.sigma_min))
    want = torch.cat(want)                  # by hand one at a time: the batch of 4 agrees to float round-off, which the
    assert close(data[np.arange(4)], want)  # untrained UNet amplifies to ~1e-5 of the latents' size over the steps
    assert data.prompts == ["a cat", "a red dog"] and data.labels.tolist() == [0, 0, 1, 1]
    assert data.manifest["source"] == {"kind": "teacher samples", "sampler": "heun", "nfe": 3, "guidance": 2.0,
                                       "seed": 5, "per_prompt": 2}
    cli_ok("sample", "--model", f"diffusers:{folder}", "--prompts", tmp_path / "p.txt", "--n", 2, "--nfe", 3,
           "--guidance", 2, "--seed", 5, "--out", tmp_path / "s.npz", "--quiet")
    with np.load(tmp_path / "s.npz") as f:                    # the same latents as `ctmkit sample`
        assert np.allclose(f["latents"], data[np.arange(4)].numpy(), atol=1e-6, rtol=0)


def test_sample_prompt_end_to_end(sd, tmp_path):
    pipe, folder = sd
    args = ["sample", "--model", f"diffusers:{folder}", "--prompt", "a cat", "--prompt", "a red dog", "--n", 3,
            "--nfe", 2, "--guidance", 3, "--seed", 1, "--quiet"]
    out = cli_ok(*args, "--batch-size", 4, "--out", tmp_path / "a.npz")
    assert "a.npz" in out and (tmp_path / "a.png").is_file()
    cli_ok(*args, "--batch-size", 1, "--out", tmp_path / "b.npz")
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["samples"].shape == (6, 16, 16, 3) and a["samples"].dtype == np.uint8
    assert a["latents"].shape == (6, 4, 8, 8) and a["latents"].dtype == np.float32
    assert a["prompts"].tolist() == ["a cat"] * 3 + ["a red dog"] * 3                  # prompt-major
    assert close(torch.from_numpy(a["latents"]), torch.from_numpy(b["latents"]))      # per-sample seeds
    assert np.abs(a["samples"].astype(int) - b["samples"]).max() <= 1
    assert not np.allclose(a["latents"][0], a["latents"][1])
    with torch.no_grad():                                 # the pipeline's own decode and postprocess
        x = pipe.vae.decode(torch.from_numpy(a["latents"]) / pipe.vae.config.scaling_factor).sample
    want = np.stack([np.asarray(im) for im in pipe.image_processor.postprocess(x, output_type="pil")])
    assert np.abs(a["samples"].astype(int) - want).max() <= 1 and (a["samples"] == want).mean() > 0.99
    vae = LatentVAE.from_pipeline(folder, load_teacher(f"diffusers:{folder}").card.latent["vae"])
    assert torch.equal(vae.decode(torch.from_numpy(a["latents"])), torch.from_numpy(want))


def test_refusals_are_one_line_and_write_nothing(sd, tmp_path):
    _, folder = sd
    image_folder(tmp_path / "src")
    out = tmp_path / "lat"
    (tmp_path / "bare").mkdir()
    PIL.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "bare" / "x.png")
    refused("has no metadata.jsonl", "prepare", "--pipeline", folder, tmp_path / "bare", out)
    (tmp_path / "src" / "001.png").unlink()
    refused("names 1 missing file(s), the first", "prepare", "--pipeline", folder, tmp_path / "src", out)
    image_folder(tmp_path / "small", size=8)
    refused("resize (or centre-crop) the images to 16x16", "prepare", "--pipeline", folder, tmp_path / "small", out)
    (tmp_path / "empty.txt").write_text("\n  \n")
    refused("holds no prompts", "prepare", "--pipeline", folder, "--prompts", tmp_path / "empty.txt", out)
    refused("holds no prompts", "sample", "--model", f"diffusers:{folder}", "--prompts", tmp_path / "empty.txt",
            "--out", tmp_path / "s.npz")
    refused("give --prompt TEXT or --prompts FILE", "sample", "--model", f"diffusers:{folder}", "--n", 1,
            "--out", tmp_path / "s.npz")
    refused("--labels applies to class-conditional", "sample", "--model", f"diffusers:{folder}", "--prompt", "a",
            "--labels", "1", "--out", tmp_path / "s.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "empty.txt", "small", "src"]


def test_prompts_refused_on_a_model_without_text(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    diffusers.DDPMPipeline(unet, diffusers.DDIMScheduler()).save_pretrained(tmp_path / "pixel")
    refused("need a text-to-image model", "sample", "--model", f"diffusers:{tmp_path / 'pixel'}", "--prompt", "a cat",
            "--out", tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()


def test_a_failure_midway_leaves_nothing_and_a_folder_of_another_pipeline_is_refused(sd, tmp_path, monkeypatch):
    pipe, folder = sd
    image_folder(tmp_path / "src")
    cli_ok("prepare", "--pipeline", folder, tmp_path / "src", tmp_path / "lat", "--quiet")
    refused("already exists; pass --force", "prepare", "--pipeline", folder, tmp_path / "src", tmp_path / "lat")
    refused("is not a prepared latent folder", "prepare", "--pipeline", folder, tmp_path / "src", tmp_path / "src",
            "--force")
    cli_ok("prepare", "--pipeline", folder, tmp_path / "src", tmp_path / "lat", "--force", "--quiet")   # replaced
    calls = []

    def encode(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise UserError("the disk is full")
        return torch.zeros(len(images), 4, 8, 8)

    monkeypatch.setattr(LatentVAE, "encode", encode)
    refused("the disk is full", "prepare", "--pipeline", folder, tmp_path / "src", tmp_path / "lat2",
            "--batch-size", 2, "--quiet")
    assert not (tmp_path / "lat2").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    other = tiny_pipeline(tmp_path / "other", seed=1)                   # the same configs, other weights
    assert not torch.equal(next(other.vae.parameters()), next(pipe.vae.parameters()))
    data = load_data(tmp_path / "lat")
    with pytest.raises(UserError, match="whose VAE differs") as e:
        check_latent_data(data, load_teacher(f"diffusers:{tmp_path / 'other' / 'pipe'}"))
    assert "\n" not in str(e.value) and f"--pipeline {tmp_path / 'other' / 'pipe'}" in str(e.value)
    with pytest.raises(UserError, match="must be a prepared latent folder"):
        check_latent_data(load_data("ring"), load_teacher(f"diffusers:{folder}"))
    refused("is a prepared latent folder", "prepare", tmp_path / "lat", tmp_path / "x.npy")
    assert os.listdir(tmp_path / "lat")
