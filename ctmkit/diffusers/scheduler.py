"""`CTMScheduler`: CTM gamma-sampling (docs/method.md section 4) with diffusers' `set_timesteps` / `step` API.

The timesteps are EDM sigmas t_0 > ... > t_{K-1} (the last level t_K = sigma_min is where sampling ends). As TCD
does for its consistency model, the scheduler owns the jump and the re-noising; the network gives g(x_t, t, s):
    s~_n = sqrt(1 - gamma^2) (t_{n+1} - sigma_min) + sigma_min                 (`jump_target`)
    x <- G(x, t_n, s~_n) = (s~_n / t_n) x + (1 - s~_n / t_n) g               (`step`)
    x <- x + sqrt(t_{n+1}^2 - s~_n^2) z_n                                    (not after the last jump)
exactly as ctmkit.core.sampling.gamma_sample computes it, so the two agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..core.precond import ctm_jump
from ..core.sampling import sample_schedule
from ..errors import UserError
from ..eval.generate import check_times


@dataclass
class CTMSchedulerOutput(BaseOutput):
    """prev_sample: x at the next level t_{n+1} (re-noised), or the sample after the last jump."""

    prev_sample: torch.Tensor


class CTMScheduler(SchedulerMixin, ConfigMixin):
    """gamma-sampling for a CTM: `sigma_min`, `sigma_max` its noise range, `rho` the Karras spacing of the default
    times, `num_train_timesteps` the points of its training grid (ctm.num_scales; informative), `gamma` in [0, 1]
    (0: deterministic jumps along the ODE, 1: consistency-model multistep)."""

    order = 1

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 num_train_timesteps: int | None = None, gamma: float = 0.0) -> None:
        self.sigmas = self.timesteps = self.targets = None
        self.gamma = gamma
        self.init_noise_sigma = float(sigma_max)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, gamma: float | None = None) -> None:
        """K jumps on the default Karras times (`num_inference_steps` = K = NFE), or custom EDM `sigmas`
        t_0 > ... > t_K inside [sigma_min, sigma_max] (ctmkit sample's --ts); `gamma` (default: the config's)."""
        cfg = self.config
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError("give num_inference_steps or sigmas, not both (sigmas set the steps: their number - 1)")
        gamma = cfg.gamma if gamma is None else float(gamma)
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if sigmas is None:
            if int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
            sched, s_min = sample_schedule(int(num_inference_steps), cfg.sigma_min, cfg.sigma_max, cfg.rho), None
        else:
            try:
                sched, s_min = check_times(sigmas, cfg.sigma_min, cfg.sigma_max), cfg.sigma_min
            except UserError as e:
                raise ValueError(str(e).replace("--ts", "sigmas")) from None
        s_min = float(sched[-1]) if s_min is None else s_min      # as gamma_sample: the schedule's end, or the model's
        self.gamma, self.sigmas = gamma, sched
        self.targets = [math.sqrt(1 - gamma**2) * (float(t) - s_min) + s_min for t in sched[1:]]
        self.timesteps = sched[:-1].to(device) if device is not None else sched[:-1]
        self.init_noise_sigma = float(sched[0])

    def index_for_timestep(self, timestep) -> int:
        """n, the position of t_n among the timesteps."""
        if self.sigmas is None:
            raise ValueError("call set_timesteps first")
        hits = (self.sigmas[:-1] == float(timestep)).nonzero()
        if len(hits) != 1:
            raise ValueError(f"{float(timestep):g} is not one of this schedule's timesteps")
        return int(hits[0])

    def jump_target(self, timestep) -> float:
        """s~_n, the level the network jumps to from t_n (the network's second time input)."""
        return self.targets[self.index_for_timestep(timestep)]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """The jump G(x_t, t_n, s~_n) from the network's g(x_t, t_n, s~_n) (`model_output`, same shape as `sample`),
        then, for gamma > 0 and before the last jump, the re-noising up to t_{n+1} with `noise` (standard normal like
        the sample; default: drawn from `generator`)."""
        n = self.index_for_timestep(timestep)
        t, s = float(self.sigmas[n]), self.targets[n]
        x = ctm_jump(sample, noise_level(t, sample), noise_level(s, sample), model_output)
        if self.gamma > 0 and n < len(self.targets) - 1:
            if noise is None:
                noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype).to(sample.device)
            t_next = float(self.sigmas[n + 1])
            x = x + math.sqrt(max(t_next**2 - s**2, 0.0)) * noise.to(x.device, x.dtype)
        return CTMSchedulerOutput(prev_sample=x) if return_dict else (x,)

    def __len__(self) -> int:
        return 0 if self.targets is None else len(self.targets)


def noise_level(v, x: torch.Tensor) -> torch.Tensor:
    """A noise level per sample, as gamma_sample passes it: Tensor[B] float32 (float64 for a float64 x)."""
    return torch.full((x.shape[0],), float(v), device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else
                      torch.float32)
