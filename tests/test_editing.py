"""Zero-shot editing (core/editing.py, docs/method.md section 4.1): the projection hook leaves gamma-sampling as it
was, the projection puts the observation at the level the sample is at, gamma = 1 is consistency models' algorithm,
the operators are orthogonal, and results do not depend on the batch size."""

from __future__ import annotations

import math

import pytest
import torch

from ctmkit.core.editing import (
    LUMA,
    block_mean,
    block_observation,
    block_op,
    colorize,
    colour_observation,
    colour_op,
    edit_noise,
    heun_jump,
    inpaint,
    linear_inverse,
    luminance,
    sdedit,
    slerp,
    superres,
)
from ctmkit.core.precond import CTM
from ctmkit.core.sampling import _full, gamma_sample, sample_schedule
from ctmkit.core.solvers import flow_map
from ctmkit.nets.mlp import MLP

from .test_diagnose import FlowMapCTM


def _gamma_sample_before_the_hook(model, noise, sigmas, gamma=0.0, generator=None, labels=None, step_noise=None,
                                  sigma_min=None):
    """gamma_sample as it was before the projection hook (commit 62ebc01), verbatim."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    k = len(sigmas) - 1
    if k < 1:
        raise ValueError("sigmas needs at least two levels (NFE >= 1)")
    s_min = float(sigmas[-1]) if sigma_min is None else sigma_min
    if gamma > 0 and k > 1 and step_noise is None:
        step_noise = torch.randn((noise.shape[0], k - 1, *noise.shape[1:]), generator=generator,
                                 dtype=noise.dtype).to(noise.device)
    x = noise * float(sigmas[0])
    for n in range(k):
        t, t_next = float(sigmas[n]), float(sigmas[n + 1])
        s_tilde = math.sqrt(1 - gamma**2) * (t_next - s_min) + s_min
        x = model(x, _full(t, x), _full(s_tilde, x), labels)
        if gamma > 0 and n < k - 1:
            x = x + math.sqrt(max(t_next**2 - s_tilde**2, 0.0)) * step_noise[:, n]
    return x


def _random_ctm(dim=3, classes=0):
    torch.manual_seed(0)
    model = CTM(MLP(dim, hidden=16, depth=1, emb_dim=8, num_classes=classes))
    with torch.no_grad():
        for p in model.parameters():      # the zero-initialised s embedding too: every input matters
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_without_a_hook_gamma_sampling_is_bitwise_what_it_was():
    model = _random_ctm(classes=3)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        for nfe, gamma in ((1, 0.0), (3, 0.0), (3, 0.5), (4, 1.0)):
            sig = sample_schedule(nfe)
            noise = torch.randn(5, max(nfe - 1, 1), 3, generator=torch.Generator().manual_seed(2))
            for kw in ({"step_noise": noise[:, :nfe - 1]}, {"generator": torch.Generator().manual_seed(3)}):
                g1 = {k: (torch.Generator().manual_seed(3) if k == "generator" else v) for k, v in kw.items()}
                new = gamma_sample(model, z, sig, gamma, labels=labels, **kw)
                old = _gamma_sample_before_the_hook(model, z, sig, gamma, labels=labels, **g1)
                assert torch.equal(new, old), (nfe, gamma, kw.keys())
            ident = gamma_sample(model, z, sig, gamma, labels=labels, step_noise=noise[:, :nfe - 1],
                                 project=lambda x, level, n: x)
            assert torch.equal(ident, _gamma_sample_before_the_hook(model, z, sig, gamma, labels=labels,
                                                                    step_noise=noise[:, :nfe - 1]))


class _Recorder:
    """A jump that records its inputs: G(x, t, s) = (s / t) x, the exact flow map of a point mass at 0."""

    def __init__(self):
        self.inputs, self.levels = [], []

    def __call__(self, x, t, s, labels=None):
        self.inputs.append(x.clone())
        self.levels.append((float(t[0]), float(s[0])))
        return (s / t)[:, None] * x


def test_known_entries_are_the_observation_noised_to_the_level_of_each_jump_input():
    """The design choice for a jump that lands at s~ > sigma_min (gamma < 1): known <- y + s~ e_n, then the
    re-noising carries them to y + t_{n+1} (standard normal): the forward marginal at each jump's input level."""
    n, nfe, gamma = 20000, 4, 0.6
    y = torch.tensor([[0.7, -0.3, 0.0]]).expand(n, -1)
    mask = torch.tensor([True, True, False])
    z, step, obs = edit_noise(n, nfe, (3,), seed=5)
    rec = _Recorder()
    sig = sample_schedule(nfe)
    out = inpaint(rec, z, sig, y, mask, gamma, step_noise=step, obs_noise=obs)
    assert torch.equal(out[:, :2], y[:, :2])                        # the output's known entries: y itself
    for i, x_in in enumerate(rec.inputs):
        t = rec.levels[i][0]
        assert t == pytest.approx(float(sig[i]))
        e = (x_in[:, :2] - y[:, :2]) / t                               # standardised noise of the known entries
        assert abs(float(e.mean())) < 0.02 and abs(float(e.std()) - 1) < 0.02, (i, e.mean(), e.std())
        if i > 0:                                                       # exactly: y + s~ e_n + sqrt(t^2 - s~^2) z_n
            s_prev = rec.levels[i - 1][1]
            want = y[:, :2] + s_prev * obs[:, i, :2] + math.sqrt(t**2 - s_prev**2) * step[:, i - 1, :2]
            assert torch.allclose(x_in[:, :2], want, atol=1e-5)
        else:
            assert torch.allclose(x_in[:, :2], y[:, :2] + t * obs[:, 0, :2])
    assert torch.allclose(rec.inputs[1][:, 2], rec.levels[0][1] / rec.levels[0][0] * rec.inputs[0][:, 2]
                          + math.sqrt(float(sig[1]) ** 2 - rec.levels[0][1] ** 2) * step[:, 0, 2], atol=1e-5)


def test_gamma_one_is_consistency_models_algorithm(ring):
    """Consistency models' Algorithm 4 (A = I): x ~ N(y on the known entries, T^2), jump to eps, known <- y,
    re-noise to t_n, jump, known <- y. gamma = 1 differs only by noise of std sigma_min in the known entries."""
    model, n, nfe = FlowMapCTM(ring, steps=24), 256, 4
    y = torch.tensor([[0.7071, 0.0]]).expand(n, -1)
    mask = torch.tensor([True, False])
    z, step, obs = edit_noise(n, nfe, (2,), seed=1)
    sig = sample_schedule(nfe)
    ours = inpaint(model, z, sig, y, mask, 1.0, step_noise=step, obs_noise=obs)
    x = torch.where(mask, y + float(sig[0]) * obs[:, 0], float(sig[0]) * z)
    eps = float(sig[-1])
    for i in range(nfe):
        if i > 0:
            x = x + math.sqrt(float(sig[i]) ** 2 - eps**2) * step[:, i - 1]
        x = model(x, _full(float(sig[i]), x), _full(eps, x))
        x = torch.where(mask, y, x)
    assert torch.equal(ours[:, 0], y[:, 0])
    assert (ours - x).abs().max() < 5e-3, (ours - x).abs().max()


def test_the_operators_are_orthogonal_and_their_first_coefficient_is_the_observation():
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for op, coef0, obs in ((colour_op(), lambda v: v[:, :1], luminance(x)),
                           (block_op(3), lambda v: v[:, :, 0], block_mean(x, 3))):
        c = op.fwd(x)
        assert torch.allclose(op.inv(c), x, atol=1e-12) and torch.allclose(c.norm(), x.norm())
        scale = math.sqrt(sum(w * w for w in LUMA)) if c.shape[1] == 3 and c.ndim == 4 else 1 / 3
        assert torch.allclose(coef0(c) * scale, obs, atol=1e-12)
    # projecting at level 0 keeps the free coefficients and sets the known ones
    gray = luminance(x)
    obs, known = colour_observation(gray)
    op = colour_op()
    proj = op.inv(torch.where(known, obs, op.fwd(torch.zeros_like(x))))
    assert torch.allclose(luminance(proj), gray, atol=1e-12)
    low = block_mean(x, 2)
    obs, known = block_observation(low, 2)
    op = block_op(2)
    proj = op.inv(torch.where(known, obs, op.fwd(x.flip(0))))
    assert torch.allclose(block_mean(proj, 2), low, atol=1e-12)
    assert torch.allclose(proj - block_mean(proj, 2).repeat_interleave(2, 2).repeat_interleave(2, 3),
                          x.flip(0) - block_mean(x.flip(0), 2).repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.equal(block_op(1).fwd(x)[:, :, 0], x)                # F = 1: the identity


def test_edits_do_not_depend_on_the_batch_size():
    model = _random_ctm(dim=4)
    y, mask = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 0, 1, 0])
    sig = sample_schedule(3)

    def run(start, b):
        z, step, obs = edit_noise(b, 3, (4,), seed=9, start=start)
        return inpaint(model, z, sig, y[start:start + b], mask, 0.5, step_noise=step, obs_noise=obs)

    with torch.no_grad():
        whole, parts = run(0, 6), torch.cat([run(0, 2), run(2, 3), run(5, 1)])
    assert torch.allclose(whole, parts, atol=1e-6) and torch.equal(whole[:, [0, 2]], y[:, [0, 2]])


def test_sdedit_starts_at_the_noised_guide_and_a_small_t0_keeps_it():
    rec = _Recorder()
    guide, z = torch.randn(4, 3), torch.randn(4, 3)
    sig = sample_schedule(2, 0.002, 5.0)
    sdedit(rec, guide, z, sig)
    assert torch.equal(rec.inputs[0], z * 5.0 + guide) and rec.levels[0][0] == 5.0
    out = sdedit(FlowMapCTM(_two_points(), steps=16), guide.double()[:, :2], z.double()[:, :2],
                 sample_schedule(1, 0.002, 0.01))
    assert (out - guide.double()[:, :2]).abs().max() < 0.03


def _two_points():
    from ctmkit.core.mixtures import GaussianMixture
    return GaussianMixture([[1.0, 0.0], [-1.0, 0.0]], [0.5, 0.5], [1, 1])


def test_slerp_ends_at_its_inputs_and_keeps_the_norm_of_orthogonal_noises():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    p = slerp(a, b, torch.linspace(0, 1, 5))
    assert p.shape == (1, 5, 3) and torch.allclose(p[0, 0], a[0]) and torch.allclose(p[0, -1], b[0], atol=1e-7)
    assert torch.allclose(p.norm(dim=-1), torch.ones(1, 5)) and torch.allclose(p[0, 2, :2], torch.full((2,), 0.5**0.5))
    assert torch.allclose(slerp(a, 2 * a, torch.tensor([0.5]))[0, 0], 1.5 * a[0])     # parallel: linear


def test_a_teacher_edits_with_heun_steps_between_the_projections(ring):
    jump = heun_jump(ring, steps=3)
    x, t, s = torch.randn(8, 2, dtype=torch.float64), torch.full((8,), 5.0), torch.full((8,), 0.5)
    assert torch.equal(jump(x, t, s), flow_map(ring, x, t, s, 3))
    y, mask = torch.tensor([[0.7, 0.0]], dtype=torch.float64).expand(8, -1), torch.tensor([True, False])
    out = inpaint(jump, torch.randn(8, 2, dtype=torch.float64), sample_schedule(3), y, mask, 1.0,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], y[:, 0]) and out.isfinite().all()


def test_superres_and_colorize_shapes_on_a_tiny_random_image_model():
    from ctmkit.nets.unet import UNet
    torch.manual_seed(0)
    model = CTM(UNet(3, 8, model_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=())).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    sig = sample_schedule(2)
    with torch.no_grad():
        z, step, obs = edit_noise(2, 2, (3, 8, 8), seed=0)
        up = superres(model, z, sig, block_mean(x, 4), 4, 0.5, step_noise=step, obs_noise=obs)
        col = linear_inverse(model, z, sig, *colour_observation(luminance(x)), colour_op(), 0.5, step_noise=step,
                             obs_noise=obs)
    assert up.shape == col.shape == x.shape
    assert torch.allclose(block_mean(up, 4), block_mean(x, 4), atol=1e-5)
    assert torch.allclose(luminance(col), luminance(x), atol=1e-5)


# ---- exact verification: the posterior of an isotropic Gaussian mixture ---------------------------------------------
def _mixture(means, std, weights):
    from ctmkit.core.mixtures import GaussianMixture
    return GaussianMixture(torch.tensor(means, dtype=torch.float64), [std] * len(means), weights)


def test_the_exact_conditional_is_the_joint_over_the_marginal(gmm10):
    from ctmkit.core.mixtures import GaussianMixture
    known = torch.zeros(10, dtype=torch.bool)
    known[[1, 4, 7]] = True
    x = gmm10.sample(64, torch.Generator().manual_seed(0), torch.float64)
    y = gmm10.sample(64, torch.Generator().manual_seed(1), torch.float64)
    x_obs = torch.where(known, y, x)                                  # x_O = y_O
    marginal = GaussianMixture(gmm10.means[:, known], gmm10.stds, gmm10.weights)
    want = gmm10.log_prob(x_obs) - marginal.log_prob(y[:, known])
    assert torch.allclose(gmm10.conditional_log_prob(x, y, known), want, atol=1e-9)
    draws = gmm10.conditional_sample(y[:2], known, 20000, torch.Generator().manual_seed(2))
    assert torch.equal(draws[:, :, known], y[:2, None, known].expand(-1, 20000, -1))
    w = gmm10.conditional_log_weights(y[:2], known).exp()
    mean = w @ gmm10.means[:, ~known]                                 # E[x_U | x_O = y_O]
    assert (draws[:, :, ~known].mean(1) - mean).abs().max() < 0.02
    with pytest.raises(ValueError, match="entries"):
        gmm10.conditional_log_weights(y, known[:4])


def _ratio_to_posterior(samples, gmm, y, known, pairs=4):
    """Sliced W1 of samples [N, D] to exact posterior draws given y [1, D], over the floor (mean of `pairs` pairs
    of exact sets of the same size); the model's distance is averaged over two exact sets."""
    n = samples.shape[0]
    ex = [gmm.conditional_sample(y, known, n, torch.Generator().manual_seed(100 + i))[0] for i in range(2 * pairs)]
    proj = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    from ctmkit.metrics.swd import sliced_w1
    floor = sum(sliced_w1(ex[2 * i], ex[2 * i + 1], 64, proj()) for i in range(pairs)) / pairs
    return sum(sliced_w1(samples, ex[i], 64, proj()) for i in range(2)) / 2 / floor


def test_inpainting_with_the_exact_flow_map_approaches_the_exact_posterior():
    """Observe x, infer y: the observation picks the pair of components (x = +-1.5), whose y-modes (+-0.4) carry
    weights 3:1 or 1:3; the y-marginal is 1:1, so the coupling shows. Replacement is approximate (method.md 4.1);
    here the observation settles the pair at noise levels above those where y takes shape, and gamma = 1 with many
    steps approaches the exact posterior; a mask on the wrong coordinate is far off."""
    gmm = _mixture([[-1.5, 0.4], [-1.5, -0.4], [1.5, 0.4], [1.5, -0.4]], 0.15, [1, 3, 3, 1])
    model, n = FlowMapCTM(gmm, steps=16), 8000
    y, known = torch.tensor([[1.5, 0.0]], dtype=torch.float64), torch.tensor([True, False])

    def ratio(nfe, mask):
        z, step, obs = edit_noise(n, nfe, (2,), seed=0)
        x = inpaint(model, z.double(), sample_schedule(nfe), y.expand(n, -1), mask, 1.0, step_noise=step.double(),
                    obs_noise=obs.double())
        return _ratio_to_posterior(x, gmm, y, known)

    few, many, wrong = ratio(8, known), ratio(32, known), ratio(8, ~known)
    assert many < 2.0 and few > 2 * many and wrong > 10 * many, (few, many, wrong)


def test_invert_then_the_exact_flow_map_returns_the_input(ring):
    from ctmkit.core.editing import inversion_schedule, invert
    x = ring.sample(128, torch.Generator().manual_seed(0), torch.float64)
    z = invert(ring, x, inversion_schedule(256))
    assert abs(float(z.std()) - 1) < 0.1                            # standard-normal scale
    back = flow_map(ring, z * 80.0, 80.0, 0.002, 256)
    assert float(((back - x).norm(dim=1) / x.norm(dim=1)).max()) < 1e-3
    with pytest.raises(ValueError, match="increasing"):
        invert(ring, x, inversion_schedule(4).flip(0))


def test_colourisation_with_the_exact_flow_map_on_a_three_channel_mixture():
    """A mixture of 3 x 2 x 2 images built in the colour basis (luminance coefficients well apart, chroma less):
    its colour coefficients form the same isotropic mixture with means A mu_k, whose exact conditional given the
    luminance coefficients is the ground truth."""
    from ctmkit.core.mixtures import GaussianMixture
    shape, op = (3, 2, 2), colour_op()
    coef = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    coef[:, 0] = torch.tensor([-1.2, -0.4, 0.4, 1.2], dtype=torch.float64)[:, None, None] + 0.2 * coef[:, 0]
    gmm = GaussianMixture(op.inv(coef).reshape(4, -1), [0.15] * 4, [1] * 4)
    in_coef = GaussianMixture(coef.reshape(4, -1), [0.15] * 4, [1] * 4)

    def den(x, s, labels=None):
        return gmm(x.reshape(len(x), -1), s).reshape(x.shape)

    def jump(x, t, s, labels=None):
        return flow_map(den, x, t, s, 16)

    x0 = gmm.sample(1, torch.Generator().manual_seed(3), torch.float64).reshape(1, *shape)
    known = torch.zeros(shape, dtype=torch.bool)
    known[0] = True
    n, nfe = 4000, 32
    z, step, obs = edit_noise(n, nfe, shape, seed=0)
    gray = luminance(x0).expand(n, -1, -1, -1)
    out = colorize(jump, z.double(), sample_schedule(nfe), gray, 1.0, step_noise=step.double(),
                   obs_noise=obs.double())
    assert torch.allclose(luminance(out), gray, atol=1e-6)
    flat = lambda v: op.fwd(v.reshape(-1, *shape)).reshape(len(v), -1)  # noqa: E731
    r = _ratio_to_posterior(flat(out), in_coef, flat(x0), known.reshape(-1))
    prior = gmm.sample(n, torch.Generator().manual_seed(5), torch.float64).reshape(n, *shape)
    c_obs, c_known = colour_observation(luminance(x0))
    prior_chroma = op.inv(torch.where(c_known, c_obs, op.fwd(prior)))   # the luminance set, the colours of the prior
    r_prior = _ratio_to_posterior(flat(prior_chroma), in_coef, flat(x0), known.reshape(-1))
    assert r < 2.0 and r_prior > 10 * r, (r, r_prior)
