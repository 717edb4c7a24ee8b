"""ctmkit: Consistency Trajectory Models (Kim et al., ICLR 2024) in PyTorch: G(x_t, t, s) jumps anywhere
along the probability-flow ODE; one network gives one-step samples, multi-step gamma-sampling and scores."""

from .errors import UserError
from .likelihood import log_likelihood
from .loading import load_model
from .precond import CTM, EDMDenoiser
from .sampling import gamma_sample, heun_sample, sample_schedule
from .schedules import karras_sigmas
from .solvers import flow_map, solve_pf_ode
from .teachers import EmpiricalDenoiser, GaussianMixture

__version__ = "0.1.0"
__all__ = ["CTM", "EDMDenoiser", "EmpiricalDenoiser", "GaussianMixture", "UserError", "flow_map", "gamma_sample",
           "heun_sample", "karras_sigmas", "load_model", "log_likelihood", "sample_schedule", "solve_pf_ode"]
