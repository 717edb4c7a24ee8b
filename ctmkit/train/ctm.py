"""CTM distillation (Kim et al. 2024, CTM_SPEC section 3): L = L_CTM + lambda_DSM L_DSM + lambda_GAN L_GAN.

Per iteration: one k ~ P(k) prop. to k; per sample t = t_n, u = t_{n+k}, s = t_m (m >= n+k) on the Karras grid;
x_u from k teacher Heun steps (no grad); both sides of the CTM loss transported to sigma_min by the target net.
The generator step is followed by a discriminator step once the GAN term is active (both every iteration).

Multi-process (torchrun): every rank draws the same global batch, k and noise, and trains on its slice; the
student and the discriminator are wrapped in DDP; the adaptive weights use last-layer gradients averaged
over ranks, so all ranks use the same lambda, the one a single process with the whole batch would use.
With micro-batches, lambda is computed per micro-batch (as in the reference implementation).
"""

from __future__ import annotations

import logging
import typing

import torch

from ..config import DistillConfig
from ..errors import UserError
from ..losses import (
    adaptive_weight_from_grads,
    ctm_pair,
    dsm_loss,
    gan_d_loss,
    gan_g_loss,
    last_layer_grad,
    make_distance,
)
from ..precond import CTM
from ..schedules import karras_sigmas, sample_ctm_indices, sample_dsm_sigmas, sample_k
from ..solvers import solve_pf_ode
from . import dist
from .common import Run, backbone_spec, build_backbone, data_info, ema_update, frozen_copy, make_optimizer

if typing.TYPE_CHECKING:
    from ..data import Dataset

log = logging.getLogger(__name__)


def load_teacher(spec: str, data: Dataset):
    """The teacher denoiser: 'exact' (the data's known mixture) or a teacher run folder. Returns (denoiser, info)."""
    if spec == "exact":
        if data.mixture is None:
            raise UserError(f"teacher=exact needs data with a known density (gmm:PATH.json or a built-in mixture such "
                            f"as ring or grid); '{data.spec}' has none: train a teacher with `ctmkit train-teacher`")
        return data.mixture, None
    from ..loading import load_model
    teacher = load_model(spec)
    if teacher.info["kind"] != "teacher":
        raise UserError(f"'{spec}' is a {teacher.info['kind']} run, not a teacher")
    if tuple(teacher.info["data"]["shape"]) != tuple(data.shape):
        raise UserError(f"teacher '{spec}' was trained on data of shape {tuple(teacher.info['data']['shape'])}, "
                        f"but '{data.spec}' has shape {tuple(data.shape)}")
    if teacher.info["data"]["normalizer"] != data.normalizer.to_dict():
        log.warning("the data normalisation differs from the teacher's (different data or n_data?)")
    return teacher, teacher.info


def check_ctm_config(cfg: DistillConfig) -> None:
    c = cfg.ctm
    checks = [(c.num_scales >= 2, "ctm.num_scales must be >= 2"),
              (1 <= c.max_k <= c.num_scales - 1, "ctm.max_k must be in [1, ctm.num_scales - 1]"),
              (0 < c.target_ema < 1, "ctm.target_ema must be in (0, 1)"),
              (c.distance in ("huber", "l2"), "ctm.distance must be 'huber' or 'l2'"),
              (c.disc_lr > 0 and c.gan_start >= 0, "ctm.disc_lr must be > 0 and ctm.gan_start >= 0"),
              (0 <= c.dsm_karras_frac <= 1, "ctm.dsm_karras_frac must be in [0, 1]"),
              (0 < cfg.sigma_min < cfg.sigma_max, "need 0 < sigma_min < sigma_max")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


class CTMRun(Run):
    kind = "distill"

    def __init__(self, cfg: DistillConfig, out, data: Dataset, resume: bool = False):
        check_ctm_config(cfg)
        super().__init__(cfg, out, data, resume)
        self.teacher, tinfo = (None, None) if cfg.ctm.teacher_free else load_teacher(cfg.teacher, data)
        if isinstance(self.teacher, torch.nn.Module):
            self.teacher = self.teacher.to(self.device)
        torch.manual_seed(cfg.train.seed)
        init = tinfo is not None and cfg.ctm.init_from_teacher
        self.spec = tinfo["backbone"] if init else backbone_spec(cfg.model, data)
        self.net = CTM(build_backbone(self.spec), cfg.model.sigma_data)
        if init:  # weight for weight: every shared layer copied; the s-embedding (unused by teachers) starts at 0
            missing = self.net.load_state_dict(self.teacher.state_dict(), strict=False)
            assert not missing.unexpected_keys, missing
        self.net.to(self.device)
        self.target = frozen_copy(self.net)                                # theta^-: EMA rate ctm.target_ema
        self.emas = [frozen_copy(self.net) for _ in cfg.train.ema]         # evaluation EMAs
        self.nets = {"net": self.net, "target": self.target, **{f"ema{i}": e for i, e in enumerate(self.emas)}}
        self.add_optimizer("opt", make_optimizer(self.net.parameters(), cfg.train))
        self.maybe_compile(self.net.backbone)
        self.ddp = dist.wrap(self.net, self.dist, self.device)
        if cfg.ctm.gan:
            from ..nets.disc import ImageDiscriminator, VectorDiscriminator
            classes = data.num_classes if self.use_labels else 0
            self.disc = (VectorDiscriminator(data.shape[0], cfg.ctm.disc_hidden, num_classes=classes)
                         if data.kind == "vector" else
                         ImageDiscriminator(data.shape[0], data.shape[1], cfg.ctm.disc_hidden // 4, classes)
                         ).to(self.device)
            self.nets["disc"] = self.disc
            self.add_optimizer("disc_opt", make_optimizer(self.disc.parameters(), cfg.train, cfg.ctm.disc_lr,
                                                          (0.5, 0.9)))
            self.ddp_disc = dist.wrap(self.disc, self.dist, self.device)
        dim = int(torch.tensor(data.shape).prod())
        self.distance = make_distance(cfg.ctm.distance, dim, cfg.ctm.huber_c)
        self.grid = karras_sigmas(cfg.ctm.num_scales, cfg.sigma_min, cfg.sigma_max)   # t_0 > ... > t_{N-1}
        self.aug_gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 7)

    def model_info(self) -> dict:
        return {"kind": "ctm", "backbone": self.spec, "sigma_data": self.cfg.model.sigma_data,
                "sigma_min": self.cfg.sigma_min, "sigma_max": self.cfg.sigma_max, "data": data_info(self.data),
                "teacher": self.cfg.teacher, "ema": list(self.tcfg.ema)}

    def state(self) -> dict:
        return {**super().state(), "aug_gen": self.aug_gen.get_state()}

    def load_state(self, st: dict) -> None:
        super().load_state(st)
        self.aug_gen.set_state(st["aug_gen"])

    # -- the objective ---------------------------------------------------------------------------------
    def teacher_solve(self, x_t: torch.Tensor, n: torch.Tensor, k: int, labels) -> torch.Tensor:
        """x_u = Solver_phi(x_t, t_n -> t_{n+k}): k Heun steps of the teacher along the grid (no grad)."""
        idx = n[None, :] + torch.arange(k + 1)[:, None]                    # [k+1, B] grid indices
        sigmas = self.grid[idx]
        x = x_t.double() if self.data.mixture is not None and self.cfg.teacher == "exact" else x_t
        return solve_pf_ode(self.teacher, x, sigmas, "heun", labels).to(x_t.dtype)

    def gan_active(self) -> bool:
        return self.cfg.ctm.gan and self.step >= self.cfg.ctm.gan_start

    def disc_in(self, x: torch.Tensor) -> torch.Tensor:
        if self.data.kind == "image" and self.cfg.ctm.augment:
            from ..nets.disc import diff_augment
            return diff_augment(x, self.aug_gen)
        return x

    def draw(self, k: int) -> tuple:
        """Every random draw of one iteration, for the global batch, in a fixed order (identical on all ranks):
        x0, labels, grid indices (n, u, m), the noise of x_t, and the DSM sigmas (shuffled) and noise."""
        cfg = self.cfg
        x0, labels = self.global_batch()
        b = x0.shape[0]
        n, u, m = sample_ctm_indices(b, cfg.ctm.num_scales, k, self.gen)
        z = self.randn(x0.shape)
        sig = z_dsm = None
        if cfg.ctm.dsm:
            sig = sample_dsm_sigmas(b, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
                                    karras_frac=cfg.ctm.dsm_karras_frac, generator=self.gen)
            sig = sig[torch.randperm(b, generator=self.gen)].float()
            z_dsm = self.randn(x0.shape)
        return x0, labels, n, u, m, z, sig, z_dsm

    def ctm_losses(self, x0, labels, n, u, m, z, sig, z_dsm, k: int) -> dict:
        """The loss terms of one micro-batch (graphs attached)."""
        cfg = self.cfg
        n = n.cpu()
        t, t_u, s = (self.grid[i.cpu()].to(self.device, torch.float32) for i in (n, u, m))
        s_min = torch.full_like(t, cfg.sigma_min)
        x_t = x0 + t.view(-1, *[1] * (x0.ndim - 1)) * z
        with torch.no_grad():
            if cfg.ctm.teacher_free:  # self-learn: x_u from the target network's own jump
                x_u = self.target(x_t, t, t_u, labels)
            else:
                x_u = self.teacher_solve(x_t, n, k, labels)
        G = lambda *a: self.ddp("forward", *a)   # noqa: E731  (through DDP: gradients synchronised)
        with self.autocast():
            estimate, goal = ctm_pair(G, self.target, x_t, x_u, t, t_u, s, s_min, labels)
            out = {"ctm": self.distance(estimate, goal).mean(), "estimate": estimate}
            if cfg.ctm.dsm:
                out["dsm"] = dsm_loss(lambda *a: self.ddp("denoise", *a), x0, sig, z_dsm, cfg.model.sigma_data,
                                      labels)
            if self.gan_active():
                out["gan_g"] = gan_g_loss(self.disc(self.disc_in(estimate), labels))
        return out

    def weight(self, fixed: float, losses: dict, key: str, lo: float, hi: float) -> torch.Tensor:
        """A fixed weight (>= 0), or the adaptive one from last-layer gradient norms averaged over ranks."""
        if fixed >= 0:
            return torch.tensor(fixed, device=self.device)
        last = self.net.last_layer()
        if "_g_ctm" not in losses:
            losses["_g_ctm"] = last_layer_grad(losses["ctm"], last)
        grads = dist.all_mean_(torch.stack([losses["_g_ctm"], last_layer_grad(losses[key], last)]), self.dist)
        return adaptive_weight_from_grads(grads[0], grads[1], lo, hi)

    def train_step(self) -> dict:
        cfg, mb = self.cfg, self.tcfg.micro_batches
        self.set_lr(self.opts["opt"], self.tcfg.lr)
        self.net.train()
        k = sample_k(cfg.ctm.max_k, self.gen)       # one k per iteration, shared by the whole batch (all ranks)
        stats: dict[str, float] = {"k": float(k)}
        fakes, reals = [], []
        gan = self.gan_active()
        if gan:
            self.disc.requires_grad_(False)          # the generator's loss flows through D without training it
        for i, part in enumerate(self.parts(*self.draw(k))):
            x0, labels = part[0], part[1]
            with dist.no_sync(self.ddp, sync=i == mb - 1):
                losses = self.ctm_losses(*part, k=k)
                total = losses["ctm"]
                if "dsm" in losses:
                    lam = self.weight(cfg.ctm.dsm_weight, losses, "dsm", 0.0, 1e4)
                    total = total + lam * losses["dsm"]
                    _add(stats, {"loss_dsm": losses["dsm"], "lambda_dsm": lam}, mb)
                if "gan_g" in losses:
                    lam = self.weight(cfg.ctm.gan_weight, losses, "gan_g", 0.01, 10.0)
                    total = total + lam * losses["gan_g"]
                    _add(stats, {"loss_gan_g": losses["gan_g"], "lambda_gan": lam}, mb)
                self.backward(total / mb, "opt")
            _add(stats, {"loss": total, "loss_ctm": losses["ctm"]}, mb)
            fakes.append((losses["estimate"].detach(), labels))
            reals.append((x0, labels))
        stats = self.reduce_stats(stats)
        ok = self.apply("opt", self.net.parameters(), torch.tensor(stats["loss"]))
        if ok:
            ema_update(self.target, self.net, cfg.ctm.target_ema)
            for e, rate in zip(self.emas, self.tcfg.ema):
                ema_update(e, self.net, rate)
        if gan:
            self.disc.requires_grad_(True)
            self.disc.train()
            self.set_lr(self.opts["disc_opt"], cfg.ctm.disc_lr)
            d_total = torch.zeros((), device=self.device)
            for i, ((fake, lf), (real, lr_)) in enumerate(zip(fakes, reals)):
                with dist.no_sync(self.ddp_disc, sync=i == mb - 1):
                    with self.autocast():   # real and fake in one forward pass (one DDP forward per backward)
                        both = self.disc_in(torch.cat([real, fake]))
                        d_out = self.ddp_disc("forward", both, None if lr_ is None else torch.cat([lr_, lf]))
                        d_loss = gan_d_loss(*d_out.chunk(2))
                    self.backward(d_loss / mb, "disc_opt")
                d_total = d_total + d_loss.detach() / mb
            d_stats = self.reduce_stats({"loss_d": d_total})
            ok = self.apply("disc_opt", self.disc.parameters(), torch.tensor(d_stats["loss_d"])) and ok
            stats.update(d_stats)
        stats["_ok"] = ok
        return stats


def _add(stats: dict, new: dict, mb: int) -> None:
    for key, v in new.items():
        stats[key] = stats.get(key, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / mb
