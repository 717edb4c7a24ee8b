"""Typed run configuration: dataclasses whose fields carry their defaults and descriptions (`opt`), YAML presets
and ``key=value`` overrides.

Keys are dotted (``train.lr=2e-4``); a leaf name that is unique across sections works alone (``lr=2e-4``).
Unknown keys (with the closest valid ones) and values of the wrong type are UserErrors. Each section dataclass checks
its own ranges in `validate()` (the one place for them); `load_config` and the training runs call it.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # presets ship inside the package


def opt(default, doc: str):
    """A config field: its default and its description (`ctmkit config` prints the description beside the key)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def section(factory, doc: str):
    """A nested config section (model, train, ctm): its default factory and its description."""
    return field(default_factory=factory, metadata={"doc": doc})


ARCHS = ("auto", "mlp", "unet", "songunet", "dhariwalunet")


@dataclass
class ModelConfig:
    arch: str = opt("auto", "\"mlp\" (vectors), \"unet\" (images), \"songunet\" / \"dhariwalunet\" (EDM's DDPM++ and "
                    "ADM U-Nets, images) or \"auto\": mlp for vectors, unet for images")
    sigma_data: float = opt(0.5, "EDM sigma_data (data are normalised so that their std is about 0.5)")
    hidden: int = opt(256, "mlp: width")
    depth: int = opt(4, "mlp: residual blocks")
    emb_dim: int = opt(128, "mlp: time-embedding width")
    channels: int = opt(64, "unet: base channels")
    channel_mult: list[int] = opt([1, 2, 2], "unet: channel multiplier per level")
    num_res_blocks: int = opt(2, "unet: residual blocks per level")
    attn_resolutions: list[int] = opt([16], "unet: self-attention at these resolutions")
    dropout: float = opt(0.0, "dropout in residual blocks")
    conditional: bool = opt(True, "use class labels when the data has them")
    fourier_scale: float = opt(1.0, "std of the Fourier frequencies of the c_noise(t), c_noise(s) embeddings")

    def validate(self) -> None:
        _check([
            (self.arch in ARCHS, f"model.arch must be one of {', '.join(ARCHS)}, got '{self.arch}'"),
            (self.sigma_data > 0, "model.sigma_data must be > 0"),
            (self.hidden >= 1 and self.depth >= 1, "model.hidden and model.depth must be >= 1"),
            (self.emb_dim >= 1 and self.channels >= 1, "model.emb_dim and model.channels must be >= 1"),
            (len(self.channel_mult) >= 1 and all(v >= 1 for v in self.channel_mult),
             "model.channel_mult must be a non-empty list of integers >= 1, e.g. [1, 2, 2]"),
            (self.num_res_blocks >= 1, "model.num_res_blocks must be >= 1"),
            (all(v >= 1 for v in self.attn_resolutions), "model.attn_resolutions must be a list of resolutions >= 1"),
            (0 <= self.dropout < 1, "model.dropout must be in [0, 1)"),
            (self.fourier_scale > 0, "model.fourier_scale must be > 0")])


@dataclass
class TrainConfig:
    steps: int = opt(4000, "optimiser steps")
    batch_size: int = opt(256, "global batch size (over all processes)")
    micro_batches: int = opt(1, "gradient accumulation: the batch is split into this many micro-batches")
    lr: float = opt(1e-3, "learning rate")
    optimizer: str = opt("radam", "\"adam\" or \"radam\"")
    warmup: int = opt(0, "linear learning-rate warm-up steps")
    lr_schedule: str = opt("constant", "after the warm-up: \"constant\", \"cosine\" (to lr_final x lr at the last "
                           "step) or \"inv_sqrt\" (lr / sqrt(max(step / lr_ref_steps, 1)), EDM2's); it scales every "
                           "learning rate of the run (ctm.gan_lr and ctm.disc_lr too)")
    lr_final: float = opt(0.0, "lr_schedule=cosine: the last step's learning rate as a fraction of lr")
    lr_ref_steps: int = opt(1000, "lr_schedule=inv_sqrt: the step where the decay starts")
    grad_clip: float = opt(0.0, "max gradient norm (0 = off)")
    ema: list[float] = opt([0.999], "evaluation EMA rates; the first is what a teacher samples, and a CTM with "
                           "ctm.sample_sigma_rel=0 (else a post-hoc EMA; `ctmkit ema RUN --sigma-rel X` changes it)")
    phema: list[float] = opt([0.05, 0.10], "post-hoc EMA: the widths sigma_rel of the power-function profiles whose "
                             "snapshots are kept in RUN/phema for `ctmkit ema` ([] = none)")
    phema_every: int = opt(0, "post-hoc EMA snapshot period in steps; 0 = train.steps / 16")
    seed: int = opt(0, "seed of every random draw (data, noise, init)")
    ckpt_every: int = opt(1000, "checkpoint period in steps (and at the end)")
    log_every: int = opt(50, "stats.jsonl period in steps")
    precision: str = opt("fp32", "\"fp32\", \"bf16\" (autocast) or \"fp16\" (autocast + grad scaler; for GPUs)")
    max_bad_steps: int = opt(20, "stop after this many non-finite losses in a row")
    device: str = opt("auto", "\"auto\" (cuda when available, else cpu), \"cpu\", \"cuda\", \"cuda:N\" or \"mps\" "
                      "(under torchrun: cuda:LOCAL_RANK)")
    compile: bool = opt(False, "torch.compile the backbone (state dicts unchanged)")
    workers: int = opt(0, "DataLoader processes reading and decoding the next batches ahead (0: in the training "
                       "process); the items of a step never depend on it")
    grad_checkpointing: bool = opt(False, "a diffusers student (ctmkit distill with a diffusers:DIR teacher): "
                                   "recompute activations in the backward pass (diffusers' enable_gradient_"
                                   "checkpointing), less memory for more time; other networks refuse it")

    def validate(self) -> None:
        _check([
            (self.steps >= 1, "train.steps must be >= 1"), (self.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.micro_batches >= 1 and self.batch_size % self.micro_batches == 0,
             "train.micro_batches must be >= 1 and divide train.batch_size"),
            (self.lr > 0 and math.isfinite(self.lr), "train.lr must be a positive number"),
            (self.optimizer in ("adam", "radam"), f"train.optimizer must be 'adam' or 'radam', got '{self.optimizer}'"),
            (self.ckpt_every >= 1, "train.ckpt_every must be >= 1"),
            (self.log_every >= 1, "train.log_every must be >= 1"),
            (all(0 < r < 1 for r in self.ema) and len(self.ema) >= 1, "train.ema must be a list of rates in (0, 1)"),
            (all(0 < s < 0.3 for s in self.phema) and len(set(self.phema)) == len(self.phema),
             "train.phema must be a list of distinct widths sigma_rel in (0, 0.3), e.g. [0.05, 0.1]"),
            (self.phema_every >= 0, "train.phema_every must be >= 0 (0 = train.steps / 16)"),
            (self.precision in ("fp32", "bf16", "fp16"), "train.precision must be fp32, bf16 or fp16"),
            (self.warmup >= 0 and self.grad_clip >= 0, "train.warmup and train.grad_clip must be >= 0"),
            (self.lr_schedule in ("constant", "cosine", "inv_sqrt"),
             f"train.lr_schedule must be constant, cosine or inv_sqrt, got '{self.lr_schedule}'"),
            (0 <= self.lr_final <= 1 and self.lr_ref_steps >= 1,
             "train.lr_final must be in [0, 1] and train.lr_ref_steps >= 1"),
            (self.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
            (0 <= self.workers <= 256, "train.workers must be in 0..256"),
            (0 <= self.seed < 2 ** 62, "train.seed must be in [0, 2^62)"),
            (self.device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", self.device) is not None,
             f"train.device must be auto, cpu, cuda, cuda:N or mps, got '{self.device}'")])


@dataclass
class TeacherConfig:
    data: str = opt("ring", "data SPEC (see `ctmkit train-teacher --help`); --data sets it")
    n_data: int = opt(0, "cap on items (finite data) / pool size (generated data); 0 = the data's default size")
    xflip: bool = opt(False, "images: flip each training image left-right with probability 1/2 (the reference's "
                      "CIFAR-10 and ImageNet-64 training; EDM's --xflip)")
    model: ModelConfig = section(ModelConfig, "the network")
    train: TrainConfig = section(TrainConfig, "the optimisation")
    label_dropout: float = opt(0.0, "classifier-free guidance: the probability that a training label is replaced by "
                               "the null label -1 (EDM's label_dropout; 0.1 is usual). > 0 gives the teacher an "
                               "unconditional branch, which `--guidance` and ctm.guidance need; labelled data only")
    p_mean: float = opt(-1.2, "EDM log-normal sigma sampling mean")
    p_std: float = opt(1.2, "EDM log-normal sigma sampling std")
    sigma_min: float = opt(0.002, "smallest noise level (EDM's)")
    sigma_max: float = opt(80.0, "largest noise level (EDM's)")

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        _check([(self.n_data >= 0, "n_data must be >= 0 (0 = the data's default size)"),
                (0 < self.sigma_min < self.sigma_max, "need 0 < sigma_min < sigma_max"),
                (self.p_std > 0, "p_std must be > 0"),
                (0 <= self.label_dropout < 1, "label_dropout must be in [0, 1)")])


PAIR_DRAWS = ("reference", "uniform", "all_the_way", "mixed")
TEACHER_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class CTMConfig:
    num_scales: int = opt(18, "N: points of the Karras discretisation grid")
    max_k: int = opt(17, "M: largest teacher step count k (P(k) proportional to k)")
    pairs: str = opt("reference", "(t, u, s) draw: \"reference\" (one k ~ P(k) for the batch, n uniform, m uniform "
                     "above n + k), \"uniform\" ((n, m) uniform over all pairs, k ~ U{1..min(m-n, M)} per sample), "
                     "\"all_the_way\" (uniform pairs, u = s: the teacher solves to s), \"mixed\" (a share "
                     "pairs_mixed_frac of each batch all_the_way, the rest reference)")
    pairs_mixed_frac: float = opt(0.5, "pairs=mixed: the share of all_the_way pairs in each batch")
    target_ema: float = opt(0.999, "mu: rate of the target network theta^-")
    student_dropout: float = opt(-1.0, "dropout of the student's backbone; -1 (any value < 0) = unchanged: the "
                                 "teacher's when the student starts as the teacher, else model.dropout")
    target_dropout: bool = opt(False, "evaluate theta^- with dropout active (reference: true, its target runs in "
                               "training mode); false = theta^- deterministic. No effect when model.dropout = 0")
    distance: str = opt("huber", "\"huber\" (pseudo-Huber), \"l2\", \"lpips\" (images: the paper's LPIPS, VGG16 with "
                        "average pooling; needs ctm.lpips_vgg) or \"feature\" (images: Inception-v3 features, an "
                        "LPIPS stand-in without weight files; needs the fid extra)")
    huber_c: float = opt(0.0, "pseudo-Huber c; 0 = automatic: 0.00054 * sqrt(dim) (Song & Dhariwal 2023)")
    feature_size: int = opt(139, "distance=feature: images are resized to this side (>= 75) before Inception")
    lpips_vgg: str = opt("", "distance=lpips: torchvision's VGG16 ImageNet weights (vgg16-397923af.pth), a file you "
                         "bring (ctmkit downloads nothing)")
    lpips_size: int = opt(224, "distance=lpips: images with a side below 256 are resized to this side (ref: 224)")
    dsm: bool = opt(True, "add the DSM loss on g(x, t, t)")
    dsm_weight: float = opt(-1.0, "lambda_DSM: -1 (any value < 0) = adaptive (from last-layer gradient norms), "
                            "else this fixed weight")
    dsm_weight_max: float = opt(1e4, "adaptive lambda_DSM is clamped to [0, dsm_weight_max]")
    dsm_karras_frac: float = opt(0.5, "share of DSM sigmas drawn on the Karras curve (rest log-normal)")
    gan: bool = opt(True, "add the GAN loss (stage 2)")
    gan_start: int = opt(0, "step at which the GAN term starts (the paper's stage 2)")
    gan_lr: float = opt(0.0, "from gan_start on: the student's learning rate; 0 = unchanged, train.lr "
                        "(reference ImageNet-64: 8e-6)")
    gan_batch_size: int = opt(0, "from gan_start on: the global batch size; 0 = unchanged, train.batch_size")
    gan_max_k: int = opt(0, "from gan_start on: M, the largest teacher step count; 0 = unchanged, ctm.max_k "
                         "(reference ImageNet-64: 20)")
    gan_weight: float = opt(-1.0, "lambda_GAN: -1 (any value < 0) = adaptive, else this fixed weight")
    gan_weight_min: float = opt(0.01, "adaptive lambda_GAN is clamped to [gan_weight_min, gan_weight_max]")
    gan_weight_max: float = opt(10.0, "upper clamp of the adaptive lambda_GAN")
    disc_lr: float = opt(2e-3, "discriminator RAdam learning rate (betas 0.5, 0.9)")
    disc_hidden: int = opt(256, "discriminator width (mlp) / channels (conv)")
    discriminator: str = opt("small", "\"small\" (MLP / strided convs, trained from scratch) or \"projected\" "
                             "(images: the paper's, trainable heads on random projections of frozen DeiT and "
                             "EfficientNet-Lite features; needs timm, ctm.disc_deit and ctm.disc_effnet)")
    disc_deit: str = opt("", "discriminator=projected: deit_base_distilled_patch16_224 ImageNet weights, a file "
                         "you bring")
    disc_effnet: str = opt("", "discriminator=projected: tf_efficientnet_lite0 ImageNet weights, a file you bring")
    augment: bool = opt(True, "DiffAugment on discriminator inputs (images only)")
    cutout_ratio: float = opt(0.5, "DiffAugment cutout square, as a fraction of the image size (reference: 0.2)")
    g_every: int = opt(1, "with the GAN on: generator steps when step % g_every == 0, discriminator steps "
                       "otherwise (reference: 2, alternating); 1 = both every step")
    guidance: list[float] = opt([1.0], "classifier-free guidance scale(s) distilled (docs/method.md section 8): [1] "
                                "= none; [w] = the CTM of the guided teacher D_w (e.g. 2); [lo, hi] = w drawn per "
                                "sample from the range and fed to the student (one student for every scale). Needs a "
                                "teacher with a null branch")
    label_dropout: float = opt(-1.0, "unguided distillation (guidance [1]): the probability that a label is the null "
                               "label -1, so the student keeps a null branch for sampling-time `--guidance`; -1 = the "
                               "teacher's (its label_dropout; the exact labelled mixture: 0.1)")
    gan_guided: bool = opt(False, "with guidance != [1], keep the GAN term (its real side is unguided data, which "
                           "pulls the student back towards w = 1); false: guided distillation runs without GAN")
    teacher_free: bool = opt(False, "self-learn variant: x_u from the target network, no teacher")
    init_from_teacher: bool = opt(True, "copy the teacher's architecture and weights into the student")
    student_precond: str = opt("auto", "the student's preconditioning: \"teacher\" (its form: the student starts as "
                               "the teacher), \"edm\" (EDM's, weights still copied: the reference's CIFAR-10 student "
                               "of EDM's VP teacher) or \"auto\": edm for pixel teachers that predict the noise "
                               "(diffusers epsilon, EDM VP / VE / iDDPM pickles), else (latent teachers included) "
                               "the teacher's form")
    lora_rank: int = opt(0, "latent text-to-image teachers: 0 = train the whole student; R > 0 = train rank-R LoRA "
                         "adapters (peft) on the UNet's to_q, to_k, to_v, to_out.0, proj_in, proj_out and ff layers "
                         "plus the s embedding; the teacher is the same module with the adapters off, and the target "
                         "network, EMAs and checkpoints hold only the trained tensors")
    teacher_dtype: str = opt("auto", "the frozen teacher's weights: \"float32\", \"bfloat16\" or \"auto\" (bfloat16 "
                             "on a CUDA device that supports it, else float32); latent teachers only. Trained "
                             "weights stay float32 (a LoRA student's frozen base shares the teacher's dtype)")
    sample_sigma_rel: float = opt(0.05, "the weights a finished distillation samples: the post-hoc EMA of this width "
                                  "sigma_rel, rebuilt from RUN/phema at the last step (as `ctmkit ema RUN "
                                  "--sigma-rel X`; bench/RESULTS.md, \"Converging\"); 0 = the training EMA "
                                  "(train.ema's first rate). `ctmkit ema RUN --reset` or --sigma-rel change it later")
    gan_latent: bool = opt(False, "latent students run without the GAN term (no discriminator is defined on VAE "
                           "latents; docs/method.md section 9) unless true: then the small conv discriminator on "
                           "latents")

    def validate(self) -> None:
        _check([
            (self.num_scales >= 2, "ctm.num_scales must be >= 2"),
            (1 <= self.max_k <= self.num_scales - 1, "ctm.max_k must be in [1, ctm.num_scales - 1]"),
            (self.student_precond in ("auto", "teacher", "edm"),
             "ctm.student_precond must be 'auto', 'teacher' or 'edm'"),
            (self.pairs in PAIR_DRAWS, f"ctm.pairs must be one of {', '.join(PAIR_DRAWS)}, got '{self.pairs}'"),
            (0 <= self.pairs_mixed_frac <= 1, "ctm.pairs_mixed_frac must be in [0, 1]"),
            (self.sample_sigma_rel == 0 or 0 < self.sample_sigma_rel < 0.3,
             "ctm.sample_sigma_rel must be 0 (the training EMA) or a width in (0, 0.3), e.g. 0.05"),
            (0 < self.target_ema < 1, "ctm.target_ema must be in (0, 1)"),
            (self.distance in ("huber", "l2", "feature", "lpips"),
             "ctm.distance must be 'huber', 'l2', 'lpips' or 'feature'"),
            (self.lpips_size >= 16, "ctm.lpips_size must be >= 16 (VGG16 halves it four times)"),
            (self.discriminator in ("small", "projected"), "ctm.discriminator must be 'small' or 'projected'"),
            (self.student_dropout < 1, "ctm.student_dropout must be < 1 (< 0 = unchanged)"),
            (self.feature_size >= 75, "ctm.feature_size must be >= 75 (Inception-v3's smallest input)"),
            (self.gan_lr >= 0 and math.isfinite(self.gan_lr), "ctm.gan_lr must be >= 0 (0 = train.lr)"),
            (self.gan_batch_size >= 0, "ctm.gan_batch_size must be >= 0 (0 = train.batch_size)"),
            (0 <= self.gan_max_k <= self.num_scales - 1,
             "ctm.gan_max_k must be in [0, ctm.num_scales - 1] (0 = ctm.max_k)"),
            (self.huber_c >= 0, "ctm.huber_c must be >= 0 (0 = automatic)"),
            (self.disc_lr > 0 and self.gan_start >= 0, "ctm.disc_lr must be > 0 and ctm.gan_start >= 0"),
            (self.disc_hidden >= 4, "ctm.disc_hidden must be >= 4"),
            (0 < self.cutout_ratio < 1, "ctm.cutout_ratio must be in (0, 1)"),
            (self.g_every >= 1, "ctm.g_every must be >= 1"),
            (0 <= self.dsm_karras_frac <= 1, "ctm.dsm_karras_frac must be in [0, 1]"),
            (self.dsm_weight_max > 0, "ctm.dsm_weight_max must be > 0"),
            (0 < self.gan_weight_min <= self.gan_weight_max,
             "need 0 < ctm.gan_weight_min <= ctm.gan_weight_max"),
            (len(self.guidance) in (1, 2) and min(self.guidance) >= 0
             and (len(self.guidance) == 1 or self.guidance[0] < self.guidance[1]),
             f"ctm.guidance must be [w] or [lo, hi] with 0 <= lo < hi (w >= 0), got {self.guidance}"),
            (self.label_dropout < 1, "ctm.label_dropout must be < 1 (-1 = the teacher's)"),
            (0 <= self.lora_rank <= 4096, "ctm.lora_rank must be in 0..4096 (0 = train the whole student)"),
            (self.teacher_dtype in TEACHER_DTYPES,
             f"ctm.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got '{self.teacher_dtype}'")])

    @property
    def guided(self) -> bool:
        """Distilling the guided teacher (ctm.guidance is not [1])."""
        return self.guidance != [1.0]


@dataclass
class DistillConfig:
    data: str = opt("ring", "data SPEC (see `ctmkit distill --help`); --data sets it")
    n_data: int = opt(0, "cap on items (finite data) / pool size (generated data); 0 = the data's default size")
    xflip: bool = opt(False, "images: random left-right flips of training images (as the teacher's)")
    teacher: str = opt("exact", "teacher SPEC: a run folder, \"exact\" (data with a known density), "
                       "\"diffusers:DIR\", \"edm:FILE.pkl\" or \"py:MODULE:ATTR\" (see `ctmkit distill --help`); "
                       "--teacher sets it")
    model: ModelConfig = section(ModelConfig, "the student's network when it does not start as the teacher "
                                 "(ctm.init_from_teacher=false, an exact or py: teacher); else the teacher's")
    train: TrainConfig = section(lambda: TrainConfig(lr=4e-4), "the optimisation")
    ctm: CTMConfig = section(CTMConfig, "the CTM losses, pair draws and GAN stage")
    sigma_min: float = opt(0.002, "smallest noise level; EDM's 0.002 = take the teacher's when it reports another")
    sigma_max: float = opt(80.0, "largest noise level; EDM's 80 = take the teacher's when it reports another "
                           "(a diffusers DDPM: about 157)")

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.ctm.validate()
        _check([(self.n_data >= 0, "n_data must be >= 0 (0 = the data's default size)"),
                (0 < self.sigma_min < self.sigma_max, "need 0 < sigma_min < sigma_max"),
                (bool(str(self.teacher).strip()),
                 "teacher must be a SPEC: a teacher run folder, 'exact', diffusers:DIR or py:MODULE:ATTR")])


def _check(checks: list[tuple[bool, str]]) -> None:
    """Raise a UserError with the message of the first failed check."""
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


SECTION = {TeacherConfig: "teacher", DistillConfig: "distill"}


def _sections(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls) -> list[str]:
    """All dotted keys of a config class."""
    keys = []
    for name, tp in _sections(cls).items():
        keys += [f"{name}.{k}" for k in valid_keys(tp)] if dataclasses.is_dataclass(tp) else [name]
    return keys


def _type_name(tp) -> str:
    item = typing.get_args(tp)
    return f"a list of {item[0].__name__}" if item else getattr(tp, "__name__", str(tp))


_INT64 = 2 ** 63


def _coerce(key: str, value, tp):
    """Check/convert one value to the field type, or raise a UserError naming the key."""
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            if not isinstance(value, (int, float, str)):
                raise TypeError
            out = int(value)
            if not -_INT64 <= out < _INT64:
                raise UserError(f"config key '{key}' is out of range: {value!r}")
            return out
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            out = float(value)
            if not math.isfinite(out):
                raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
            return out
        if tp is str:
            if isinstance(value, datetime.date):  # YAML reads 2024-01-01 as a date
                return value.isoformat()
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if typing.get_origin(tp) is list or tp is list:
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            (item_tp,) = typing.get_args(tp) or (None,)
            return items if item_tp is None else [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(items)]
    except UserError:
        if typing.get_origin(tp) is list:
            raise UserError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}") from None
        raise
    except (TypeError, ValueError, OverflowError):
        pass
    raise UserError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")


def from_dict(cls, d: dict, prefix: str = "", root=None):
    """Build a config dataclass from a (nested) dict, rejecting unknown keys (`root`: the top config class, whose
    keys an unknown one is compared with)."""
    if not isinstance(d, dict):
        raise UserError(f"config section '{prefix or 'root'}' must be a mapping, got {type(d).__name__}")
    root = root or cls
    prefix = f"{prefix}." if prefix else ""
    fields = _sections(cls)
    kwargs = {}
    for k, v in d.items():
        if k not in fields:
            raise unknown_key(root, f"{prefix}{k}")
        tp = fields[k]
        kwargs[k] = from_dict(tp, {} if v is None else v, f"{prefix}{k}", root) if dataclasses.is_dataclass(
            tp) else _coerce(prefix + k, v, tp)
    return cls(**kwargs)


def unknown_key(cls, key: str) -> UserError:
    """The error for a key that `cls` does not have: the closest valid keys first (by leaf name, the typed section
    first on a tie), then where to find them all."""
    section, _, leaf = str(key).rpartition(".")

    def score(k: str) -> tuple[float, bool]:
        k_section, _, k_leaf = k.rpartition(".")
        return difflib.SequenceMatcher(None, leaf, k_leaf).ratio(), k_section == section
    scored = sorted(((score(k), k) for k in valid_keys(cls)), key=lambda sk: sk[0], reverse=True)
    close = [k for (ratio, _), k in scored if ratio >= 0.75][:3]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    where = (f"`ctmkit config {SECTION[cls]}` lists every key" if cls in SECTION
             else f"valid keys: {', '.join(valid_keys(cls))}")
    return UserError(f"unknown config key '{key}'{hint} ({where})")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def descriptions(cls) -> dict[str, str]:
    """Dotted key -> its description (the `doc` of each field, sections included: 'model', 'model.arch', ...)."""
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.metadata.get("doc", "")
        tp = _sections(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in descriptions(tp).items()})
    return out


PLACEHOLDERS = ("-1.0, 0 and auto are placeholders for values worked out when training starts (from the teacher, the "
                "data or the losses): the comment beside each key says what it stands for.")


def to_yaml(cfg, header: str = "", column: int = 34, width: int = 118) -> str:
    """The config as YAML with each key's description as a comment beside it (what `ctmkit config` prints); it
    reads back as the same config (`--config FILE`)."""
    lines = [f"# {ln}" for text in header.splitlines() for ln in _wrap(text, width - 2)]
    _yaml_lines(cfg, "", lines, column, width)
    return "\n".join(lines) + "\n"


def _yaml_lines(cfg, indent: str, lines: list[str], column: int, width: int) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            text = f"{indent}{f.name}:"
        elif isinstance(value, list):   # in flow style: [1, 2, 2]
            text = f"{indent}{f.name}: {yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()}"
        else:
            text = indent + yaml.safe_dump({f.name: value}, default_flow_style=False, width=math.inf).rstrip("\n")
        at = max(column, len(text) + 1)
        doc = _wrap(f.metadata.get("doc", ""), width - at - 2)
        lines += [f"{text:<{at}}# {doc[0]}" if doc else text] + [f"{'':<{at}}# {d}" for d in doc[1:]]
        if dataclasses.is_dataclass(value):
            _yaml_lines(value, indent + "  ", lines, column, width)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, max(width, 30), break_long_words=False, break_on_hyphens=False)


def _set(d: dict, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    for p in path:
        if not isinstance(d.get(p), dict):  # a section left empty (None) in a config file
            d[p] = {}
        d = d[p]
    d[leaf] = value


def resolve_key(cls, key: str) -> str:
    """A dotted key or a unique leaf name -> the dotted key; UserError listing the valid keys otherwise."""
    keys = valid_keys(cls)
    if key in keys:
        return key
    matches = [k for k in keys if k.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"config key '{key}' is ambiguous; use one of {', '.join(matches)}")
    raise unknown_key(cls, key)


def load_config(cls, preset: str | None = None, config_file: str | None = None, overrides: list[str] = (),
                **flags):
    """Resolve a config: defaults <- preset YAML <- --config FILE <- key=value overrides <- explicit flags."""
    d = to_dict(cls())
    if preset:  # a preset holds one section per command: `teacher:` and `distill:`
        _merge(d, _read_yaml(preset_path(preset)).get(SECTION[cls], {}) or {})
    if config_file:  # a plain config of this command, e.g. a run's config.yaml
        _merge(d, _read_yaml(Path(config_file)))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = resolve_key(cls, key.strip())
        try:
            value = yaml.safe_load(raw) if raw else ""
        except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: e.g. a date like 2024-13-01
            value = raw
        if _field_type(cls, key) is str and not isinstance(value, str):
            value = raw  # text as typed (a folder named 0.10 stays '0.10')
        _set(d, key, value)
    from_dict(cls, d)  # type-check the overrides before flags can replace them
    for key, value in flags.items():
        if value is not None:
            _set(d, resolve_key(cls, key), value)
    cfg = from_dict(cls, d)
    cfg.validate()
    return cfg


def _field_type(cls, dotted: str):
    tp = cls
    for part in dotted.split("."):
        tp = _sections(tp)[part]
    return tp


def _merge(d: dict, new: dict, prefix: str = "") -> None:
    for k, v in new.items():
        if isinstance(d.get(k), dict) and v is None:
            continue  # an empty section (`model:`) changes nothing
        if isinstance(d.get(k), dict) and not isinstance(v, dict):
            raise UserError(f"config section '{prefix}{k}' must be a mapping, got {type(v).__name__}")
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _merge(d[k], v, f"{prefix}{k}.")
        else:
            d[k] = v


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"unknown preset '{name}'; available: {', '.join(preset_names())}")
    return path


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"config file '{path}' does not exist")
    if not path.is_file():
        raise UserError(f"config file '{path}' is not a file")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"cannot read config file '{path}': {e.strerror or e}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8, dates like 2024-13-01
        raise UserError(f"config file '{path}' is not valid YAML{_yaml_problem(e)}") from None
    if not isinstance(d, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys to values")
    return d


def _yaml_problem(e: Exception) -> str:
    """': what' of a YAML error, with ' at line L, column C' where the parser stopped (1-based, as editors count)
    and what it was parsing ('while parsing a flow sequence started at line 2, column 7')."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return f": {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    since = f" started at line {cmark.line + 1}, column {cmark.column + 1}" if cmark is not None else ""
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context}{since})" if context
                                                                                else "")
