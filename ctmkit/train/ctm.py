"""CTM distillation (Kim et al. 2024, docs/method.md section 3): L = L_CTM + lambda_DSM L_DSM + lambda_GAN L_GAN.

Per iteration (ctm.pairs=reference): one k ~ P(k) prop. to k; per sample t = t_n, u = t_{n+k}, s = t_m (m >= n+k) on
the Karras grid; ctm.pairs=uniform / all_the_way draw (n, m) uniformly over all pairs and k per sample (u = s for
all_the_way); ctm.pairs=mixed draws a share ctm.pairs_mixed_frac of each batch all the way, the rest as the
reference. x_u from k teacher Heun steps per sample (no grad); both sides of the CTM loss transported to sigma_min by
the target net.
Once the GAN term is active (the paper's stage 2), the generator and discriminator steps alternate every ctm.g_every
iterations (1: both every iteration), and ctm.gan_lr / gan_batch_size / gan_max_k replace the learning rate, batch
and M where set. The target network runs with dropout when ctm.target_dropout (the reference's choice).
The distance (ctm.distance) and the discriminator (ctm.discriminator) are the paper's with `lpips` and `projected`
(frozen ImageNet networks from weight files the user names), else pseudo-Huber / L2 and a small one from scratch.

Multi-process (torchrun): every rank draws the same global batch, k and noise, and trains on its slice; the
student and the discriminator are wrapped in DDP; the adaptive weights use last-layer gradients averaged
over ranks, so all ranks use the same lambda, the one a single process with the whole batch would use.
With micro-batches, lambda is computed per micro-batch (as in the reference implementation).
"""

from __future__ import annotations

import json
import logging
import typing
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from ..config import DistillConfig
from ..core.guidance import guided
from ..core.losses import (
    adaptive_weight_from_grads,
    ctm_pair,
    dsm_loss,
    gan_d_loss,
    gan_g_loss,
    last_layer_grad,
    make_distance,
)
from ..core.precond import CTM, bcast, make_precond, predicts_noise
from ..core.schedules import (
    SIGMA_MAX,
    SIGMA_MIN,
    karras_sigmas,
    sample_ctm_indices,
    sample_dsm_sigmas,
    sample_k,
    sample_mixed_pairs,
    sample_uniform_pairs,
)
from ..core.solvers import solve_grid_segments
from ..data.loader import BatchPlan
from ..errors import UserError
from ..io.card import ModelCard
from ..io.phema import sample_width
from ..metrics.perceptual import InceptionFeatureMap
from ..nets.augment import diff_augment
from ..nets.disc import ImageDiscriminator, VectorDiscriminator
from ..nets.dropout import set_dropout
from ..nets.feature_nets import DEIT_WEIGHTS, EFFNET_WEIGHTS, reference_feature_nets
from ..nets.lora import lora_targets
from ..nets.lpips import LPIPS, VGG_WEIGHTS
from ..nets.projected import ProjectedDiscriminator
from ..nets.registry import BackboneSpec, backbone_spec
from ..teachers import PyTeacher, load_teacher, teacher_facts
from . import dist
from .common import Run, make_optimizer
from .ema import ema_update, frozen_copy
from .latent import TargetNet, latent_student, lora_last_layer

if typing.TYPE_CHECKING:
    from ..data import Dataset

log = logging.getLogger(__name__)


@dataclass
class CTMDraw:
    """Every random draw of one iteration, or one micro-batch of it: data x0 [B', ...] and labels [B'] | None (this
    rank's items: B' = B / processes), and for the global batch B: grid indices n, u = n + k, m [B], the noise z of
    x_t [B, ...], the DSM sigmas [B] and noise [B, ...] (None without DSM), and the guidance scales w [B] of a range
    student (ctm.guidance=[lo, hi]; else None)."""

    x0: Tensor
    labels: Tensor | None
    n: Tensor
    u: Tensor
    m: Tensor
    z: Tensor
    sig: Tensor | None
    z_dsm: Tensor | None
    w: Tensor | None = None

    def tensors(self) -> list[Tensor | None]:
        return [getattr(self, f.name) for f in fields(self)]


class CTMRun(Run):
    kind = "distill"

    def __init__(self, cfg: DistillConfig, out, data: Dataset, resume: bool = False):
        super().__init__(cfg, out, data, resume)
        self.latent = data.kind == "latent"                              # a latent text-to-image teacher's data
        self.check_latent_settings()
        self.check_split("ctm.gan_batch_size", cfg.ctm.gan_batch_size)
        self.check_weight_files()                                          # before the slow parts
        if cfg.ctm.gan and cfg.ctm.gan_start >= cfg.train.steps and self.dist.main:
            log.warning("ctm.gan_start=%d is not below train.steps=%d: the GAN term will not run (lower "
                        "ctm.gan_start to train with it, or set ctm.gan=false)", cfg.ctm.gan_start, cfg.train.steps)
        self.teacher = None if cfg.ctm.teacher_free else load_teacher(cfg.teacher, data)
        if isinstance(self.teacher, torch.nn.Module):
            self.teacher = self.teacher.to(self.device)
        self.adopt_teacher_range()
        self.label_dropout = self.setup_guidance()
        torch.manual_seed(cfg.train.seed)
        tcard = getattr(self.teacher, "card", None)
        init = tcard is not None and cfg.ctm.init_from_teacher and not isinstance(self.teacher, PyTeacher)
        self.spec = self.student_spec(tcard.backbone if init else backbone_spec(
            cfg.model, data.kind, data.shape, data.num_classes, data.spec))
        keep = init and self.student_form(tcard.precond) == "teacher"
        self.precond = tcard.precond if keep else None        # a foreign teacher's form, kept by its student
        self.check_resumed_form()
        if self.latent:   # the teacher's UNet (copied, or shared with LoRA adapters: train/latent.py)
            self.net, self.trained, self.teacher = latent_student(self, init)
        else:
            self.net = CTM(self.spec.build(), cfg.model.sigma_data, make_precond(self.precond, cfg.model.sigma_data))
            self.trained = self.net
        if init and not self.latent:  # weight for weight: every shared layer copied; the s-embedding starts at 0
            missing = self.net.load_state_dict(self.teacher.state_dict(), strict=False)
            assert not missing.unexpected_keys, missing
        elif isinstance(self.teacher, PyTeacher) and self.dist.main:
            log.warning("teacher '%s' is a Python callable whose architecture ctmkit cannot extend: distilling into "
                        "a ctmkit %s (model.* settings) trained from scratch", cfg.teacher, self.spec.arch)
        self.net.to(self.device)
        self.grad_checkpointing()
        self.target = frozen_copy(self.trained)                            # theta^-: EMA rate ctm.target_ema
        self.G_target = self.target if self.trained is self.net else TargetNet(self.net, self.target)
        set_dropout(self.target, cfg.ctm.target_dropout)                   # explicit, not by train()/eval()
        self.nets = {"net": self.trained, "target": self.target}
        self.add_emas()                                                    # evaluation and post-hoc EMAs
        self.add_optimizer("opt", make_optimizer(self.trained.parameters(), cfg.train))
        self.last_layer = self.net.last_layer() if self.trained is self.net else lora_last_layer(self.net)
        self.maybe_compile(self.net.backbone)
        self.ddp = dist.wrap(self.net, self.dist, self.device)
        if cfg.ctm.gan:
            self.disc = self.make_discriminator().to(self.device)
            self.nets["disc"] = self.disc
            self.add_optimizer("disc_opt", make_optimizer(self.disc.parameters(), cfg.train, cfg.ctm.disc_lr,
                                                          (0.5, 0.9)))
            self.ddp_disc = dist.wrap(self.disc, self.dist, self.device)
        self.distance = self.make_ctm_distance()
        self.grid = karras_sigmas(cfg.ctm.num_scales, cfg.sigma_min, cfg.sigma_max)   # t_0 > ... > t_{N-1}
        self.aug_gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 7)

    def check_latent_settings(self) -> None:
        """ctm.lora_rank needs a latent teacher; a latent student has its teacher and runs without the GAN term
        unless ctm.gan_latent (docs/method.md section 9)."""
        c = self.cfg.ctm
        if c.lora_rank and not self.latent:
            raise UserError(f"ctm.lora_rank={c.lora_rank} trains adapters on a latent text-to-image pipeline's UNet "
                            "(--teacher diffusers:DIR with --data from `ctmkit prepare --pipeline`); this student "
                            f"is not one ('{self.data.spec}'): use ctm.lora_rank=0")
        if self.latent and c.teacher_free:
            raise UserError("ctm.teacher_free=true has no network to start from on latent data: distil the "
                            "pipeline (--teacher diffusers:DIR)")
        if self.latent and c.gan and not c.gan_latent:
            c.gan = False
            if self.dist.main:
                log.warning("a latent student runs without the GAN term (ctm.gan_latent=true keeps it): ctm.gan=false "
                            "in config.yaml")

    def grad_checkpointing(self) -> None:
        """train.grad_checkpointing: diffusers' gradient checkpointing in the student's UNet (diffusers only)."""
        if not self.tcfg.grad_checkpointing:
            return
        unet = getattr(self.net.backbone, "denoiser", None)
        if not hasattr(unet, "enable_gradient_checkpointing"):
            raise UserError("train.grad_checkpointing=true needs a diffusers student (a diffusers:DIR teacher); "
                            f"this one is a ctmkit {self.spec.arch}")
        unet.enable_gradient_checkpointing()

    def trained_module(self) -> torch.nn.Module:
        return self.trained

    def fit(self, progress: bool = True):
        """Train (Run.fit), then make the post-hoc EMA of width ctm.sample_sigma_rel the weights the run samples."""
        out = super().fit(progress)
        width = self.cfg.ctm.sample_sigma_rel
        if width and self.dist.main:
            if self.tcfg.phema:
                sample_width(out, width)
            else:
                log.warning("train.phema=[] keeps no post-hoc EMA snapshots: the run samples its training EMA "
                            "(ctm.sample_sigma_rel=0 says so without this warning)")
        dist.barrier(self.dist)
        return out

    @property
    def use_labels(self) -> bool:
        """A latent run's items carry their prompt indices (the TextCond comes from the prepared folder's table)."""
        return self.latent or super().use_labels

    def condition(self, labels: Tensor | None):
        """The networks' condition of a micro-batch: class labels as they are; a latent run's prompt indices [B']
        (-1: dropped) -> their prompts' TextCond, with the empty prompt's embedding where -1 (cond.drop)."""
        if not self.latent or labels is None:
            return labels
        idx = labels.cpu()
        return self.data.prompt_embeds(idx.clamp(min=0)).drop(idx < 0).to(self.device)

    def adopt_teacher_range(self) -> None:
        """The teacher's sigma range replaces EDM's default one (0.002, 80) in the config (and so in the run's
        config.yaml); an explicit range must lie inside the teacher's."""
        cfg, facts = self.cfg, teacher_facts(self.teacher)
        lo, hi = facts["sigma_min"], facts["sigma_max"]
        if lo is None or (lo, hi) == (cfg.sigma_min, cfg.sigma_max):
            return
        if (cfg.sigma_min, cfg.sigma_max) == (SIGMA_MIN, SIGMA_MAX):
            cfg.sigma_min, cfg.sigma_max = float(lo), float(hi)
            if self.dist.main:
                log.warning("using the teacher's sigma range [%g, %g] (sigma_min, sigma_max in config.yaml)", lo, hi)
        elif not lo * (1 - 1e-6) <= cfg.sigma_min < cfg.sigma_max <= hi * (1 + 1e-6):
            raise UserError(f"sigma range [{cfg.sigma_min:g}, {cfg.sigma_max:g}] is outside the teacher's "
                            f"[{lo:g}, {hi:g}]; leave sigma_min / sigma_max at their defaults to use the teacher's")

    def setup_guidance(self) -> float:
        """Classifier-free guidance (docs/method.md section 8), checked: guided distillation (ctm.guidance != [1])
        needs labels and a teacher with a null branch, and runs without the GAN unless ctm.gan_guided; returns the
        label-dropout probability of unguided distillation (the student keeps a null branch), else 0."""
        c = self.cfg.ctm
        teacher_p = teacher_facts(self.teacher).get("label_dropout", 0.0) if self.teacher is not None else 0.0
        if not c.guided:
            p = teacher_p if c.label_dropout < 0 else c.label_dropout
            return p if self.use_labels else 0.0
        if not self.use_labels:
            raise UserError(f"ctm.guidance={c.guidance} needs class labels: '{self.data.spec}' gives the network "
                            "none (labelled data and model.conditional=true)")
        if teacher_p <= 0:
            raise UserError(f"ctm.guidance={c.guidance} needs a teacher with a null branch (trained with "
                            f"label_dropout > 0, or diffusers:DIR?null_class=K); teacher '{self.cfg.teacher}' has none")
        if c.gan and not c.gan_guided:
            c.gan = False
            if self.dist.main:
                log.warning("guided distillation runs without the GAN term (its real side is unguided data; "
                            "ctm.gan_guided=true keeps it): ctm.gan=false in config.yaml")
        return 0.0

    def student_spec(self, spec: BackboneSpec) -> BackboneSpec:
        """The student's backbone: the teacher's (or the config's), with ctm.student_dropout when it is >= 0, and a
        guidance-scale input for a range student (ctm.guidance=[lo, hi]; ctmkit's mlp and unet)."""
        rng = self.cfg.ctm.guidance
        if len(rng) == 2:
            if spec.arch not in ("mlp", "unet"):
                raise UserError(f"ctm.guidance={rng} (a range) needs a ctmkit mlp or unet student; this one is "
                                f"{spec.arch}: distil one scale, e.g. ctm.guidance={rng[1]:g}")
            spec = BackboneSpec(spec.arch, {**spec.kwargs, "guidance_embed": True})
        p = self.cfg.ctm.student_dropout
        if p >= 0 and "dropout" in spec.kwargs:
            return BackboneSpec(spec.arch, {**spec.kwargs, "dropout": p})
        if p >= 0 and "dropout" in spec.kwargs.get("config", {}):       # a diffusers UNet2DModel
            return BackboneSpec(spec.arch, {**spec.kwargs, "config": {**spec.kwargs["config"], "dropout": p}})
        return spec

    def check_resumed_form(self) -> None:
        """A resumed run keeps its student's preconditioning (its model.json), whatever ctm.student_precond now says."""
        card = self.out / "model.json"
        if not (self.resume and card.is_file()):
            return
        try:
            before = json.loads(card.read_text()).get("precond")
        except (OSError, ValueError, AttributeError):
            return   # no readable card: nothing to compare with (load_latest reports a broken run)
        if before != json.loads(json.dumps(self.precond)):     # compared as model.json holds it
            was = "EDM's" if before is None else f"the teacher's ({before.get('kind')})"
            raise UserError(f"'{self.out}' was trained with the student in {was} form but these settings give another "
                            f"one; resume with ctm.student_precond={'edm' if before is None else 'teacher'}")

    def student_form(self, teacher_precond: dict | None) -> str:
        """ctm.student_precond resolved: 'auto' is 'edm' for a pixel teacher that predicts the noise (its x0 error
        grows with sigma, which a one-step student of that form cannot unlearn), else 'teacher': a latent teacher's
        student starts as it (bench/RESULTS.md, "A diffusers-built teacher" and "The CTM students of the latent
        teacher")."""
        form = self.cfg.ctm.student_precond
        if form == "auto":
            form = "edm" if predicts_noise(teacher_precond) and not self.latent else "teacher"
            if form == "edm" and self.dist.main:
                log.warning("the teacher predicts the noise: the student takes EDM's preconditioning with the "
                            "teacher's weights (ctm.student_precond=auto; =teacher keeps the teacher's form)")
        return form

    @property
    def projected(self) -> bool:
        """The GAN term runs the projected discriminator (ctm.discriminator=projected)."""
        return self.cfg.ctm.gan and self.cfg.ctm.discriminator == "projected"

    def check_weight_files(self) -> None:
        """The paper's distance and discriminator need image data and weight files the user names: fail early."""
        c = self.cfg.ctm
        if c.distance == "lpips" or self.projected:
            if self.data.kind != "image":
                what = "ctm.distance=lpips" if c.distance == "lpips" else "ctm.discriminator=projected"
                raise UserError(f"{what} needs image data (ImageNet feature networks); use the defaults for vectors")
        if c.distance == "lpips":
            VGG_WEIGHTS.path(c.lpips_vgg)
        if self.projected:
            DEIT_WEIGHTS.path(c.disc_deit)
            EFFNET_WEIGHTS.path(c.disc_effnet)

    def make_ctm_distance(self):
        """d of the CTM loss (ctm.distance): LPIPS over the user's VGG16 weights, or core.losses.make_distance."""
        c = self.cfg.ctm
        if c.distance == "lpips":
            return LPIPS.from_file(c.lpips_vgg, c.lpips_size).to(self.device)
        dim = int(torch.tensor(self.data.shape).prod())
        return make_distance(c.distance, dim, c.huber_c, self.feature_map())

    def make_discriminator(self) -> torch.nn.Module:
        """ctm.discriminator: the projected one (frozen feature networks from the user's files, trainable heads), or
        the small one trained from scratch: an MLP for vectors, strided convs for images."""
        cfg, data = self.cfg, self.data
        if self.projected:
            nets = reference_feature_nets(cfg.ctm.disc_deit, cfg.ctm.disc_effnet, cfg.train.seed)
            return ProjectedDiscriminator(nets, seed=cfg.train.seed)
        classes = data.num_classes if self.use_labels else 0
        if data.kind == "vector":
            return VectorDiscriminator(data.shape[0], cfg.ctm.disc_hidden, num_classes=classes)
        return ImageDiscriminator(data.shape[0], data.shape[1], cfg.ctm.disc_hidden // 4, classes)

    def feature_map(self):
        """The Inception feature map of ctm.distance=feature (images only), else None."""
        if self.cfg.ctm.distance != "feature":
            return None
        if self.data.kind != "image":
            raise UserError("ctm.distance=feature needs image data (Inception-v3 features); use huber or l2")
        return InceptionFeatureMap(self.cfg.ctm.feature_size, self.device)

    def batch_plan(self) -> BatchPlan:
        """The global batch per step: ctm.gan_batch_size from ctm.gan_start on when the GAN stage sets one."""
        c = self.cfg.ctm
        return replace(super().batch_plan(), later_size=c.gan_batch_size if c.gan else 0, from_step=c.gan_start)

    def stage(self, gan_value, base):
        """A GAN-stage setting (ctm.gan_lr / gan_batch_size / gan_max_k; 0 = unchanged) once the GAN term is on."""
        return gan_value if gan_value > 0 and self.gan_active() else base

    def model_card(self) -> ModelCard:
        guidance = {"label_dropout": self.label_dropout} if self.label_dropout > 0 else {}
        if self.cfg.ctm.guided:
            guidance["scale"] = list(self.cfg.ctm.guidance)
        latent = None
        if self.latent:     # the pipeline's facts, for sampling from prompts; a LoRA student: its adapters' rank
            lora = {"lora": {"rank": self.cfg.ctm.lora_rank, "targets": lora_targets(self.net.backbone)}} \
                if self.cfg.ctm.lora_rank else {}
            latent = {**self.teacher.card.latent, **lora}
        return ModelCard("ctm", backbone=self.spec, teacher=self.cfg.teacher, precond=self.precond,
                         guidance=guidance or None, latent=latent, **self.card_fields())

    def state(self) -> dict:
        return {**super().state(), "aug_gen": self.aug_gen.get_state()}

    def load_state(self, st: dict) -> None:
        super().load_state(st)
        self.aug_gen.set_state(st["aug_gen"])

    # -- the objective ---------------------------------------------------------------------------------
    def teacher_solve(self, x_t: torch.Tensor, n: torch.Tensor, u: torch.Tensor, labels,
                      w: Tensor | None = None) -> torch.Tensor:
        """x_u = Solver_phi(x_t, t_n -> t_u): u - n Heun steps of the teacher along the grid, per sample (no grad);
        the guided teacher D_w for guided distillation (w [B]: a range student's scales)."""
        x = x_t.double() if self.data.mixture is not None and self.cfg.teacher == "exact" else x_t
        if w is not None:   # per-sample scales: the solver passes sample indices where labels go
            teacher = lambda x_, sig, i: guided(self.teacher, w[i])(x_, sig, labels[i])   # noqa: E731
            index = torch.arange(len(w), device=w.device)
            return solve_grid_segments(teacher, x, self.grid, n, u - n, index).to(x_t.dtype)
        teacher = guided(self.teacher, self.cfg.ctm.guidance[0])
        return solve_grid_segments(teacher, x, self.grid, n, u - n, labels).to(x_t.dtype)

    def gan_active(self) -> bool:
        return self.cfg.ctm.gan and self.step >= self.cfg.ctm.gan_start

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.aug_gen, cutout_ratio=self.cfg.ctm.cutout_ratio)

    def disc_in(self, x: torch.Tensor) -> torch.Tensor:
        """The small discriminator's input: DiffAugment for images (ctm.augment); the projected one augments inside."""
        if self.data.kind == "image" and self.cfg.ctm.augment and not self.projected:
            return self.augment(x)
        return x

    def disc_kw(self, groups: int = 1) -> dict:
        """The projected discriminator's extra arguments: DiffAugment drawn per feature network (as the reference),
        and `groups` parts of the batch (real, fake) through its BatchNorm heads apart."""
        if not self.projected:
            return {}
        return {"groups": groups, "augment": self.augment if self.cfg.ctm.augment else None}

    def draw(self) -> CTMDraw:
        """Every random draw of one iteration, for the global batch, in a fixed order (identical on all ranks):
        k (reference pairs: one per iteration), x0, labels (this rank's items of the step's (seed, step) plan),
        grid indices (n, u, m) by ctm.pairs, the noise of x_t, and the DSM sigmas (shuffled) and noise."""
        cfg, c = self.cfg, self.cfg.ctm
        max_k = self.stage(c.gan_max_k, c.max_k)
        k = sample_k(max_k, self.gen) if c.pairs in ("reference", "mixed") else None
        x0, labels, b = self.global_batch(self.stage(c.gan_batch_size, self.tcfg.batch_size))   # this rank's items
        if c.pairs == "mixed":
            n, u, m = sample_mixed_pairs(b, c.num_scales, k, max_k, c.pairs_mixed_frac, self.gen)
        elif k is not None:
            n, u, m = sample_ctm_indices(b, c.num_scales, k, self.gen)
        else:
            n, u, m = sample_uniform_pairs(b, c.num_scales, max_k, c.pairs == "all_the_way", self.gen)
        z = self.randn((b, *x0.shape[1:]))
        sig = z_dsm = None
        if cfg.ctm.dsm:
            sig = sample_dsm_sigmas(b, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
                                    karras_frac=cfg.ctm.dsm_karras_frac, generator=self.gen)
            sig = sig[torch.randperm(b, generator=self.gen)].float()
            z_dsm = self.randn((b, *x0.shape[1:]))
        labels = self.drop_labels(labels, b, self.label_dropout)       # draws nothing without label dropout
        w = None
        if len(c.guidance) == 2:                                       # a range student: w ~ U[lo, hi] per sample
            lo, hi = c.guidance
            w = lo + (hi - lo) * torch.rand(b, generator=self.gen)
        return CTMDraw(x0, labels, n, u, m, z, sig, z_dsm, w)

    def micro_batches(self, d: CTMDraw) -> list[CTMDraw]:
        """This rank's micro-batches of a global draw, on the device."""
        return [CTMDraw(*part) for part in self.parts(*d.tensors(), local=2)]   # x0, labels: this rank's already

    def levels(self, d: CTMDraw) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x_t = x_0 + t z and the levels t, u, s, sigma_min [B] of one micro-batch."""
        t, t_u, s = (self.grid[i.cpu()].to(self.device, torch.float32) for i in (d.n, d.u, d.m))
        return d.x0 + bcast(t, d.x0) * d.z, t, t_u, s, torch.full_like(t, self.cfg.sigma_min)

    def ctm_losses(self, d: CTMDraw) -> dict:
        """The loss terms of one micro-batch (graphs attached)."""
        cfg = self.cfg
        x0, labels, n, w = d.x0, self.condition(d.labels), d.n.cpu(), d.w
        x_t, t, t_u, s, s_min = self.levels(d)
        wk = () if w is None else (w,)                 # a range student's scale input
        target = self.G_target if w is None else (lambda *a: self.G_target(*a, w))   # noqa: E731
        with torch.no_grad():
            if cfg.ctm.teacher_free:  # self-learn: x_u from the target network's own jump
                x_u = target(x_t, t, t_u, labels)
            else:
                x_u = self.teacher_solve(x_t, n, d.u.cpu(), labels, w)
        G = lambda *a: self.ddp("forward", *a, *wk)   # noqa: E731  (through DDP: gradients synchronised)
        with self.autocast():
            estimate, goal = ctm_pair(G, target, x_t, x_u, t, t_u, s, s_min, labels)
            out = {"ctm": self.distance(estimate, goal).mean(), "estimate": estimate}
            if cfg.ctm.dsm:
                out["dsm"] = dsm_loss(lambda *a: self.ddp("denoise", *a, *wk), x0, d.sig, d.z_dsm,
                                      cfg.model.sigma_data, labels, self.dsm_target(w))
            if self.gan_active():
                out["gan_g"] = gan_g_loss(self.disc(self.disc_in(estimate), d.labels, **self.disc_kw()))
        return out

    def dsm_target(self, w: Tensor | None):
        """The DSM regression target of guided distillation: the guided teacher's denoiser D_w (None: the data)."""
        if not self.cfg.ctm.guided or self.teacher is None:
            return None
        return guided(self.teacher, self.cfg.ctm.guidance[0] if w is None else w)

    def weight(self, fixed: float, losses: dict, key: str, lo: float, hi: float) -> torch.Tensor:
        """A fixed weight (>= 0), or the adaptive one from last-layer gradient norms averaged over ranks."""
        if fixed >= 0:
            return torch.tensor(fixed, device=self.device)
        last = self.last_layer
        if "_g_ctm" not in losses:
            losses["_g_ctm"] = last_layer_grad(losses["ctm"], last)
        grads = dist.all_mean_(torch.stack([losses["_g_ctm"], last_layer_grad(losses[key], last)]), self.dist)
        return adaptive_weight_from_grads(grads[0], grads[1], lo, hi)

    def train_step(self) -> dict:
        """One iteration. With the GAN on and ctm.g_every = P > 1, iterations alternate as in the reference: the
        generator steps when step % P == 0, the discriminator (on fresh fakes) otherwise; P = 1: both every step."""
        cfg = self.cfg
        draw = self.draw()                            # identical on all ranks
        stats: dict[str, float] = {"k": float((draw.u - draw.n).double().mean())}   # mean teacher steps
        gan = self.gan_active()
        g_turn = not gan or self.step % cfg.ctm.g_every == 0
        if g_turn:
            g_stats, fakes, reals, ok = self.generator_step(draw, gan)
            stats.update(g_stats)
        else:
            fakes, reals, ok = self.fakes(draw), None, True
        if gan and (cfg.ctm.g_every == 1 or not g_turn):
            d_stats, d_ok = self.discriminator_step(fakes, reals, draw)
            stats.update(d_stats)
            ok = ok and d_ok
        stats["_ok"] = ok
        return stats

    def generator_step(self, draw: CTMDraw, gan: bool) -> tuple[dict, list, list, bool]:
        """The student's update on L_CTM + lambda_DSM L_DSM (+ lambda_GAN L_GAN): stats, the fakes and reals of each
        micro-batch (for the discriminator), and whether the step was finite."""
        cfg, mb = self.cfg, self.tcfg.micro_batches
        self.set_lr(self.opts["opt"], self.stage(cfg.ctm.gan_lr, self.tcfg.lr))
        self.net.train()
        stats: dict[str, float] = {}
        fakes, reals = [], []
        if gan:
            self.disc.requires_grad_(False)          # the generator's loss flows through D without training it
        for i, part in enumerate(self.micro_batches(draw)):
            x0, labels = part.x0, part.labels
            with dist.no_sync(self.ddp, sync=i == mb - 1):
                losses = self.ctm_losses(part)
                total = losses["ctm"]
                if "dsm" in losses:
                    lam = self.weight(cfg.ctm.dsm_weight, losses, "dsm", 0.0, cfg.ctm.dsm_weight_max)
                    total = total + lam * losses["dsm"]
                    _add(stats, {"loss_dsm": losses["dsm"], "lambda_dsm": lam}, mb)
                if "gan_g" in losses:
                    lam = self.weight(cfg.ctm.gan_weight, losses, "gan_g", cfg.ctm.gan_weight_min,
                                      cfg.ctm.gan_weight_max)
                    total = total + lam * losses["gan_g"]
                    _add(stats, {"loss_gan_g": losses["gan_g"], "lambda_gan": lam}, mb)
                self.backward(total / mb, "opt")
            _add(stats, {"loss": total, "loss_ctm": losses["ctm"]}, mb)
            fakes.append((losses["estimate"].detach(), labels))
            reals.append((x0, labels))
        stats = self.reduce_stats(stats)
        ok = self.apply("opt", self.trained.parameters(), torch.tensor(stats["loss"]))
        if ok:
            ema_update(self.target, self.trained, cfg.ctm.target_ema)
            self.update_emas()
        return stats, fakes, reals, ok

    @torch.no_grad()
    def fakes(self, draw: CTMDraw) -> list:
        """The estimate G_{theta-}(G_theta(x_t, t, s), s, sigma_min) of each micro-batch, without gradients (the
        fakes of a discriminator-only iteration)."""
        out = []
        for part in self.micro_batches(draw):
            x_t, t, _, s, s_min = self.levels(part)
            wk, cond = () if part.w is None else (part.w,), self.condition(part.labels)
            with self.autocast():
                out.append((self.G_target(self.net(x_t, t, s, cond, *wk), s, s_min, cond, *wk), part.labels))
        return out

    def discriminator_step(self, fakes: list, reals: list | None, draw: CTMDraw) -> tuple[dict, bool]:
        """The discriminator's hinge-loss update on real data against the fakes (reals: this draw's data)."""
        mb, cfg = self.tcfg.micro_batches, self.cfg
        if reals is None:
            reals = [(p.x0, p.labels) for p in self.micro_batches(draw)]
        self.disc.requires_grad_(True)
        self.disc.train()
        self.set_lr(self.opts["disc_opt"], cfg.ctm.disc_lr)
        d_total = torch.zeros((), device=self.device)
        for i, ((fake, lf), (real, lr_)) in enumerate(zip(fakes, reals)):
            with dist.no_sync(self.ddp_disc, sync=i == mb - 1):
                with self.autocast():   # real and fake in one forward pass (one DDP forward per backward)
                    both = self.disc_in(torch.cat([real, fake]))
                    d_out = self.ddp_disc("forward", both, None if lr_ is None else torch.cat([lr_, lf]),
                                          **self.disc_kw(groups=2))
                    d_loss = gan_d_loss(*d_out.chunk(2))
                self.backward(d_loss / mb, "disc_opt")
            d_total = d_total + d_loss.detach() / mb
        d_stats = self.reduce_stats({"loss_d": d_total})
        return d_stats, self.apply("disc_opt", self.disc.parameters(), torch.tensor(d_stats["loss_d"]))


def _add(stats: dict, new: dict, mb: int) -> None:
    for key, v in new.items():
        stats[key] = stats.get(key, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / mb
