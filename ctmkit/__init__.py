"""ctmkit: Consistency Trajectory Models (Kim et al., ICLR 2024) in PyTorch.

One network G(x_t, t, s) jumps anywhere along the probability-flow ODE of a diffusion teacher: one forward pass
gives a sample, more passes (gamma-sampling) trade speed for quality, and the same network is a denoiser.

The public API (help(ctmkit.NAME) for one; CTM and EDMDenoiser are torch modules, so help lists nn.Module's
methods under theirs):

Models and run folders
    load_model(path, ema=None)       a trained CTM or teacher (run folder or checkpoint), with its ModelCard as .card;
                                     the run's chosen weights (a post-hoc EMA, `ctmkit ema`) or EMA number `ema`
    load_teacher(spec, data=None)    a teacher SPEC (run folder, 'exact', diffusers:DIR, edm:FILE.pkl,
                                     py:MODULE:ATTR) as a denoiser D(x, sigma, labels)
    ModelCard                        a model's model.json: kind, data shape, classes, sigma range;
                                     card.to_data(x): model-space samples -> the data's own space and layout
    CTM                              the CTM network: ctm(x_t, t, s) = G(x_t, t, s), ctm.denoise(x, sigma)
    EDMDenoiser                      a preconditioned denoiser D(x, sigma) around a backbone (a teacher)

Sampling (in model space: vectors centred with std 0.5, images [N, C, H, W] in [-1, 1])
    gamma_sample(model, noise, sigmas, gamma)    CTM gamma-sampling (0: ODE jumps, 1: consistency multistep)
    sample_schedule(nfe, sigma_min, sigma_max)   the default gamma-sampling times
    heun_sample(denoiser, noise, nfe=35)         EDM's Heun sampler with any denoiser
    karras_sigmas(n, sigma_min, sigma_max)       Karras et al.'s grid of noise levels

The ODE, likelihoods and exact ground truth
    solve_pf_ode(denoiser, x, sigmas)    integrate the probability-flow ODE along the given levels
    flow_map(denoiser, x, t, s)          the ODE's flow map x_t -> x_s (what a CTM learns)
    log_likelihood(denoiser, x)          log p(x) through the probability-flow ODE
    GaussianMixture                      an exact mixture: denoiser, sampler and log-density
    EmpiricalDenoiser                    the exact denoiser of a finite data set

Errors
    UserError    a problem the user can fix; the command line shows it as one line (exit status 2)

Also: ctmkit.core.editing (zero-shot inpainting, colourisation, super-resolution, SDEdit, inversion and
interpolation on gamma_sample; `ctmkit edit`), ctmkit.metrics (sliced W1, MMD, Frechet distance, FID,
precision / recall), the command line
(`ctmkit --help`), docs/method.md (the method as implemented) and docs/architecture.md (the package's layers).
"""

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
