"""Prompt encoders of latent text-to-image pipelines: prompts -> TextCond (core/conditions.py; docs/method.md
section 9), from the text encoder and tokenizer a diffusers pipeline folder holds (`text_encoder/`, `tokenizer/`).

Stable Diffusion 1.x / 2.x (StableDiffusionPipeline.encode_prompt with clip_skip None): the prompt is tokenised,
padded and truncated to the tokenizer's model_max_length, and its embedding is the CLIP text model's last hidden
state [L, D]; the null condition is the same for the negative prompt, the empty prompt by default. Each distinct
prompt of a call runs through the encoder once, and each negative prompt's embedding is kept after its first use, so
a sampler or a data preparation encodes once and reuses the TextCond at every step. Stable Diffusion XL (two CLIPs,
pooled embeddings, the empty negative prompt as zeros: StableDiffusionXLPipeline.encode_prompt): SDXLPromptEncoder;
Stable Diffusion 3 (three encoders, pooled embeddings, StableDiffusion3Pipeline.encode_prompt): SD3PromptEncoder; both
with the same caching. `load_prompt_encoder` picks one from a latent card's record.

transformers is part of the `diffusers` optional extra; it is imported only here, when a prompt encoder is loaded.
Weights are read from the folder only (local_files_only; no remote code).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..core.conditions import TextCond
from ..errors import UserError

INSTALL_HINT = ("text-conditioned (latent) teachers need transformers: pip install 'ctmkit[diffusers]' "
                "(or pip install transformers)")
ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")     # the text encoder classes a folder may name
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
SD3_CLIPS = ("CLIPTextModelWithProjection",)                    # SD3's CLIP-L and CLIP-G; SDXL's second CLIP
SDXL_CLIPS = (("CLIPTextModel",), SD3_CLIPS)                    # SDXL's text_encoder (CLIP-L) and text_encoder_2
T5_ENCODERS, T5_TOKENIZERS = ("T5EncoderModel",), ("T5TokenizerFast", "T5Tokenizer")
MAX_SEQUENCE_LENGTH = 256      # StableDiffusion3Pipeline's default T5 token count


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return transformers


def load_component(folder: Path, name: str, allowed: tuple[str, ...], class_name: str):
    """One transformers component of a pipeline folder (`folder/name`, its class named by model_index.json and one
    of `allowed`), from local files only; UserError in one line otherwise."""
    if class_name not in allowed:
        raise UserError(f"diffusers teacher '{folder}': {name}/ is a {class_name}; ctmkit takes {' or '.join(allowed)}")
    cls = getattr(import_transformers(), class_name)
    try:
        return cls.from_pretrained(folder / name, local_files_only=True)
    except Exception as e:    # a foreign folder: any failure is the user's files, said in one line
        raise UserError(f"diffusers teacher '{folder}': cannot load {name}/ ({str(e).splitlines()[0]})") from None


def device_of(module) -> torch.device:
    """The device of a module's parameters: where its token ids and masks go (a pipeline moved to a GPU)."""
    return next(module.parameters()).device


class PromptEncoder:
    """A CLIP text encoder + tokenizer: `encoder(prompts, negative_prompt="") -> TextCond` (float32, on the
    encoder's device: its token ids are moved there). Subclasses (SD3PromptEncoder) redefine `embed` and `options`;
    the caching in __call__ is shared."""

    def __init__(self, tokenizer, encoder) -> None:
        self.tokenizer, self.encoder = tokenizer, encoder.eval().requires_grad_(False)
        self.nulls: dict[tuple, tuple[Tensor, Tensor | None]] = {}    # (negative prompt, options) -> its embeddings

    @classmethod
    def from_pipeline(cls, folder: Path, index: dict) -> PromptEncoder:
        """The text_encoder/ and tokenizer/ of a pipeline folder whose model_index.json is `index`."""
        tokenizer = load_component(folder, "tokenizer", TOKENIZERS, index["tokenizer"][1])
        return cls(tokenizer, load_component(folder, "text_encoder", ENCODERS, index["text_encoder"][1]))

    def options(self) -> tuple:
        """The encoding options of a call, checked (UserError), as a tuple for `embed` (none here)."""
        return ()

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> tuple[Tensor, None]:
        """Prompts [N] -> (the last hidden state [N, L, D], L = the tokenizer's model_max_length; no pooled)."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = device_of(self.encoder)
        mask = tokens.attention_mask.to(device) if getattr(self.encoder.config, "use_attention_mask", False) else None
        return self.encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float(), None

    def __call__(self, prompts: str | list[str], negative_prompt: str = "", **options) -> TextCond:
        """Prompts [B] -> TextCond [B] whose null is the negative prompt's embedding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UserError("encode_prompt needs one or more prompts (strings)")
        try:
            key = self.options(**options)
        except TypeError:
            raise UserError(f"encode_prompt of this teacher takes no option {', '.join(options)}") from None
        rows = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        embeds, pooled = self.embed(list(rows), *key)
        idx = torch.tensor([rows[p] for p in prompts])
        if (negative_prompt, key) not in self.nulls:
            self.nulls[negative_prompt, key] = self.null_embedding(negative_prompt, *key)
        null, null_pooled = self.nulls[negative_prompt, key]
        return TextCond(embeds[idx], null, None if pooled is None else pooled[idx], null_pooled)

    def null_embedding(self, negative_prompt: str, *key) -> tuple[Tensor, Tensor | None]:
        """The null condition (embeds [L, D], pooled [P] or None): the negative prompt's embedding."""
        null, pooled = self.embed([negative_prompt], *key)
        return null[0], None if pooled is None else pooled[0]


def clip_outputs(clips: list[tuple], prompts: list[str]) -> tuple[list[Tensor], list[Tensor]]:
    """(each CLIP's penultimate hidden states [N, L, D_i], each one's first output: a projection's text_embeds
    [N, P_i]) of `clips` [(tokenizer, encoder)], all tokenised to the first tokenizer's model_max_length L."""
    length = clips[0][0].model_max_length
    states, firsts = [], []
    for tokenizer, encoder in clips:
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(device_of(encoder)), output_hidden_states=True)
        states.append(out.hidden_states[-2])            # the penultimate layer
        firsts.append(out[0])
    return states, firsts


class SDXLPromptEncoder(PromptEncoder):
    """Stable Diffusion XL's two text encoders (StableDiffusionXLPipeline.encode_prompt with clip_skip None, the same
    prompt for both): `encoder(prompts, negative_prompt="") -> TextCond` with pooled embeddings (float32, on
    the encoders' device).

    text_encoder (CLIPTextModel, CLIP-L) and text_encoder_2 (CLIPTextModelWithProjection, OpenCLIP-G), each tokenised
    to model_max_length (the same for both), give their penultimate hidden states, concatenated along features:
    embeds [L, D_1 + D_2] (77 x 2048); the pooled embedding is text_encoder_2's projection, text_embeds [P] (1280).
    The null condition: with the pipeline's `force_zeros_for_empty_prompt` (model_index.json; true by default, as in
    SDXL base) the empty negative prompt is zeros, embeds and pooled, as the pipeline's negative_prompt=None with
    guidance; any other negative prompt (or the empty one without that setting) is encoded."""

    def __init__(self, clips: list[tuple], force_zeros: bool = True) -> None:
        self.clips = [(tok, enc.eval().requires_grad_(False)) for tok, enc in clips]
        self.force_zeros = bool(force_zeros)
        self.nulls = {}

    @classmethod
    def from_pipeline(cls, folder: Path, index: dict, force_zeros: bool = True) -> SDXLPromptEncoder:
        """The text encoders and tokenizers of an SDXL pipeline folder whose model_index.json is `index`."""
        clips = [(load_component(folder, f"tokenizer{n}", TOKENIZERS, index[f"tokenizer{n}"][1]),
                  load_component(folder, f"text_encoder{n}", allowed, index[f"text_encoder{n}"][1]))
                 for n, allowed in zip(("", "_2"), SDXL_CLIPS)]
        return cls(clips, force_zeros)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts [N] -> (embeds [N, L, D_1 + D_2], pooled [N, P])."""
        states, firsts = clip_outputs(self.clips, prompts)
        return torch.cat(states, -1).float(), firsts[1].float()

    def null_embedding(self, negative_prompt: str) -> tuple[Tensor, Tensor]:
        null, pooled = super().null_embedding(negative_prompt)
        if negative_prompt == "" and self.force_zeros:
            return torch.zeros_like(null), torch.zeros_like(pooled)
        return null, pooled


class SD3PromptEncoder(PromptEncoder):
    """Stable Diffusion 3's three text encoders (StableDiffusion3Pipeline.encode_prompt with clip_skip None, the same
    prompt for all three): `encoder(prompts, negative_prompt="", max_sequence_length=256) -> TextCond` with pooled
    embeddings (float32, on the encoders' device).

    CLIP-L and CLIP-G (CLIPTextModelWithProjection; both tokenised to the first tokenizer's model_max_length, as the
    pipeline does) give their penultimate hidden states, concatenated along features and zero-padded to T5's width
    D, and their projections, concatenated into the pooled embedding [P]; T5's last hidden state (its tokenizer padded
    and truncated to max_sequence_length, at most 512) follows the CLIP tokens: embeds [77 + max_sequence_length, D].
    A pipeline saved without T5 (text_encoder_3 None) has zeros in its place, D = the transformer's
    joint_attention_dim."""

    def __init__(self, clips: list[tuple], t5: tuple | None, joint_dim: int) -> None:
        self.clips = [(tok, enc.eval().requires_grad_(False)) for tok, enc in clips]
        self.t5 = None if t5 is None else (t5[0], t5[1].eval().requires_grad_(False))
        self.joint_dim = int(joint_dim)
        self.nulls = {}

    @classmethod
    def from_pipeline(cls, folder: Path, index: dict, joint_dim: int = 4096) -> SD3PromptEncoder:
        """The text encoders and tokenizers of an SD3 pipeline folder whose model_index.json is `index`."""
        clips = [(load_component(folder, f"tokenizer{n}", TOKENIZERS, index[f"tokenizer{n}"][1]),
                  load_component(folder, f"text_encoder{n}", SD3_CLIPS, index[f"text_encoder{n}"][1]))
                 for n in ("", "_2")]
        t5 = None
        if (index.get("text_encoder_3") or [None, None])[1] is not None:
            t5 = (load_component(folder, "tokenizer_3", T5_TOKENIZERS, index["tokenizer_3"][1]),
                  load_component(folder, "text_encoder_3", T5_ENCODERS, index["text_encoder_3"][1]))
        return cls(clips, t5, joint_dim)

    def options(self, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> tuple[int]:
        """max_sequence_length: T5's token count (1 to 512, the pipeline's bound; default 256, the pipeline's)."""
        n = max_sequence_length
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 512:
            raise UserError(f"max_sequence_length must be a whole number from 1 to 512, got {n!r}")
        return (n,)

    @torch.no_grad()
    def embed(self, prompts: list[str], max_sequence_length: int) -> tuple[Tensor, Tensor]:
        """Prompts [N] -> (embeds [N, 77 + max_sequence_length, D], pooled [N, P])."""
        states, pooled = clip_outputs(self.clips, prompts)     # pooled: the projections of the end-of-text token
        t5 = self.embed_t5(prompts, max_sequence_length)
        clip = torch.cat(states, -1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip.float(), t5.float()], -2), torch.cat(pooled, -1).float()

    def embed_t5(self, prompts: list[str], length: int) -> Tensor:
        """T5's last hidden state [N, length, D] (zeros [N, length, joint_dim] without a T5)."""
        if self.t5 is None:
            return torch.zeros(len(prompts), length, self.joint_dim, device=device_of(self.clips[0][1]))
        tokenizer, encoder = self.t5
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                        return_tensors="pt").input_ids
        return encoder(ids.to(device_of(encoder)))[0]


def load_prompt_encoder(folder: Path, index: dict, latent: dict) -> PromptEncoder:
    """The prompt encoder of the pipeline folder (model_index.json read as `index`) that a latent card's record
    `latent` describes: SD3's three text encoders (an SD3Transformer2DModel), SDXL's two (a UNet that takes pooled
    embeddings), else SD 1.x / 2.x's one."""
    text = latent["text"]
    if latent.get("denoiser") == "SD3Transformer2DModel":
        return SD3PromptEncoder.from_pipeline(folder, index, joint_dim=int(text["embeds"][1]))
    if text.get("pooled"):
        return SDXLPromptEncoder.from_pipeline(folder, index, text.get("force_zeros_for_empty_prompt", True))
    return PromptEncoder.from_pipeline(folder, index)
