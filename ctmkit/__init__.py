"""ctmkit: Consistency Trajectory Models (Kim et al., ICLR 2024) in PyTorch: G(x_t, t, s) jumps anywhere
along the probability-flow ODE; one network gives one-step samples, multi-step gamma-sampling and scores.

The layers (docs/architecture.md): core (the maths) < nets < data < io < metrics < teachers < train / eval
< cli, demo. This module re-exports the public API."""

from .core.likelihood import log_likelihood
from .core.mixtures import EmpiricalDenoiser, GaussianMixture
from .core.precond import CTM, EDMDenoiser
from .core.sampling import gamma_sample, heun_sample, sample_schedule
from .core.schedules import karras_sigmas
from .core.solvers import flow_map, solve_pf_ode
from .errors import UserError
from .io.card import ModelCard
from .io.runs import load_model
from .teachers import load_teacher

__version__ = "0.1.0"
__all__ = ["CTM", "EDMDenoiser", "EmpiricalDenoiser", "GaussianMixture", "ModelCard", "UserError", "flow_map",
           "gamma_sample", "heun_sample", "karras_sigmas", "load_model", "load_teacher", "log_likelihood",
           "sample_schedule", "solve_pf_ode"]
