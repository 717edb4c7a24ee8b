"""Post-hoc EMA (core/phema.py) held against exact arithmetic: the width of the discrete power-function update, and
EMAs of other widths reconstructed from snapshots against the same EMAs tracked step by step."""

from __future__ import annotations

import numpy as np
import pytest

from ctmkit.core.phema import (
    SIGMA_REL_MAX,
    gamma_to_sigma_rel,
    phema_coefficients,
    power_beta,
    sigma_rel_to_gamma,
)


def test_sigma_rel_and_gamma_invert_each_other_with_the_papers_values():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)    # the paper's two training profiles
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.005, 0.03, 0.1, 0.2, 0.29):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.5):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_the_discrete_update_averages_with_the_width_of_eq3(sigma_rel):
    """Unrolled, theta_hat_T = sum_tau w_tau theta_tau with w_tau = (1 - beta_tau) prod_{k > tau} beta_k; the standard
    deviation of tau / T under w is sigma_rel (the continuous profile's), up to the discretisation."""
    g, T = sigma_rel_to_gamma(sigma_rel), 20000
    beta = np.array([power_beta(t, g) for t in range(1, T + 1)])
    w = (1 - beta) * np.append(np.cumprod(beta[::-1])[::-1][1:], 1.0)
    tau = np.arange(1, T + 1) / T
    mean = (w * tau).sum()
    assert w.sum() == pytest.approx(1.0, abs=1e-12) and beta[0] == 0.0      # step 1 takes theta_1 whole
    assert np.sqrt((w * (tau - mean) ** 2).sum()) == pytest.approx(sigma_rel, rel=1e-6)   # measured: 4e-8


def _track(theta: np.ndarray, gammas: dict, every: int, keep: tuple) -> tuple[list, dict]:
    """Run power EMAs of `gammas` over the trajectory theta [T, D]; snapshots of 'a' and 'b' every `every` steps,
    and every EMA at the steps in `keep`."""
    ema = {k: np.zeros(theta.shape[1]) for k in gammas}
    snaps, kept = [], {}
    for t in range(1, len(theta) + 1):
        for k, g in gammas.items():
            b = power_beta(t, g)
            ema[k] = b * ema[k] + (1 - b) * theta[t - 1]
        if t % every == 0:
            snaps += [(t, gammas["a"], ema["a"].copy()), (t, gammas["b"], ema["b"].copy())]
        if t in keep:
            kept.update({(t, k): v.copy() for k, v in ema.items()})
    return snaps, kept


def test_an_ema_of_another_width_is_rebuilt_from_snapshots_of_two():
    rng = np.random.default_rng(0)
    T, D = 4000, 64                       # a drifting random walk: the EMAs of different widths differ clearly
    theta = np.cumsum(rng.normal(size=(T, D)), 0) * 0.01 + np.linspace(0, 1, T)[:, None] * rng.normal(size=D)
    widths = {"a": 0.05, "b": 0.10, "narrow": 0.03, "mid": 0.07, "wide": 0.15}
    gammas = {k: sigma_rel_to_gamma(s) for k, s in widths.items()}
    snaps, kept = _track(theta, gammas, every=200, keep=(3000, T))
    steps, gam, W = [s[0] for s in snaps], [s[1] for s in snaps], np.stack([s[2] for s in snaps])
    for t in (3000, T):
        for k in ("narrow", "mid", "wide"):
            want = kept[(t, k)]
            got = phema_coefficients(steps, gam, t, gammas[k]) @ W
            averaging = np.abs(want - theta[t - 1]).mean()        # how far the EMA itself moves from theta_t
            # the continuous profiles stand for the discrete updates and 40 snapshots span the wanted profile only
            # approximately: measured at most 1.8 % of the averaging distance (narrow, t = 3000); 5 % allowed. An
            # EMA of another listed width is 25 % to 100 % away, so a wrong gamma or time fails by far.
            assert np.abs(got - want).mean() < 0.05 * averaging, (t, k)
            others = [kept[(t, o)] for o in ("narrow", "mid", "wide") if o != k]
            assert all(np.abs(o - want).mean() > 0.2 * averaging for o in others)


def test_a_snapshots_own_profile_is_that_snapshot():
    steps, gammas = [100, 200, 300, 100, 200, 300], [16.97] * 3 + [6.94] * 3
    x = phema_coefficients(steps, gammas, 200, 6.94)
    assert np.allclose(x, np.eye(6)[4], atol=1e-6)
    with pytest.raises(ValueError, match="last snapshot"):
        phema_coefficients(steps, gammas, 301, 6.94)


# ---- a training run's snapshots and `ctmkit ema` ---------------------------------------------------------------
def _distill(out, steps=32, extra=()):
    from ctmkit.config import DistillConfig, load_config
    from ctmkit.data import load_data
    from ctmkit.train.ctm import CTMRun
    cfg = load_config(DistillConfig, None, None, ["model.hidden=16", "model.depth=1", "ctm.gan=false",
                                                  "train.phema_every=8", "ckpt_every=16", *extra],
                      data="ring", teacher="exact", **{"train.steps": steps, "train.batch_size": 32})
    return CTMRun(cfg, out, load_data("ring"))


def test_a_run_snapshots_its_profiles_and_resumes_them_exactly(tmp_path):
    import torch
    from safetensors.torch import load_file

    from ctmkit.io.phema import list_snapshots

    from .test_lr_schedule import stop_at
    run = _distill(tmp_path / "a")
    run.fit(progress=False)
    snaps = list_snapshots(tmp_path / "a")
    assert [(s.step, s.sigma_rel) for s in snaps] == [(t, w) for t in (8, 16, 24, 32) for w in (0.05, 0.1)]
    assert snaps[0].gamma == pytest.approx(sigma_rel_to_gamma(0.05), rel=1e-12)
    for i in range(2):                              # the last snapshots are the profiles the run holds
        last = load_file(str(snaps[-2 + i].path))
        assert all(torch.equal(last[k], v) for k, v in run.phemas[i].state_dict().items())
    stop_at(_distill(tmp_path / "b"), 12)                                 # interrupted at 12 ...
    resumed = _distill(tmp_path / "b", steps=32)
    resumed.resume = True
    resumed.fit(progress=False)                                          # ... and resumed to 32
    for a, b in zip(snaps, list_snapshots(tmp_path / "b")):             # same code, same machine: bitwise
        assert (a.step, a.sigma_rel) == (b.step, b.sigma_rel)
        wa, wb = load_file(str(a.path)), load_file(str(b.path))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_finished_distillation_samples_the_post_hoc_ema_of_its_width(tmp_path):
    """ctm.sample_sigma_rel (default 0.05): the run samples that width rebuilt at the last step; 0: the training
    EMA; train.phema=[]: the training EMA too, with a warning."""
    import torch

    from ctmkit import load_model
    from ctmkit.io.phema import rebuild
    x, t = torch.randn(8, 2), torch.full((8,), 3.0)
    for name, extra, width in (("d", (), 0.05), ("w", ("ctm.sample_sigma_rel=0.1",), 0.1),
                               ("z", ("ctm.sample_sigma_rel=0",), None), ("n", ("train.phema=[]",), None)):
        _distill(tmp_path / name, steps=24, extra=extra).fit(progress=False)
        model = load_model(tmp_path / name)
        if width is None:
            assert model.card.sampled is None
            assert torch.equal(model(x, t, t / 2), load_model(tmp_path / name, ema=0)(x, t, t / 2))
            continue
        assert model.card.sampled["phema"] == {"sigma_rel": width, "step": 24}
        want = rebuild(tmp_path / name, width)[0]
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
        assert not torch.allclose(model(x, t, t / 2), load_model(tmp_path / name, ema=0)(x, t, t / 2))


def test_ema_command_rebuilds_records_and_resets_the_sampled_weights(tmp_path):
    import torch
    from click.testing import CliRunner

    from ctmkit import load_model
    from ctmkit.cli import main
    from ctmkit.io.phema import list_snapshots, rebuild
    _distill(tmp_path / "r").fit(progress=False)
    run = str(tmp_path / "r")
    x, t = torch.randn(8, 2), torch.full((8,), 3.0)
    before = load_model(run, ema=0)(x, t, t / 2)                         # the training EMA
    res = CliRunner().invoke(main, ["ema", run, "--sigma-rel", "0.1", "--step", "24"])
    assert res.exit_code == 0 and "sigma_rel 0.1 at step 24" in res.output, res.output
    snap = next(s for s in list_snapshots(run) if (s.step, s.sigma_rel) == (24, 0.1))
    chosen = load_model(run)
    # the width and step of a snapshot give back that snapshot (least squares, float64: rounding only)
    want = {k: v for k, v in chosen.state_dict().items()}
    for k, v in rebuild(run, 0.1, 24)[0].items():
        assert torch.equal(want[k], v)
    from safetensors.torch import load_file
    for k, v in load_file(str(snap.path)).items():
        assert torch.allclose(want[k], v, rtol=1e-5, atol=1e-6), k
    assert chosen.card.sampled["phema"] == {"sigma_rel": 0.1, "step": 24}
    assert torch.equal(load_model(run, ema=0)(x, t, t / 2), before)     # the training EMA stays loadable
    assert not torch.allclose(chosen(x, t, t / 2), before)
    assert CliRunner().invoke(main, ["ema", run, "--reset"]).exit_code == 0
    for against in (["--teacher", "exact"], ["--data", "ring"]):        # measured, nothing chosen
        res = CliRunner().invoke(main, ["ema", run, "--sweep", "0.05,0.2", *against, "--n", "64", "--nfe", "1"])
        assert res.exit_code == 0 and "sigma_rel 0.2" in res.output and "lowest at NFE 1" in res.output, res.output
    assert load_model(run).card.sampled is None
    assert torch.equal(load_model(run)(x, t, t / 2), before) and load_model(run).card.sampled is None


@pytest.mark.parametrize("args, words", [(["--sigma-rel", "0.4"], "sigma_rel must be in"),
                                         (["--sigma-rel", "0.1", "--step", "99"], "outside the snapshots"),
                                         (["--sweep", "0.1"], "give --teacher"),
                                         (["--sweep", "0.1", "--teacher", "exact", "--data", "ring"], "not both"),
                                         (["--sweep", "0.1,x", "--teacher", "exact"], "comma-separated widths"),
                                         (["--reset", "--sigma-rel", "0.1"], "one of")])
def test_ema_command_bad_requests_are_one_line(tmp_path, args, words):
    from click.testing import CliRunner

    from ctmkit.cli import main
    _distill(tmp_path / "r", steps=8).fit(progress=False)
    res = CliRunner().invoke(main, ["ema", str(tmp_path / "r"), *args])
    assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output


def test_a_run_without_snapshots_says_how_to_get_them(tmp_path):
    from click.testing import CliRunner

    from ctmkit.cli import main
    _distill(tmp_path / "r", steps=8, extra=["train.phema=[]"]).fit(progress=False)
    assert not (tmp_path / "r" / "phema").exists()
    res = CliRunner().invoke(main, ["ema", str(tmp_path / "r"), "--sigma-rel", "0.1"])
    assert res.exit_code == 2 and "no post-hoc EMA snapshots" in res.output


def test_the_sweep_measures_what_diagnose_measures(ring, tmp_path):
    from ctmkit.eval.diagnostics import coupled_sweep, diagnose

    from .test_diagnose import FlowMapCTM
    models = [("exact", FlowMapCTM(ring, steps=32)), ("wrong", FlowMapCTM(ring, steps=2))]
    sweep = coupled_sweep(models[0][1].card, iter(models), ring, n=32, nfes=(1, 2), steps=140, exact=True)
    for name, model in models:
        d = diagnose(model, ring, n=32, nfes=(1, 2), gammas=(0.0,), grid=8, steps=140, exact=True, jump_map=False)
        for k in (1, 2):     # two accurate float64 Heun solves of the exact ODE on different grids: 1e-4 apart
            assert sweep[name][k] == pytest.approx(d.coupled[(0.0, k)], abs=1e-4), (name, k)
    assert sweep["wrong"][1] > 10 * sweep["exact"][1]
