"""Stable Diffusion 3 teachers (docs/method.md section 9) on tiny random pipelines built here (nothing downloads): a
small SD3Transformer2DModel, a small AutoencoderKL with scaling and shift factors, two CLIP text models with
projection (CLIP-L, CLIP-G) sharing a CLIP tokenizer whose vocab.json / merges.txt tests/test_latent_teacher.py
writes, and a T5 encoder with a Unigram T5 tokenizer built from a word list, saved with save_pretrained (also
without T5). Euler on ctmkit's teacher with classifier-free guidance must reproduce StableDiffusion3Pipeline's own
flow-matching Euler loop on latents, for a shifted and a dynamically shifted schedule; encode_prompt must be the
pipeline's; a student starts as the teacher; a bad folder is one line. `prepare --pipeline` stores the pooled
embeddings (= encoding by hand); prepare -> distill -> sample --prompt runs end to end (full and LoRA students)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ctmkit import load_model, load_teacher, solve_pf_ode
from ctmkit.config import DistillConfig, load_config
from ctmkit.core.guidance import guided
from ctmkit.core.precond import CTM
from ctmkit.data import load_data
from ctmkit.errors import UserError
from ctmkit.eval.prompts import encode_prompts
from ctmkit.io.card import ModelCard
from ctmkit.nets.lora import is_trained
from ctmkit.nets.text_encoders import device_of
from ctmkit.train.ctm import CTMRun

from .test_latent_data import TEXTS, check_one_jump, cli_ok, image_folder, refused
from .test_latent_teacher import WORDS, Moved, TrackedTokenizer, perturb, tiny_vae, write_clip_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CLIP_LENGTH = 12                # the CLIP tokenizers' model_max_length
SEQ = 6                         # max_sequence_length of the T5 tokens in most tests (the pipeline's default is 256)
PROMPTS = ["a cat on the mat", "a red dog", "a cat on the mat"]


def t5_tokenizer():
    """A T5 tokenizer (Unigram, as T5's sentencepiece model) over WORDS: <pad> 0, </s> 1, <unk> 2."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    return transformers.T5Tokenizer(vocab=vocab + [("\u2581" + w, -1.0) for w in WORDS], extra_ids=0)


def clip_model(tokenizer, hidden: int, seed: int, cls=None):
    """A small random CLIP text model (`cls`, CLIPTextModelWithProjection by default: projection 16)."""
    torch.manual_seed(seed)
    return (cls or transformers.CLIPTextModelWithProjection)(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()


def clip_pair(folder, seed: int, first=None) -> tuple:
    """(tokenizer, tokenizer_2, CLIP-L, CLIP-G) over WORDS (written under folder/words): widths 8 and 16, the second
    tokenizer padding with "!"; `first`: CLIP-L's class (CLIPTextModelWithProjection by default)."""
    write_clip_tokenizer(folder / "words")
    tok = transformers.CLIPTokenizer.from_pretrained(folder / "words", model_max_length=CLIP_LENGTH)
    tok_2 = transformers.CLIPTokenizer.from_pretrained(folder / "words", model_max_length=CLIP_LENGTH, pad_token="!")
    return tok, tok_2, clip_model(tok, 8, seed + 1, first), clip_model(tok_2, 16, seed + 2)


def tiny_sd3(folder, seed: int = 0):
    """A StableDiffusion3Pipeline of tiny random components (CLIP widths 8 + 16 padded to T5's 32; pooled 16 + 16),
    saved to folder/pipe and, without T5, folder/no_t5; returned."""
    tok, tok_2, clip_l, clip_g = clip_pair(folder, seed)
    tok_3 = t5_tokenizer()
    torch.manual_seed(seed)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tok_3), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8)).eval()         # eval: no dropout, as from_pretrained loads it
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=8)
    vae = tiny_vae(scaling_factor=1.5, shift_factor=0.1)
    perturb(transformer)                  # a random but clearly non-trivial network (AdaLN layers start at zero)
    parts = dict(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                 text_encoder=clip_l, tokenizer=tok, text_encoder_2=clip_g, tokenizer_2=tok_2)
    pipe = diffusers.StableDiffusion3Pipeline(**parts, text_encoder_3=t5, tokenizer_3=tok_3)
    pipe.save_pretrained(folder / "pipe")
    no_t5 = diffusers.StableDiffusion3Pipeline(**parts, text_encoder_3=None, tokenizer_3=None)
    no_t5.save_pretrained(folder / "no_t5")
    for p in (pipe, no_t5):
        p.set_progress_bar_config(disable=True)
    return pipe, no_t5


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    pipe, no_t5 = tiny_sd3(folder)
    return pipe, no_t5, folder


SCHEDULERS = {"shift 3": dict(shift=3.0),
              "dynamic": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4,
                              max_image_seq_len=64)}


@pytest.mark.parametrize("schedule", SCHEDULERS)
def test_euler_with_guidance_is_the_pipelines_flow_loop(sd3, schedule):
    pipe, _, folder = sd3
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULERS[schedule])
    pipe = diffusers.StableDiffusion3Pipeline(**{**pipe.components, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    teacher = load_teacher(f"diffusers:{folder / 'pipe'}")        # one teacher: the schedule is not part of D
    cond = teacher.encode_prompt(PROMPTS, max_sequence_length=SEQ)
    w, z = 3.0, torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():           # the pipeline's own sigmas, shifted by its scheduler; tau = 1 is sigma = infinity
        want = pipe(prompt_embeds=cond.embeds, negative_prompt_embeds=cond.null().embeds,
                    pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=cond.null().pooled,
                    guidance_scale=w, sigmas=list(np.linspace(0.98, 0.05, 8)), latents=z.clone(),
                    output_type="latent").images
    taus = pipe.scheduler.sigmas.double()                        # shifted, ending with 0
    assert float((taus[:-1] - torch.linspace(0.98, 0.05, 8, dtype=torch.float64)).abs().max()) > 0.01
    ours = solve_pf_ode(guided(teacher, w), z / float(1 - taus[0]), taus / (1 - taus), "euler", cond)
    err = float((ours - want).abs().max())
    assert err < 5e-6 * max(1.0, float(want.abs().max())), err  # float32 round-off: measured 2.6e-6 of max 3.4
    assert float((want - z).abs().max()) > 0.1                  # the loop did move the latents


@pytest.mark.parametrize("negative", ["", "dog"])
def test_encode_prompt_is_the_pipelines(sd3, negative):
    pipe, no_t5, folder = sd3
    long = "a red cat on the mat on the red mat"                # more tokens than SEQ: T5's tokens are truncated
    for p, name in ((pipe, "pipe"), (no_t5, "no_t5")):
        teacher = load_teacher(f"diffusers:{folder / name}")
        for length in (SEQ, None):                               # None: the pipeline's default, 256
            n = {} if length is None else {"max_sequence_length": length}
            cond = teacher.encode_prompt([*PROMPTS, long], negative_prompt=negative, **n)
            with torch.no_grad():
                embeds, null, pooled, null_pooled = p.encode_prompt(
                    [*PROMPTS, long], None, None, "cpu", negative_prompt=negative or None, **n)
            assert cond.embeds.shape == (4, CLIP_LENGTH + (length or 256), 32) and cond.pooled.shape == (4, 32)
            assert torch.equal(cond.embeds, embeds) and torch.equal(cond.null().embeds, null)
            # the projection's matmul rounds by batch size (ctmkit encodes each distinct prompt once): measured 2.4e-7
            assert torch.allclose(cond.pooled, pooled, rtol=0, atol=1e-6)
            assert torch.allclose(cond.null().pooled, null_pooled, rtol=0, atol=1e-6)
    assert not cond.embeds[:, CLIP_LENGTH:].any()                # no T5: zeros in its place
    assert torch.equal(cond.embeds[0], cond.embeds[2]) and not torch.equal(cond.embeds[0], cond.embeds[1])


def test_token_ids_go_to_each_encoders_device(sd3):
    teacher = load_teacher(f"diffusers:{sd3[2] / 'pipe'}")
    teacher.encode_prompt("a cat", max_sequence_length=SEQ)     # loads the encoders
    enc = teacher.prompt_encoder
    enc.clips = [(TrackedTokenizer(tok), e) for tok, e in enc.clips]
    enc.t5 = (TrackedTokenizer(enc.t5[0]), enc.t5[1])
    Moved.to_devices, enc.nulls = [], {}
    enc(["a red dog"], max_sequence_length=SEQ)                  # no GPU here: the check is that they are moved
    devices = [device_of(e) for _, e in enc.clips] + [device_of(enc.t5[1])]
    assert Moved.to_devices == devices * 2                      # CLIP-L, CLIP-G, T5: the prompt, then the null


def test_the_card_records_latents_vae_scheduler_and_text(sd3):
    pipe, _, folder = sd3
    card = load_teacher(f"diffusers:{folder / 'pipe'}").card
    assert card.shape == (4, 8, 8) and card.data.kind == "latent" and card.num_classes == 0
    assert card.text_conditioned and card.null_branch and card.precond == {"kind": "flow", "num_train_timesteps": 1000}
    assert card.latent["denoiser"] == "SD3Transformer2DModel" and card.latent["image_shape"] == [3, 16, 16]
    assert card.latent["vae"]["scaling_factor"] == 1.5 and card.latent["vae"]["shift_factor"] == pytest.approx(0.1)
    text = card.latent["text"]
    assert text["embeds"] == [CLIP_LENGTH + 256, 32] and text["pooled"] == 32 and text["max_sequence_length"] == 256
    assert [e["encoder"] for e in text["encoders"]] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    assert card.latent["scheduler"]["shift"] == 3.0
    assert card.sigma_min == pytest.approx(1 / 999) and card.sigma_max == pytest.approx(199.0)
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    no_t5 = load_teacher(f"diffusers:{folder / 'no_t5'}").card.latent["text"]["encoders"]
    assert no_t5[2] == {"encoder": None, "tokenizer": None}


def test_student_starts_as_the_teacher(sd3):
    _, _, folder = sd3
    teacher = load_teacher(f"diffusers:{folder / 'pipe'}")
    student = CTM(teacher.card.backbone.build(), 0.5, teacher.precond)
    missing = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not missing.unexpected_keys and all(k.startswith("backbone.s_embed.") for k in missing.missing_keys)
    assert student.backbone.last_layer() is student.backbone.transformer.proj_out.weight
    cond = teacher.encode_prompt(["a cat", "the dog", "", "red"], max_sequence_length=SEQ)
    z, t = torch.randn(4, 4, 8, 8), torch.tensor([0.002, 0.5, 3.0, 150.0])
    with torch.no_grad():
        want = teacher(z, t, cond)
        assert float((want - teacher(z, t, cond.null())).abs().max()) > 1e-3      # the condition matters
        for s in (t, t / 2, torch.full_like(t, 0.002), torch.full_like(t, 80.0)):
            assert torch.equal(student.g(z, t, s, cond), want)
        torch.nn.init.normal_(student.backbone.s_embed.linear_2.weight)      # once trained, s reaches the output
        assert float((student.g(z, t, t / 2, cond) - want).abs().max()) > 1e-3


def one_line(fn, match: str) -> None:
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("component", ["transformer", "vae", "scheduler", "text_encoder", "tokenizer",
                                       "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"])
def test_a_pipeline_missing_a_component_is_one_line(sd3, tmp_path, component):
    folder = shutil.copytree(sd3[2] / "pipe", tmp_path / "p")
    shutil.rmtree(folder / component)
    one_line(lambda: load_teacher(f"diffusers:{folder}"), f"has no {component}/")


def test_refusals(sd3, tmp_path):
    folder = shutil.copytree(sd3[2] / "pipe", tmp_path / "p")
    index = json.loads((folder / "model_index.json").read_text())
    flux = {**index, "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(flux))
    one_line(lambda: load_teacher(f"diffusers:{folder}"), "FluxTransformer2DModel, which ctmkit does not support yet")
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    one_line(lambda: load_teacher(f"diffusers:{folder}"), "takes FlowMatchEulerDiscreteScheduler")
    teacher = load_teacher(f"diffusers:{sd3[2] / 'pipe'}")
    for bad in (513, 0, 2.5):
        one_line(lambda n=bad: teacher.encode_prompt("a cat", max_sequence_length=n), "from 1 to 512")
    one_line(lambda: teacher.encode_prompt("a cat", clip_skip=1), "no option clip_skip")
    with pytest.raises(ValueError, match="pooled"):
        teacher(torch.randn(1, 4, 8, 8), torch.ones(1), torch.tensor([0]))


# --- prepare -> distill -> sample (ctmkit prepare --pipeline, train/latent.py, eval/prompts.py) -----------------------

QUICK = ["--steps", 2, "--batch-size", 2, "ctm.num_scales=6", "ctm.max_k=2", "train.phema=[]", "train.ema=[0.9]",
         "--quiet"]


@pytest.fixture(scope="module")
def prepared(sd3, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3data")
    images = image_folder(root / "src")
    cli_ok("prepare", "--pipeline", sd3[2] / "pipe", root / "src", root / "lat", "--quiet")
    return sd3[2] / "pipe", root / "lat", images


def test_prepare_stores_pooled_embeddings_and_equals_encoding_by_hand(prepared):
    pipe, lat, images = prepared
    data = load_data(lat)
    teacher = load_teacher(f"diffusers:{pipe}")
    prompts = list(dict.fromkeys(TEXTS))
    assert data.prompts == prompts and data.manifest["version"] == 2 and data.manifest["text"]["pooled"] == 32
    cond = teacher.encode_prompt(prompts)                  # the same batch of distinct prompts, the default 256 tokens
    assert data.pooled.shape == (len(prompts), 32) and torch.equal(data.pooled, cond.pooled)
    assert torch.equal(data.null_pooled, cond.null_pooled) and torch.equal(data.null_embeds, cond.null_embeds)
    assert torch.equal(torch.from_numpy(np.asarray(data.embeds)), cond.embeds)
    got = data.text_cond([1, 2, 4])
    assert torch.equal(got.pooled, cond.pooled[[1, 0, 3]]) and torch.equal(got.embeds, cond.embeds[[1, 0, 3]])
    vae = diffusers.AutoencoderKL.from_pretrained(pipe / "vae")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():                                   # z = (mean - shift) * scaling, shift 0.1, scaling 1.5
        want = (vae.encode(x).latent_dist.mean - 0.1) * 1.5
    assert torch.allclose(data[np.arange(len(TEXTS))], want, rtol=0, atol=1e-5)


def test_a_folder_without_pooled_embeddings(prepared, tmp_path):
    pipe, lat, _ = prepared
    old = shutil.copytree(lat, tmp_path / "old")           # as ctmkit's format version 1 wrote it
    (old / "pooled.npy").unlink()
    (old / "null_pooled.npy").unlink()
    m = json.loads((old / "ctmkit_latents.json").read_text())
    (old / "ctmkit_latents.json").write_text(json.dumps({**m, "version": 1}))
    data = load_data(old)
    assert data.pooled is None and data.text_cond([0]).pooled is None
    refused("holds no pooled prompt embeddings", "distill", "--teacher", f"diffusers:{pipe}", "--data", old,
            "--out", tmp_path / "run", "--steps", 1, "--quiet")


def sd3_run(pipe, lat, out, *overrides):
    cfg = load_config(DistillConfig, None, None, ["train.steps=2", "train.batch_size=2", "ctm.num_scales=6",
                                                  "ctm.max_k=2", "train.phema=[]", *overrides],
                      data=str(lat), teacher=f"diffusers:{pipe}")
    return CTMRun(cfg, out, load_data(lat))


@pytest.mark.parametrize("lora", [0, 2])
def test_a_distilled_student_starts_as_its_teacher(prepared, tmp_path, lora):
    pytest.importorskip("peft")
    pipe, lat, _ = prepared
    run = sd3_run(pipe, lat, tmp_path / "r", f"ctm.lora_rank={lora}")         # student_precond auto: the flow form
    assert run.net.precond.spec == {"kind": "flow", "num_train_timesteps": 1000}
    teacher = load_teacher(f"diffusers:{pipe}")                                 # loaded apart
    cond = teacher.encode_prompt(["a cat", "the dog", "", "red"], max_sequence_length=SEQ)
    z, t = torch.randn(4, 4, 8, 8), torch.tensor([0.05, 0.5, 3.0, 150.0])
    with torch.no_grad():
        want = teacher(z, t, cond)
        assert torch.equal(run.teacher(z, t, cond), want)
        for s in (t, t / 2, torch.full_like(t, 0.03)):
            assert torch.equal(run.net.g(z, t, s, cond), want)
    if lora:    # adapters on the joint attention of both streams and the feed-forward layers, B at zero
        names = run.trained.names
        assert all(is_trained(n) for n in names) and any("s_embed" in n for n in names)
        for layer in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "ff.net.2", "ff_context.net.0.proj"):
            assert any(f".{layer}.lora_A" in n for n in names), layer
        assert {n for n in names if "lora_" not in n} == {f"backbone.s_embed.linear_{i}.{w}" for i in (1, 2)
                                                          for w in ("weight", "bias")}      # not pos_embed
        assert not any("proj_out" in n or "norm" in n or "embedder" in n for n in names)
        assert all(not p.any() for n, p in run.trained.tensors().items() if "lora_B" in n)
        assert "transformer_blocks.1.ff.net.2.lora_B" in next(
            n for n, p in run.net.named_parameters() if p is run.last_layer)


@pytest.mark.parametrize("lora", [0, 2])
def test_prepare_distill_sample_end_to_end(prepared, tmp_path, lora):
    if lora:
        pytest.importorskip("peft")
    pipe, lat, _ = prepared
    run = tmp_path / "run"
    assert "CTM distilled" in cli_ok("distill", "--teacher", f"diffusers:{pipe}", "--data", lat, "--out", run,
                                     *QUICK, f"ctm.lora_rank={lora}")
    card = json.loads((run / "model.json").read_text())
    assert card["latent"]["denoiser"] == "SD3Transformer2DModel" and ("lora" in card["latent"]) == bool(lora)
    assert card["precond"]["kind"] == "flow"
    args = ["sample", "--prompt", "a cat", "--prompt", "a red dog", "--n", 2, "--seed", 4, "--quiet"]
    cli_ok(*args, "--model", run, "--nfe", 1, "--out", tmp_path / "one.npz")
    assert encode_prompts(load_model(run), ["a cat"]).pooled.shape == (1, 32)     # SD3's encoders, from the card
    one = check_one_jump(run, tmp_path / "one.npz")                       # NFE 1: one jump sigma_max -> sigma_min
    assert one["samples"].shape == (4, 16, 16, 3) and np.isfinite(one["latents"]).all()
    teacher = load_teacher(f"diffusers:{pipe}")
    with torch.no_grad():                     # decoded with the VAE's factors: z / 1.5 + 0.1
        vae = diffusers.AutoencoderKL.from_pretrained(pipe / "vae")
        x = vae.decode(torch.from_numpy(one["latents"]) / 1.5 + 0.1).sample
    pixels = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert (np.abs(pixels.astype(int) - one["samples"].astype(int)) <= 1).all()
    if not lora:       # the teacher itself samples from prompts too (Heun on the flow, guided)
        cli_ok(*args, "--model", f"diffusers:{pipe}", "--nfe", 3, "--out", tmp_path / "teacher.npz")
        assert np.isfinite(np.load(tmp_path / "teacher.npz")["latents"]).all()
        assert teacher.card.latent["vae"]["shift_factor"] == pytest.approx(0.1)
