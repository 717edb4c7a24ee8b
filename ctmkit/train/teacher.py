"""EDM teacher training (Karras et al. 2022, section 5): denoising score matching with the EDM
preconditioning, log-normal sigma sampling and the EDM loss weight lambda(sigma)."""

from __future__ import annotations

import typing

import torch

from ..config import TeacherConfig
from ..core.losses import dsm_loss
from ..core.precond import EDMDenoiser
from ..core.schedules import lognormal_sigmas
from ..errors import UserError
from ..io.card import ModelCard
from ..nets.registry import backbone_spec
from . import dist
from .common import Run, make_optimizer

if typing.TYPE_CHECKING:
    from ..data import Dataset


class TeacherRun(Run):
    kind = "teacher"

    def __init__(self, cfg: TeacherConfig, out, data: Dataset, resume: bool = False):
        super().__init__(cfg, out, data, resume)
        if cfg.label_dropout > 0 and not self.use_labels:
            raise UserError(f"label_dropout={cfg.label_dropout:g} needs labelled data and model.conditional=true; "
                            f"'{data.spec}' gives the network no labels")
        if cfg.train.grad_checkpointing:
            raise UserError("train.grad_checkpointing=true applies to diffusers students (ctmkit distill with a "
                            "diffusers:DIR teacher); ctmkit's own networks do not have it")
        self.spec = backbone_spec(cfg.model, data.kind, data.shape, data.num_classes, data.spec)
        torch.manual_seed(cfg.train.seed)
        self.net = EDMDenoiser(self.spec.build(), cfg.model.sigma_data).to(self.device)
        self.net.backbone.s_embed.requires_grad_(False)   # a teacher never sees s (and DDP needs every grad)
        self.nets = {"net": self.net}
        self.add_emas()
        self.add_optimizer("opt", make_optimizer(self.net.parameters(), cfg.train))
        self.maybe_compile(self.net.backbone)
        self.ddp = dist.wrap(self.net, self.dist, self.device)

    def model_card(self) -> ModelCard:
        guidance = {"label_dropout": self.cfg.label_dropout} if self.cfg.label_dropout > 0 else None
        return ModelCard("teacher", backbone=self.spec, guidance=guidance, **self.card_fields())

    def train_step(self) -> dict:
        cfg, mb = self.cfg, self.tcfg.micro_batches
        self.set_lr(self.opts["opt"], self.tcfg.lr)
        self.net.train()
        xb, lb, b = self.global_batch()     # this rank's items; the noise is drawn for all b, identically on every rank
        sb = lognormal_sigmas(torch.randn(b, generator=self.gen), cfg.p_mean, cfg.p_std)
        zb = self.randn((b, *xb.shape[1:]))
        lb = self.drop_labels(lb, b, cfg.label_dropout)
        total = 0.0
        for i, (x0, labels, sigma, noise) in enumerate(self.parts(xb, lb, sb, zb, local=2)):
            with dist.no_sync(self.ddp, sync=i == mb - 1):
                with self.autocast():
                    loss = dsm_loss(lambda *a: self.ddp("forward", *a), x0, sigma, noise, cfg.model.sigma_data,
                                    labels)
                self.backward(loss / mb, "opt")
            total += float(loss.detach()) / mb
        stats = self.reduce_stats({"loss": total})
        ok = self.apply("opt", self.net.parameters(), torch.tensor(stats["loss"]))
        if ok:
            self.update_emas()
        return {**stats, "_ok": ok}
