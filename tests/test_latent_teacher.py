"""Latent text-to-image teachers (docs/method.md section 9) on tiny random pipelines built here (nothing downloads):
a small UNet2DConditionModel with cross-attention, a small AutoencoderKL, a CLIP text model with a tiny config and a
CLIP tokenizer whose vocab.json / merges.txt this file writes, saved with save_pretrained. Euler on ctmkit's teacher
with classifier-free guidance must reproduce StableDiffusionPipeline's own deterministic loop (DDIM, eta 0) on
latents; a student starts as the teacher; a folder missing a component is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ctmkit import load_teacher, solve_pf_ode
from ctmkit.cli.base import load_model_spec
from ctmkit.core.conditions import TextCond
from ctmkit.core.guidance import guided
from ctmkit.core.precond import CTM, vp_sigmas
from ctmkit.data import load_data
from ctmkit.errors import UserError
from ctmkit.io.card import ModelCard
from ctmkit.nets.text_encoders import PromptEncoder, device_of

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

MAX_LENGTH = 12                 # the tokenizer's model_max_length: L of the embeddings [L, D]
WORDS = ["a", "cat", "dog", "on", "red", "the", "mat"]


def byte_alphabet() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 bytes (the byte-level BPE's base vocabulary)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in keep]
    table = dict(zip(keep, keep)) | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(table[b]) for b in range(256)]


def write_clip_tokenizer(folder, words: list[str] = WORDS) -> None:
    """vocab.json + merges.txt of a tiny CLIP BPE: the bytes, the bytes ending a word, `words` whole, the specials
    (bench/latent_digits.py writes its captions' vocabulary with it too)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = byte_alphabet()
    merges, tokens = [], []
    for word in words:                   # merge left to right: c a -> ca, ca t</w> -> cat</w>
        done = word[0]
        for i, ch in enumerate(word[1:], 1):
            piece = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{done} {piece}")
            done += piece
            tokens.append(done)
    vocab = base + [c + "</w>" for c in base] + list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *dict.fromkeys(merges)]) + "\n")


def tiny_pipeline(folder, prediction: str = "epsilon", seed: int = 0):
    """A StableDiffusionPipeline of tiny random components (SD's DDIM settings), saved to `folder` and returned."""
    write_clip_tokenizer(folder / "words")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "words", model_max_length=MAX_LENGTH)
    torch.manual_seed(seed)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet, vae = tiny_unet(cross_attention_dim=16), tiny_vae()
    perturb(unet)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    prediction_type=prediction)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe")
    return pipe.to(torch.float32)


def tiny_unet(**config):
    """A small random UNet2DConditionModel on latents [4, 8, 8] (cross-attention in its first down and last up
    block); `config`: cross_attention_dim and any other UNet2DConditionModel setting."""
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, attention_head_dim=2, **config)


def tiny_vae(**config):
    """A small random AutoencoderKL (images [3, 16, 16] <-> latents [4, 8, 8]); `config`: e.g. its factors."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        **config)


def perturb(net) -> None:
    """Random weights made clearly non-trivial (some layers start at zero)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))


def euler_on_ddim_grid(teacher, sched, z, w: float, cond):
    """Euler with guidance w on the teacher over the sigmas of a DDIM scheduler after the pipeline's loop set its
    timesteps (ending at its final alpha_bar's sigma), from and back to the VP latents: the pipeline's DDIM (eta 0)."""
    sig = vp_sigmas(sched.alphas_cumprod)
    end = vp_sigmas(sched.final_alpha_cumprod.reshape(1))      # set_alpha_to_one=False: sigma_0, not 0
    sigmas = torch.cat([sig[sched.timesteps.long()], end])
    ours = solve_pf_ode(guided(teacher, w), z * float((1 + sigmas[0] ** 2).sqrt()), sigmas, "euler", cond)
    return ours / float((1 + end[0] ** 2).sqrt())              # EDM's z back to the VP latent z / sqrt(1 + sigma^2)


def assert_round_off(ours, want, z) -> None:
    """ours = want to float32 round-off (measured <= 4e-7 relative), and the loop moved the latents z."""
    err = float((ours - want).abs().max())
    assert err < 5e-6 * max(1.0, float(want.abs().max())), err
    assert float((want - z).abs().max()) > 0.1


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def pipeline(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return tiny_pipeline(folder, request.param), folder / "pipe"


PROMPTS = ["a cat on the mat", "a red dog", "a cat on the mat"]


def test_euler_with_guidance_is_the_pipelines_ddim_loop(pipeline):
    pipe, folder = pipeline
    teacher = load_teacher(f"diffusers:{folder}")
    cond = teacher.encode_prompt(PROMPTS)
    embeds, null = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.null().embeds, null)   # the pipeline's own
    assert not torch.equal(cond.embeds[0], cond.embeds[1]) and torch.equal(cond.embeds[0], cond.embeds[2])
    steps, w = 10, 3.0
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pipe(prompt_embeds=embeds, negative_prompt_embeds=null, guidance_scale=w, num_inference_steps=steps,
                    latents=z.clone(), output_type="latent", eta=0.0).images
    assert_round_off(euler_on_ddim_grid(teacher, pipe.scheduler, z, w, cond), want, z)   # its timesteps (offset 1)


def test_the_card_records_latents_vae_and_text(pipeline):
    pipe, folder = pipeline
    card = load_teacher(f"diffusers:{folder}").card
    assert card.shape == (4, 8, 8) and card.data.kind == "latent" and card.num_classes == 0
    assert card.text_conditioned and card.null_branch
    assert card.latent["vae"]["scaling_factor"] == pytest.approx(pipe.vae.config.scaling_factor)
    assert card.latent["vae"]["shift_factor"] == 0.0 and card.latent["image_shape"] == [3, 16, 16]
    assert card.latent["text"]["embeds"] == [MAX_LENGTH, 16] and card.latent["text"]["null_prompt"] == ""
    sig = vp_sigmas(pipe.scheduler.alphas_cumprod)
    assert card.sigma_min == pytest.approx(float(sig[0])) and card.sigma_max == pytest.approx(float(sig[-1]))
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


def test_student_starts_as_the_teacher(pipeline):
    _, folder = pipeline
    teacher = load_teacher(f"diffusers:{folder}")
    student = CTM(teacher.card.backbone.build(), 0.5, teacher.precond)
    missing = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not missing.unexpected_keys and all(k.startswith("backbone.s_embed.") for k in missing.missing_keys)
    cond = teacher.encode_prompt(["a cat", "the dog", "", "red"])
    z, t = torch.randn(4, 4, 8, 8), torch.tensor([0.05, 0.5, 3.0, 14.0])
    with torch.no_grad():
        want = teacher(z, t, cond)
        for s in (t, t / 2, torch.full_like(t, 0.03)):
            assert torch.equal(student.g(z, t, s, cond), want)


def test_guidance_with_a_text_condition_is_the_two_calls(pipeline):
    _, folder = pipeline
    teacher = load_teacher(f"diffusers:{folder}")
    cond = teacher.encode_prompt(["a cat", "red"], negative_prompt="dog")
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 5.0])
    with torch.no_grad():
        c, null = teacher(z, t, cond), teacher(z, t, cond.null())
        assert torch.allclose(guided(teacher, 2.5)(z, t, cond), null + 2.5 * (c - null), atol=1e-6)
    assert torch.equal(cond.null().embeds[1], teacher.encode_prompt("dog").embeds[0])   # the negative prompt
    with pytest.raises(ValueError, match="TextCond"):
        teacher(z, t, torch.tensor([0, 1]))


def test_text_cond_indexes_drops_and_moves():
    cond = TextCond(torch.randn(3, 5, 4), torch.zeros(5, 4), torch.randn(3, 2), torch.zeros(2))
    part = cond[torch.tensor([2, 0])]
    assert len(part) == 2 and torch.equal(part.embeds[0], cond.embeds[2])
    assert torch.equal(part.pooled[1], cond.pooled[0])
    dropped = cond.drop(torch.tensor([True, False, True]))
    assert torch.equal(dropped.embeds[1], cond.embeds[1]) and not dropped.embeds[[0, 2]].any()
    assert not dropped.pooled[[0, 2]].any() and torch.equal(dropped.pooled[1], cond.pooled[1])
    assert not cond.null().embeds.any() and cond.to(torch.float64).embeds.dtype == torch.float64
    with pytest.raises(ValueError, match="null_embeds"):
        TextCond(torch.randn(3, 5, 4), torch.zeros(4, 4))


class Moved(torch.Tensor):
    """Token ids or a mask that record where they are moved (`to`), in `Moved.to_devices`."""

    to_devices: list = []

    def to(self, *args, **kwargs):
        Moved.to_devices.append(torch.device(args[0] if args else kwargs["device"]))
        return super().to(*args, **kwargs).as_subclass(torch.Tensor)


class TrackedTokenizer:
    """A tokenizer whose input_ids and attention_mask are `Moved` tensors (its other attributes: the tokenizer's)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        out = self.tokenizer(*args, **kwargs)
        for key in ("input_ids", "attention_mask"):
            out[key] = out[key].as_subclass(Moved)
        return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    tiny_pipeline(folder)
    return folder / "pipe"


def test_token_ids_and_masks_go_to_the_encoders_device(saved):
    encoder = PromptEncoder.from_pipeline(saved, json.loads((saved / "model_index.json").read_text()))
    encoder.encoder.config.use_attention_mask = True            # the mask goes in too (some SD 2.x encoders)
    encoder.tokenizer = TrackedTokenizer(encoder.tokenizer)
    Moved.to_devices = []
    encoder(["a cat", "a red dog"])                              # no GPU here: the check is that they are moved
    assert Moved.to_devices == [device_of(encoder.encoder)] * 4  # mask and ids of the prompts, then of the null


@pytest.mark.parametrize("component", ["unet", "vae", "scheduler", "text_encoder", "tokenizer"])
def test_a_pipeline_missing_a_component_is_one_line(saved, tmp_path, component):
    folder = shutil.copytree(saved, tmp_path / "p")
    shutil.rmtree(folder / component)
    with pytest.raises(UserError, match=f"has no {component}/") as e:
        load_teacher(f"diffusers:{folder}")
    assert "\n" not in str(e.value)


def test_refusals_and_pixel_pipelines(saved, tmp_path):
    folder = shutil.copytree(saved, tmp_path / "p")
    index = json.loads((folder / "model_index.json").read_text())
    with pytest.raises(UserError, match="takes no settings"):
        load_teacher(f"diffusers:{folder}?null_class=0")
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "CTMPipeline"}))
    with pytest.raises(UserError, match=f"--model {folder}"):
        load_teacher(f"diffusers:{folder}")
    flux = {**index, "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(flux))
    with pytest.raises(UserError, match="FluxTransformer2DModel, which ctmkit does not support yet"):
        load_teacher(f"diffusers:{folder}")
    with pytest.raises(UserError, match="must be a prepared latent folder"):     # its data: check_latent_data
        load_teacher(f"diffusers:{saved}", data=load_data("ring"))
    with pytest.raises(UserError, match="does not take it yet"):
        load_model_spec(f"diffusers:{saved}")
    torch.manual_seed(0)            # a pixel DDPMPipeline folder has a model_index.json too: still a pixel teacher
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    diffusers.DDPMPipeline(unet, diffusers.DDIMScheduler()).save_pretrained(tmp_path / "pixel")
    pixel = load_teacher(f"diffusers:{tmp_path / 'pixel'}")
    assert pixel.card.shape == (1, 8, 8) and pixel.card.latent is None
