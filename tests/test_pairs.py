"""Training pair draws (ctm.pairs) and the per-sample teacher solve, against exact ground truth."""

from __future__ import annotations

import pytest
import torch

from ctmkit import karras_sigmas, solve_pf_ode
from ctmkit.core.losses import ctm_pair, l2
from ctmkit.core.schedules import sample_ctm_indices, sample_k, sample_mixed_pairs, sample_uniform_pairs
from ctmkit.core.solvers import solve_grid_segments
from ctmkit.errors import UserError

from .test_ctm import exact_G


@pytest.mark.parametrize("all_the_way", [False, True])
def test_uniform_pairs_cover_every_pair_evenly_and_respect_the_order(all_the_way):
    N, M, B = 6, 3, 60000
    n, u, m = sample_uniform_pairs(B, N, M, all_the_way, torch.Generator().manual_seed(0))
    assert (n >= 0).all() and (n < u).all() and (u <= m).all() and (m <= N - 1).all()
    if all_the_way:
        assert torch.equal(u, m)
    else:
        assert ((u - n) <= M).all()
        k1 = (u - n)[(m - n) == 5]                           # pairs 5 apart: k uniform on 1..3
        freq = torch.bincount(k1, minlength=4)[1:].double() / len(k1)
        assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03)
    counts = torch.bincount(n * N + m, minlength=N * N).double()
    pairs = counts[counts > 0]
    assert len(pairs) == N * (N - 1) // 2                     # every pair n < m, nothing else
    assert (pairs / B - 1 / len(pairs)).abs().max() < 0.01   # uniformly (1/15 each)


def test_per_sample_teacher_solve_equals_separate_solves(ring):
    """Each sample moves only its own k steps along the shared grid, exactly as a solve of its own would."""
    grid, g = karras_sigmas(18), torch.Generator().manual_seed(1)
    n, u, _ = sample_uniform_pairs(64, 18, 17, False, g)
    x = ring.sample(64, g).double() + grid[n][:, None] * torch.randn(64, 2, generator=g, dtype=torch.float64)
    out = solve_grid_segments(ring, x, grid, n, u - n)
    for j in range(64):
        alone = solve_pf_ode(ring, x[j:j + 1], grid[n[j]:u[j] + 1], "heun")
        assert torch.allclose(out[j:j + 1], alone, rtol=0, atol=1e-12), j   # batched vs alone: rounding only


def test_per_sample_solve_with_one_k_is_the_reference_solve(ring):
    """With one k for the batch (the reference draw) the result is bitwise that of one batched solve."""
    grid, g = karras_sigmas(18), torch.Generator().manual_seed(2)
    k = sample_k(17, g)
    n, u, _ = sample_ctm_indices(128, 18, k, g)
    x = ring.sample(128, g).double() + grid[n][:, None] * torch.randn(128, 2, generator=g, dtype=torch.float64)
    batched = solve_pf_ode(ring, x, grid[n[None] + torch.arange(k + 1)[:, None]], "heun")
    assert torch.equal(solve_grid_segments(ring, x, grid, n, u - n), batched)


def test_per_sample_solve_pays_only_the_steps_it_needs(ring):
    calls = []

    def counting(x, sigma, labels=None):
        calls.append(x.shape[0])
        return ring(x, sigma, labels)

    grid = karras_sigmas(18)
    start, steps = torch.tensor([0, 3, 5, 9]), torch.tensor([1, 4, 2, 8])
    solve_grid_segments(counting, torch.zeros(4, 2, dtype=torch.float64), grid, start, steps)
    assert sum(calls) == 2 * int(steps.sum())              # Heun: two evaluations per sample and step


@pytest.mark.parametrize("all_the_way", [False, True])
def test_ctm_loss_vanishes_for_the_exact_flow_map_under_uniform_pairs(ring, all_the_way):
    N, gen = 40, torch.Generator().manual_seed(0)
    grid = karras_sigmas(N)
    G = exact_G(ring)
    x0 = ring.sample(256, gen).double()
    n, u, m = sample_uniform_pairs(256, N, N - 1, all_the_way, gen)
    t, tu, s = grid[n], grid[u], grid[m]
    x_t = x0 + t[:, None] * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_u = solve_grid_segments(ring, x_t, grid, n, u - n)
    est, tgt = ctm_pair(G, G, x_t, x_u, t, tu, s, torch.full_like(t, 0.002))
    assert l2(est, tgt).mean().item() < 1e-5


def test_pairs_setting_is_validated():
    from ctmkit.config import DistillConfig, load_config
    assert load_config(DistillConfig, None, None, ["ctm.pairs=uniform"]).ctm.pairs == "uniform"
    with pytest.raises(UserError, match="ctm.pairs must be one of reference, uniform, all_the_way, mixed"):
        load_config(DistillConfig, None, None, ["ctm.pairs=random"])
    with pytest.raises(UserError, match="pairs_mixed_frac must be in"):
        load_config(DistillConfig, None, None, ["ctm.pairs=mixed", "ctm.pairs_mixed_frac=1.5"])


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.5, 1.0])
def test_mixed_pairs_put_their_share_all_the_way_spread_over_the_batch(frac):
    N, k, B = 18, 5, 120
    n, u, m = sample_mixed_pairs(B, N, k, 17, frac, torch.Generator().manual_seed(0))
    i = torch.arange(B)
    far = (i + 1) * frac // 1 > i * frac // 1    # the documented spread: sample i is drawn all the way iff ...
    assert int(far.sum()) == int(B * frac)
    assert (n >= 0).all() and (n < u).all() and (u <= m).all() and (m <= N - 1).all()
    assert bool((u == m)[far].all()) and bool((u - n == k)[~far].all())     # all the way / this iteration's k
    for part in far.view(4, 30):                 # each quarter (a rank's or micro-batch's slice) gets its share
        assert abs(int(part.sum()) - 30 * frac) <= 1
    if 0 < frac < 1:                             # the all_the_way pairs are uniform over all pairs, not k-bound
        assert (m - n)[far].max() > k


@pytest.mark.parametrize("pairs", ["uniform", "all_the_way", "mixed"])
def test_distillation_runs_with_each_pair_draw_and_logs_mean_k(tmp_path, pairs):
    import json

    from ctmkit.config import DistillConfig, load_config
    from ctmkit.data import load_data
    from ctmkit.train.ctm import CTMRun
    cfg = load_config(DistillConfig, None, None, ["model.hidden=16", "model.depth=1", "model.emb_dim=16",
                                                  "ctm.gan=false", f"ctm.pairs={pairs}", "log_every=4"],
                      data="ring", teacher="exact", **{"train.steps": 4, "train.batch_size": 32})
    CTMRun(cfg, tmp_path / "ctm", load_data("ring")).fit(progress=False)
    line = json.loads((tmp_path / "ctm" / "stats.jsonl").read_text().splitlines()[-1])
    assert 1.0 <= line["k"] <= 17.0 and line["loss_ctm"] >= 0 and line["bad_steps"] == 0
