"""Core math against exact ground truth: Karras grid, EDM scalings, the exact GMM denoiser, PF-ODE solvers."""

import math

import pytest
import torch

from ctmkit import CTM, EmpiricalDenoiser, GaussianMixture, flow_map, heun_sample, karras_sigmas, solve_pf_ode
from ctmkit.core.precond import c_in, c_noise, c_out, c_skip
from ctmkit.core.schedules import heun_schedule, sample_ctm_indices, sample_dsm_sigmas, sample_k, sample_schedule
from ctmkit.metrics import swd_ratio


def test_karras_grid_endpoints_and_order():
    s = karras_sigmas(18)
    assert s.shape == (18,)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert (s[:-1] > s[1:]).all()
    # rho = 7 spacing: t^(1/7) is linear in i
    r = s ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[1] - r[0]).expand(17), atol=1e-12)


def test_reference_schedules():
    assert sample_schedule(1).tolist() == pytest.approx([80.0, 0.002])
    assert sample_schedule(2).tolist() == pytest.approx([80.0, 2.5152, 0.002], rel=1e-4)
    h = heun_schedule(35)
    assert len(h) == 19 and h[-1] == 0 and h[0] == pytest.approx(80.0)


def test_edm_scalings():
    t = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    sd = 0.5
    # c_skip(t) + c_out(t)^2 / sd^2 ... EDM identities: unit-variance training target
    assert torch.allclose(c_skip(t, sd) ** 2 * (t**2 + sd**2) - 2 * c_skip(t, sd) * sd**2 + sd**2, c_out(t, sd) ** 2)
    assert torch.allclose(c_in(t, sd) ** 2 * (t**2 + sd**2), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(c_noise(t), t.log() / 4)


def test_ctm_index_sampling_respects_order():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        k = sample_k(17, g)
        assert 1 <= k <= 17
        n, u, m = sample_ctm_indices(512, 18, k, g)
        assert (u == n + k).all() and (m >= u).all() and (m <= 17).all() and (n >= 0).all()
    ks = torch.tensor([sample_k(4, g) for _ in range(4000)])
    freq = torch.bincount(ks, minlength=5)[1:].double() / 4000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.03)


def test_dsm_sigmas_mix():
    s = sample_dsm_sigmas(10000, generator=torch.Generator().manual_seed(0))
    kar, logn = s[:5000], s[5000:]
    lowest = (80 ** (1 / 7) + 0.7 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # 70 % down the Karras curve
    assert kar.min() >= lowest - 1e-9 and kar.max() <= 80.0
    assert logn.log().mean().item() == pytest.approx(-1.2, abs=0.05)
    assert logn.log().std().item() == pytest.approx(1.2, abs=0.05)


@pytest.mark.parametrize("method,order", [("heun", 2), ("euler", 1)])
def test_solver_order_of_convergence(ring, method, order):
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80
    ref = solve_pf_ode(ring, x, karras_sigmas(4097, 0.002, 80.0), "heun")
    errs = [(solve_pf_ode(ring, x, karras_sigmas(n + 1), method) - ref).norm(dim=1).mean().item()
            for n in (32, 64, 128)]
    ratios = [errs[i] / errs[i + 1] for i in range(2)]
    for r in ratios:  # halving the step divides the error by 2^order
        assert 2**order * 0.75 < r < 2**order * 1.35, (errs, ratios)


def _mc_posterior_mean(gmm: GaussianMixture, x: torch.Tensor, sigma: float, n: int, gen) -> torch.Tensor:
    """Self-normalised importance sampling estimate of E[x0 | x_t = x], independent of the closed form.
    Proposal N(x, sigma^2) (weights p(x0)) for small sigma, the prior (weights N(x; x0, sigma^2)) for large."""
    out = []
    for xi in x:
        if sigma < 1.0:
            x0 = xi + sigma * torch.randn(n, x.shape[1], generator=gen, dtype=torch.float64)
            logw = gmm.log_prob(x0)
        else:
            x0 = gmm.sample(n, gen).double()
            logw = -0.5 * ((xi - x0) ** 2).sum(1) / sigma**2
        w = torch.softmax(logw, 0)
        out.append((w[:, None] * x0).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("dim", [1, 2, 10])
@pytest.mark.parametrize("sigma", [0.05, 3.0])
def test_gmm_denoiser_matches_monte_carlo(dim, sigma):
    g = torch.Generator().manual_seed(dim)
    gmm = GaussianMixture(torch.randn(3, dim, generator=g, dtype=torch.float64) * 1.5, [0.3, 0.6, 0.45], [1, 2, 1])
    x = gmm.sample(6, g).double() + sigma * torch.randn(6, dim, generator=g, dtype=torch.float64)
    exact = gmm(x, sigma)
    mc = _mc_posterior_mean(gmm, x, sigma, 200_000, g)
    assert (exact - mc).norm(dim=1).max().item() < 0.02 * math.sqrt(dim), (exact - mc)
    # an oracle sanity check of the oracle itself: the far-from-data limit (sigma -> inf) is the prior mean
    assert torch.allclose(gmm(x, 1e5), (gmm.weights[:, None] * gmm.means).sum(0).expand_as(x), atol=1e-3)


def test_gmm_log_prob_integrates_to_one_in_1d():
    gmm = GaussianMixture([[-1.0], [0.5], [2.0]], [0.2, 0.5, 0.1], [1, 1, 2])
    grid = torch.linspace(-6, 6, 200_001, dtype=torch.float64)[:, None]
    p = gmm.log_prob(grid).exp()
    assert torch.trapezoid(p, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-6)
    # convolved with N(0, sigma^2): still a density
    p2 = gmm.log_prob(grid, sigma=0.7).exp()
    assert torch.trapezoid(p2, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-5)


def test_gmm_denoiser_is_tweedie(gmm10):
    """D(x, t) = x + t^2 grad log p_t(x) (Tweedie), with grad from autograd of log_prob."""
    x = gmm10.sample(16, torch.Generator().manual_seed(0)).double() + 0.7 * torch.randn(16, 10, dtype=torch.float64)
    x.requires_grad_(True)
    score = torch.autograd.grad(gmm10.log_prob(x, sigma=0.7).sum(), x)[0]
    assert torch.allclose(gmm10(x.detach(), 0.7), x.detach() + 0.49 * score, atol=1e-10)


def test_gmm_denoiser_stable_at_extreme_sigmas(gmm10):
    x = torch.randn(8, 10, dtype=torch.float64) * 200
    for s in (1e-4, 0.002, 80.0, 500.0):
        assert torch.isfinite(gmm10(x, s)).all()


def test_heun_with_exact_denoiser_reproduces_mixture(ring):
    samples = [heun_sample(ring, torch.randn(2000, 2, generator=torch.Generator().manual_seed(s), dtype=torch.float64),
                           nfe=35).float() for s in range(4)]
    r = swd_ratio(samples, lambda n, g: ring.sample(n, g))
    assert r["ratio"] < 1.5, r


def test_empirical_denoiser_matches_mixture_of_diracs():
    pts = torch.randn(50, 3, dtype=torch.float64)
    emp = EmpiricalDenoiser(pts, chunk=7)
    gmm = GaussianMixture(pts, torch.zeros(50), torch.ones(50))
    x = torch.randn(20, 3, dtype=torch.float64)
    for s in (0.01, 0.5, 20.0):
        assert torch.allclose(emp(x, s), gmm(x, s), atol=1e-12)
    assert torch.allclose(emp(pts, 1e-4), pts, atol=1e-6)  # memorises: at tiny sigma each point maps to itself


def test_flow_map_identity_and_composition(ring):
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    t = torch.full((32,), 5.0, dtype=torch.float64)
    assert torch.equal(flow_map(ring, x, t, t), x)
    direct = flow_map(ring, x, 5.0, 0.1, steps=1024)  # a flow map composes: 5 -> 0.1 = (1 -> 0.1) o (5 -> 1)
    twostep = flow_map(ring, flow_map(ring, x, 5.0, 1.0, steps=1024), 1.0, 0.1, steps=1024)
    assert (direct - twostep).abs().max() < 1e-5


def test_ctm_jump_identity_at_s_equals_t():
    from ctmkit.nets.mlp import MLP
    torch.manual_seed(0)
    model = CTM(MLP(2, hidden=32, depth=2, emb_dim=16))
    torch.nn.init.normal_(model.backbone.out.weight)
    x = torch.randn(16, 2)
    t = torch.rand(16) * 10 + 0.01
    assert torch.equal(model(x, t, t), x)
    assert not torch.allclose(model(x, t, t / 2), x)


def test_mmd_rbf_matches_the_closed_form_for_gaussians():
    """Squared MMD with one RBF kernel (bandwidth h) between N(0, I_d) and N(m, I_d):
    2 (h^2 / (h^2 + 2))^(d/2) (1 - exp(-|m|^2 / (2 (h^2 + 2)))); and about 0 for equal distributions."""
    import math

    from ctmkit.metrics import mmd_rbf
    g = torch.Generator().manual_seed(0)
    d, h, n = 2, 1.0, 3000
    m = torch.tensor([1.0, 0.5])
    a, b, c = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))
    exact = 2 * (h * h / (h * h + 2)) ** (d / 2) * (1 - math.exp(-float(m @ m) / (2 * (h * h + 2))))
    assert abs(mmd_rbf(a, b + m, (h,)) - exact) < 0.1 * exact, exact
    assert abs(mmd_rbf(a, c, (h,))) < 0.1 * exact
