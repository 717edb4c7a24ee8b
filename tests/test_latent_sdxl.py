"""Stable Diffusion XL teachers (docs/method.md section 9) on tiny random pipelines built here (nothing downloads): a
small UNet2DConditionModel with SDXL's added conditions (addition_embed_type "text_time"), the small AutoencoderKL of
tests/test_latent_teacher.py, a CLIPTextModel and a CLIPTextModelWithProjection over the CLIP tokenizer that file
writes (tests/test_latent_sd3.py: clip_pair), saved with save_pretrained, once with the pipeline's default
force_zeros_for_empty_prompt and once without it. Euler on ctmkit's teacher with classifier-free guidance must
reproduce StableDiffusionXLPipeline's own deterministic loop (DDIM, eta 0) from the prompts, with its own null
condition; encode_prompt must be the pipeline's; a student starts as the teacher (full and LoRA); prepare -> distill
-> sample --prompt runs end to end; a folder without SDXL's second text encoder is one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ctmkit import load_model, load_teacher
from ctmkit.core.precond import CTM
from ctmkit.data import load_data
from ctmkit.errors import UserError
from ctmkit.eval.prompts import encode_prompts
from ctmkit.io.card import ModelCard

from .test_latent_data import TEXTS, check_one_jump, cli_ok, image_folder, refused
from .test_latent_sd3 import CLIP_LENGTH, clip_pair
from .test_latent_student import QUICK, assert_starts_as_its_teacher, make_run, probe
from .test_latent_teacher import assert_round_off, euler_on_ddim_grid, perturb, tiny_unet, tiny_vae

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a cat on the mat", "a red dog", "a cat on the mat"]
TIME_DIM = 4                    # addition_time_embed_dim: 6 time ids x 4 + the pooled 16 = 40 added inputs


def tiny_sdxl(folder, seed: int = 0) -> dict:
    """StableDiffusionXLPipelines of tiny random components (CLIP widths 8 + 16 = the UNet's cross-attention 24,
    pooled 16; SDXL's EulerDiscreteScheduler settings), saved to folder/pipe (force_zeros_for_empty_prompt, the
    default) and folder/encoded (without it: the empty negative prompt is encoded); returned by those names."""
    tok, tok_2, clip_l, clip_g = clip_pair(folder, seed, transformers.CLIPTextModel)
    torch.manual_seed(seed)
    unet = tiny_unet(cross_attention_dim=24, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                     projection_class_embeddings_input_dim=6 * TIME_DIM + 16)
    vae = tiny_vae()
    perturb(unet)
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1, timestep_spacing="leading")
    parts = dict(vae=vae, text_encoder=clip_l, text_encoder_2=clip_g, tokenizer=tok, tokenizer_2=tok_2, unet=unet,
                 scheduler=sched, add_watermarker=False)
    pipes = {"pipe": diffusers.StableDiffusionXLPipeline(**parts),
             "encoded": diffusers.StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=False)}
    for name, pipe in pipes.items():
        pipe.save_pretrained(folder / name)
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    return tiny_sdxl(folder), folder


@pytest.mark.parametrize("name, negative", [("pipe", None), ("encoded", None), ("pipe", "dog")])
def test_euler_with_guidance_is_the_pipelines_ddim_loop(sdxl, name, negative):
    pipes, folder = sdxl
    sched = diffusers.DDIMScheduler.from_config(pipes[name].scheduler.config, clip_sample=False,
                                                set_alpha_to_one=False)
    zeros_for_empty = pipes[name].config.force_zeros_for_empty_prompt
    pipe = diffusers.StableDiffusionXLPipeline(**{**pipes[name].components, "scheduler": sched},
                                               force_zeros_for_empty_prompt=zeros_for_empty)
    pipe.set_progress_bar_config(disable=True)
    teacher = load_teacher(f"diffusers:{folder / name}")
    cond = teacher.encode_prompt(PROMPTS, negative_prompt=negative or "")
    with torch.no_grad():
        embeds, null, pooled, null_pooled = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=negative)
    assert cond.embeds.shape == (3, CLIP_LENGTH, 24) and cond.pooled.shape == (3, 16)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.null().embeds, null)
    # the projection's matmul rounds by batch size (ctmkit encodes each distinct prompt once)
    assert torch.allclose(cond.pooled, pooled, rtol=0, atol=1e-6)
    assert torch.allclose(cond.null().pooled, null_pooled, rtol=0, atol=1e-6)
    zeros = name == "pipe" and negative is None                 # force_zeros_for_empty_prompt: no negative prompt
    assert (not cond.null_embeds.any() and not cond.null_pooled.any()) == zeros
    w, z = 3.0, torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():           # the pipeline's own loop from the prompts: its encoding, null and time ids
        want = pipe(PROMPTS, negative_prompt=negative, guidance_scale=w, num_inference_steps=10, latents=z.clone(),
                    output_type="latent", eta=0.0).images
    assert_round_off(euler_on_ddim_grid(teacher, pipe.scheduler, z, w, cond), want, z)


def test_the_card_and_the_added_conditions(sdxl):
    folder = sdxl[1]
    teacher = load_teacher(f"diffusers:{folder / 'pipe'}")
    card = teacher.card
    assert card.shape == (4, 8, 8) and card.text_conditioned and card.latent["pipeline"] == "StableDiffusionXLPipeline"
    assert card.latent["denoiser"] == "UNet2DConditionModel" and card.latent["time_ids"] == [16, 16, 0, 0, 16, 16]
    text = card.latent["text"]
    assert text["embeds"] == [CLIP_LENGTH, 24] and text["pooled"] == 16 and text["force_zeros_for_empty_prompt"]
    assert [e["encoder"] for e in text["encoders"]] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert card.backbone.kwargs["vae_scale_factor"] == 2
    assert not load_teacher(f"diffusers:{folder / 'encoded'}").card.latent["text"]["force_zeros_for_empty_prompt"]
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    z, t, cond = probe(teacher)
    steps = torch.tensor([10.0, 200.0, 500.5, 990.0])
    with torch.no_grad():           # its UNet as the pipeline calls it: pooled embeddings and the time ids
        added = {"text_embeds": cond.pooled, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]]).expand(4, 6)}
        want = teacher.backbone.unet(z, steps, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample
        assert torch.equal(teacher.backbone(z, steps, None, cond), want)
        pooled_off = type(cond)(cond.embeds, cond.null_embeds, torch.zeros_like(cond.pooled), cond.null_pooled)
        assert float((teacher(z, t, pooled_off) - teacher(z, t, cond)).abs().max()) > 1e-3     # pooled matters
        student = CTM(card.backbone.build(), 0.5, teacher.precond)      # from the card: the same for every s
        student.load_state_dict(teacher.state_dict(), strict=False)
        for s in (t, t / 2):
            assert torch.equal(student.g(z, t, s, cond), teacher(z, t, cond))


# --- prepare -> distill -> sample (ctmkit prepare --pipeline, train/latent.py, eval/prompts.py) -----------------------

@pytest.fixture(scope="module")
def prepared(sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxldata")
    image_folder(root / "src")
    cli_ok("prepare", "--pipeline", sdxl[1] / "pipe", root / "src", root / "lat", "--quiet")
    return sdxl[1] / "pipe", root / "lat"


def test_prepare_stores_pooled_embeddings_and_the_zero_null(prepared):
    pipe, lat = prepared
    data = load_data(lat)
    prompts = list(dict.fromkeys(TEXTS))
    cond = load_teacher(f"diffusers:{pipe}").encode_prompt(prompts)
    assert data.manifest["text"]["pooled"] == 16 and torch.equal(data.pooled, cond.pooled)
    assert torch.equal(torch.from_numpy(np.asarray(data.embeds)), cond.embeds)
    assert not data.null_pooled.any() and not data.null_embeds.any()        # force_zeros_for_empty_prompt
    assert data.pooled[prompts.index("")].any()                          # the empty prompt as a prompt: encoded


@pytest.mark.parametrize("lora", [0, 2])
def test_a_distilled_student_starts_as_its_teacher(prepared, tmp_path, lora):
    pytest.importorskip("peft")
    pipe, lat = prepared
    run = make_run(pipe, lat, tmp_path / "r", f"ctm.lora_rank={lora}")         # student_precond auto: the teacher's
    assert run.net.precond.spec == run.teacher.card.precond
    assert_starts_as_its_teacher(run, pipe)                                     # the teacher loaded apart
    if lora:        # adapters (B at zero) and the s embedding train; the added-condition embedding stays frozen
        names = run.trained.names
        assert any(".attn2.to_k.lora_A" in n for n in names) and not any("add_embedding" in n for n in names)
        assert all(not p.any() for n, p in run.trained.tensors().items() if "lora_B" in n)


@pytest.mark.parametrize("lora", [0, 2])
def test_prepare_distill_sample_end_to_end(prepared, tmp_path, lora):
    if lora:
        pytest.importorskip("peft")
    pipe, lat = prepared
    run = tmp_path / "run"
    assert "CTM distilled" in cli_ok("distill", "--teacher", f"diffusers:{pipe}", "--data", lat, "--out", run,
                                     *QUICK, f"ctm.lora_rank={lora}")
    card = json.loads((run / "model.json").read_text())
    assert card["latent"]["pipeline"] == "StableDiffusionXLPipeline" and ("lora" in card["latent"]) == bool(lora)
    assert card["backbone"]["kwargs"]["vae_scale_factor"] == 2
    args = ["sample", "--prompt", "a cat", "--prompt", "a red dog", "--n", 2, "--seed", 4, "--quiet"]
    cli_ok(*args, "--model", run, "--nfe", 1, "--out", tmp_path / "one.npz")
    cond = encode_prompts(load_model(run), ["a cat"])                   # SDXL's encoders, from the card
    assert cond.pooled.shape == (1, 16) and not cond.null_pooled.any()
    one = check_one_jump(run, tmp_path / "one.npz")                     # NFE 1: one jump sigma_max -> sigma_min
    assert one["samples"].shape == (4, 16, 16, 3) and np.isfinite(one["latents"]).all()
    if not lora:       # the teacher itself samples from prompts too (guided Heun); no export of SDXL students yet
        cli_ok(*args, "--model", f"diffusers:{pipe}", "--nfe", 3, "--out", tmp_path / "teacher.npz")
        assert np.isfinite(np.load(tmp_path / "teacher.npz")["latents"]).all()
        refused("denoiser is an SDXL pipeline's, not exported yet", "export", run, tmp_path / "export")
        assert not (tmp_path / "export").exists()


# --- refusals -----------------------------------------------------------------------------------------------------

def one_line(folder, match: str) -> None:
    with pytest.raises(UserError, match=match) as e:
        load_teacher(f"diffusers:{folder}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("component", ["text_encoder_2", "tokenizer_2"])
@pytest.mark.parametrize("how", ["folder", "index"])
def test_a_folder_without_the_second_text_encoder_is_one_line(sdxl, tmp_path, component, how):
    folder = shutil.copytree(sdxl[1] / "pipe", tmp_path / "p")
    if how == "folder":
        shutil.rmtree(folder / component)
    else:           # saved with text_encoder_2=None (tokenizer_2=None): named [null, null] in model_index.json
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, component: [None, None]}))
    one_line(folder, f"has no {component}/")


def test_other_refusals(sdxl, tmp_path):
    folder = shutil.copytree(sdxl[1] / "pipe", tmp_path / "p")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(
        {**index, "text_encoder": ["transformers", "CLIPTextModelWithProjection"]}))
    one_line(folder, "an SDXL pipeline has a CLIPTextModel there")
    as_sd = {k: v for k, v in index.items() if not k.endswith("_2")} | {"_class_name": "StableDiffusionPipeline"}
    (folder / "model_index.json").write_text(json.dumps(as_sd))       # an SDXL UNet in an SD 1.x folder
    one_line(folder, "takes SDXL's added conditions")
    (folder / "model_index.json").write_text(json.dumps(index))
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "projection_class_embeddings_input_dim": 41}))
    one_line(folder, "projection_class_embeddings_input_dim 41 is not")
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": None}))
    one_line(folder, "needs a unet with addition_embed_type='text_time'")
