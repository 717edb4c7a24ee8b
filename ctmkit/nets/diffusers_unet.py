"""A diffusers `UNet2DModel` as a ctmkit backbone F(x_in, noise_t, noise_s, labels), with the CTM's second time input.

The UNet runs unchanged on (x_in, timestep noise_t, class_labels); s enters through an extra embedding (diffusers'
own sinusoidal `Timesteps` + `TimestepEmbedding`, sized like the UNet's time embedding) whose last layer starts at
zero and whose output is added to the UNet's time embedding (a forward hook on `unet.time_embedding`), so a student
copied from a teacher starts as that teacher. Parameter names are the UNet's own under `unet.` (a teacher's
weights load as they are) plus `s_embed.`. A UNet with 2C output channels (learned variance) gives its first C.

Labels are class indices. A class-conditional UNet (num_class_embeds) has no null input of its own: classifier-free
guidance needs the class index its training used for the dropped label, named by the user (`null_class`, from the
teacher SPEC `diffusers:DIR?null_class=K`; stored in the backbone's spec so students keep it). The null label -1
(ctmkit.core.guidance) then becomes that class; without one, -1 is refused with a ValueError naming the setting.
A null class that is the last embedding (the usual layout: num_class_embeds = classes + 1) is not a class of the
data: such a network is conditioned on num_class_embeds - 1 classes (`label_count`).

diffusers is an optional extra (`pip install ctmkit[diffusers]`); it is imported only when such a network is built.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..errors import UserError

INSTALL_HINT = "diffusers teachers need the optional extra: pip install 'ctmkit[diffusers]' (or pip install diffusers)"


def import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return diffusers


class SEmbedded(nn.Module):
    """A diffusers denoiser (a UNet: `self.unet`, with `time_proj` and `time_embedding`; or a transformer, see
    nets/diffusers_sd3.py) plus the CTM's s input: a zero-initialised `s_embed` whose output a forward hook adds to
    the network's time embedding while `s_input(noise_s)` is open. `denoiser`: the wrapped diffusers model."""

    MODEL = "unet"             # the attribute that holds the diffusers model

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.MODEL)

    def attach_s_embedding(self, unet: nn.Module, cfg: dict) -> None:
        """A UNet's: its time_proj and time_embedding (and `channels` from the config)."""
        self.unet = unet
        self.channels = int(cfg.get("in_channels", 3))
        self.hook_s_embedding(unet.time_proj, unet.time_embedding)

    def hook_s_embedding(self, time_proj: nn.Module, time_embedding: nn.Module) -> None:
        """s_embed: a sinusoidal projection like `time_proj` (a diffusers Timesteps) and a TimestepEmbedding as wide
        as `time_embedding`'s output, whose last layer starts at zero; hooked onto `time_embedding`."""
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        width = time_proj.num_channels
        self.s_proj = Timesteps(width, time_proj.flip_sin_to_cos, time_proj.downscale_freq_shift)
        self.s_embed = TimestepEmbedding(width, time_embedding.linear_2.out_features)
        nn.init.zeros_(self.s_embed.linear_2.weight)
        nn.init.zeros_(self.s_embed.linear_2.bias)
        self._s_emb: Tensor | None = None
        time_embedding.register_forward_hook(self._add_s)

    def _add_s(self, module, inputs, output: Tensor) -> Tensor:
        return output if self._s_emb is None else output + self._s_emb.to(output.dtype)

    @contextlib.contextmanager
    def s_input(self, noise_s: Tensor | None, dtype: torch.dtype):
        """Within: the UNet's time embedding gets s_embed(noise_s) added (nothing for None)."""
        self._s_emb = None if noise_s is None else self.s_embed(self.s_proj(noise_s.float()).to(dtype))
        try:
            yield
        finally:
            self._s_emb = None

    def last_layer(self) -> nn.Parameter:
        return self.unet.conv_out.weight


class DiffusersUNet(SEmbedded):
    """forward(x_in [B, C, H, W], noise_t [B] (timesteps), noise_s [B] | None, labels [B] | None) -> [B, C, H, W].
    `null_class`: the class index that the null label -1 stands for (a class-conditional UNet trained with it)."""

    def __init__(self, config: dict, null_class: int | None = None) -> None:
        super().__init__()
        diffusers = import_diffusers()
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        if cfg.get("time_embedding_type", "positional") != "positional":
            raise UserError(f"UNet2DModel with time_embedding_type={cfg['time_embedding_type']!r} is not supported "
                            "(only 'positional' takes fractional timesteps)")
        if cfg.get("class_embed_type") not in (None,):
            raise UserError(f"UNet2DModel with class_embed_type={cfg['class_embed_type']!r} is not supported "
                            "(class labels must be integer indices: class_embed_type None with num_class_embeds)")
        self.config = cfg
        self.num_embeds = int(cfg.get("num_class_embeds") or 0)
        self.null_class = check_null_class(null_class, self.num_embeds)
        self.attach_s_embedding(diffusers.UNet2DModel(**cfg), cfg)

    def forward(self, x: Tensor, noise_t: Tensor, noise_s: Tensor | None = None,
                labels: Tensor | None = None) -> Tensor:
        with self.s_input(noise_s, x.dtype):
            out = self.unet(x, noise_t.float(), class_labels=self.class_labels(labels)).sample
        return out[:, :self.channels]

    def class_labels(self, labels: Tensor | None) -> Tensor | None:
        """The UNet's class_labels: the labels, with the null label -1 (any negative) as the null class. An
        unconditional UNet ignores labels; a class-conditional one refuses None, and -1 without a null class."""
        if not self.num_embeds:
            return None
        if labels is None:
            raise ValueError(f"this network is conditioned on {self.num_classes} classes: pass labels [B] (int64; -1 "
                             "is the null label)")
        labels = labels.reshape(-1).long()
        if self.null_class is not None:
            return torch.where(labels < 0, torch.full_like(labels, self.null_class), labels)
        if bool((labels < 0).any()):
            raise ValueError(f"the null label -1 needs the null class of this class-conditional UNet2DModel "
                             f"({self.num_classes} classes), which diffusers does not record: name it in the teacher "
                             "SPEC, diffusers:DIR?null_class=K (the class index its training used for dropped labels)")
        return labels

    @property
    def num_classes(self) -> int:
        return label_count(self.config, self.null_class)


def label_count(config: dict, null_class: int | None) -> int:
    """The classes a UNet2DModel config is conditioned on: num_class_embeds (0: unconditional), less the null class
    when it is the last embedding (an extra one after the data's classes)."""
    n = int(config.get("num_class_embeds") or 0)
    return n - 1 if null_class is not None and null_class == n - 1 else n


def check_null_class(null_class, num_embeds: int) -> int | None:
    """A null class index, checked against the UNet's class embeddings (UserError); None passes."""
    if null_class is None:
        return None
    if isinstance(null_class, bool) or not isinstance(null_class, int) or not 0 <= null_class < num_embeds \
            or num_embeds < 2:
        have = (f"num_class_embeds={num_embeds}, so 0..{num_embeds - 1}" if num_embeds > 1 else
                f"it is not class-conditional (num_class_embeds={num_embeds or None})")
        raise UserError(f"null_class={null_class!r} is not a class index of this UNet2DModel: {have}")
    return null_class


def unet_config_from(model: nn.Module) -> dict:
    """The JSON-serialisable config of a diffusers model (lists for tuples, private keys dropped)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items() if not k.startswith("_")}


def load_unet_weights(net: DiffusersUNet, state: dict[str, torch.Tensor]) -> None:
    """Copy a UNet2DModel state dict into net.unet (strict: every weight must fit)."""
    net.unet.load_state_dict(state, strict=True)
