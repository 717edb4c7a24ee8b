"""EDM teacher training (Karras et al. 2022, section 5): denoising score matching with the EDM
preconditioning, log-normal sigma sampling and the EDM loss weight lambda(sigma)."""

from __future__ import annotations

import typing

import torch

from ..config import TeacherConfig

if typing.TYPE_CHECKING:
    from ..data import Dataset
from ..losses import dsm_loss
from ..precond import EDMDenoiser
from .common import Run, backbone_spec, build_backbone, data_info, ema_update, frozen_copy, make_optimizer


class TeacherRun(Run):
    kind = "teacher"

    def __init__(self, cfg: TeacherConfig, out, data: Dataset, resume: bool = False):
        super().__init__(cfg, out, data, resume)
        self.spec = backbone_spec(cfg.model, data)
        torch.manual_seed(cfg.train.seed)
        self.net = EDMDenoiser(build_backbone(self.spec), cfg.model.sigma_data).to(self.device)
        self.emas = [frozen_copy(self.net) for _ in cfg.train.ema]
        self.nets = {"net": self.net, **{f"ema{i}": e for i, e in enumerate(self.emas)}}
        self.opts = {"opt": make_optimizer(self.net.parameters(), cfg.train)}

    def model_info(self) -> dict:
        return {"kind": "teacher", "backbone": self.spec, "sigma_data": self.cfg.model.sigma_data,
                "sigma_min": self.cfg.sigma_min, "sigma_max": self.cfg.sigma_max, "data": data_info(self.data),
                "ema": list(self.tcfg.ema)}

    def train_step(self) -> dict:
        cfg, opt = self.cfg, self.opts["opt"]
        self.set_lr(opt, self.tcfg.lr)
        self.net.train()
        total = 0.0
        for _ in range(self.tcfg.micro_batches):
            x0, labels = self.batch(self.tcfg.batch_size // self.tcfg.micro_batches)
            sigma = (cfg.p_mean + cfg.p_std * torch.randn(x0.shape[0], generator=self.gen)).exp().to(self.device)
            noise = self.randn(x0.shape)
            with self.autocast():
                loss = dsm_loss(self.net, x0, sigma, noise, cfg.model.sigma_data, labels)
            (loss / self.tcfg.micro_batches).backward()
            total += float(loss.detach()) / self.tcfg.micro_batches
        ok = self.apply(opt, self.net.parameters(), torch.tensor(total))
        if ok:
            for e, rate in zip(self.emas, self.tcfg.ema):
                ema_update(e, self.net, rate)
        return {"loss": total, "_ok": ok}
