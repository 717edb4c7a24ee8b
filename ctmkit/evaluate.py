"""Quality sweeps: a model's samples at several (sampler, NFE, gamma) against the data, as ratios to the
true-vs-true floor of the sliced W1 distance (vectors), averaged over sampling seeds (DESIGN.md section 5)."""

from __future__ import annotations

import torch

from .metrics import swd_ratio


def true_sampler(data):
    """(n, generator) -> n true model-space samples: fresh draws for generated sets, pool subsets otherwise."""
    return lambda n, g: data.fresh(n, g)


def swd_sweep(model, data, points: list[tuple[str, int, float]], n: int = 2000, seeds: int = 4,
              progress: bool = False) -> list[dict]:
    """For each (sampler, nfe, gamma): {'sampler', 'nfe', 'gamma', 'swd', 'floor', 'ratio'} in model space."""
    from .generate import generate
    rows = []
    for sampler, nfe, gamma in points:
        samples = [generate(model, n, nfe, gamma, 1000 + s, None, n, sampler, progress=False) for s in range(seeds)]
        r = swd_ratio([x.float() for x in samples], true_sampler(data))
        rows.append({"sampler": sampler, "nfe": nfe, "gamma": gamma, **r})
    return rows


def heun_nfes(max_nfe: int = 35) -> list[int]:
    """Heun budgets 1, 3, 5, 9, 17, 35 (n steps = 2n - 1 NFE) up to max_nfe."""
    return [v for v in (1, 3, 5, 9, 17, 35) if v <= max_nfe]


@torch.no_grad()
def flow_map_error(model, mixture, pairs: int = 1024, num_scales: int = 18, seed: int = 0) -> float:
    """Mean |G_theta(x_t, t, s) - G*(x_t, t, s)| over random pairs s < t of the Karras grid (the pairs CTM trains
    on), x_t on the true marginal at t, G* the exact flow map (fine Heun solve of the exact denoiser)."""
    from .schedules import karras_sigmas
    from .solvers import flow_map
    g = torch.Generator().manual_seed(seed)
    grid = karras_sigmas(num_scales)
    i = torch.randint(0, num_scales - 1, (pairs,), generator=g)
    j = i + 1 + (torch.rand(pairs, generator=g, dtype=torch.float64) * (num_scales - 1 - i)).long()
    t, s = grid[i], grid[j]
    x_t = mixture.sample(pairs, g).double() + t[:, None] * torch.randn(pairs, mixture.dim, generator=g,
                                                                       dtype=torch.float64)
    exact = flow_map(mixture, x_t, t, s, steps=128)
    return float((model(x_t.float(), t.float(), s.float()).double() - exact).norm(dim=1).mean())


def sweep(model, data, points: list[tuple[str, int, float]], n: int = 2000, seeds: int = 4, png=None) -> dict:
    """Evaluate sampling points (sampler, nfe, gamma): vectors by SWD ratio, labelled images by classifier-feature
    Frechet distance. Rows carry 'value'; an optional PNG plots value vs NFE per (sampler, gamma)."""
    if data.kind == "vector":
        rows = swd_sweep(model, data, points, n, seeds)
        for r in rows:
            r["value"] = r["ratio"]
        result = {"metric": "swd_ratio", "metric_doc": "sliced W1 to true data / true-vs-true floor"}
    else:
        from .image_eval import METRIC_DOC, ClassifierFD
        fd = ClassifierFD(data, n)
        rows = [{"sampler": sm, "nfe": k, "gamma": g, "value": fd(model, k, g, sm)[1]} for sm, k, g in points]
        result = {"metric": "frechet_classifier", "metric_doc": METRIC_DOC, "classifier_accuracy": fd.accuracy}
    result.update(model_kind=model.info["kind"], data=data.spec, rows=rows)
    if png is not None:
        from .report import save_curves
        series: dict = {}
        for r in rows:
            name = f"CTM gamma={r['gamma']:g}" if r["sampler"] == "gamma" else "Heun (model as denoiser)"
            series.setdefault(name, ([], []))
            series[name][0].append(r["nfe"])
            series[name][1].append(r["value"])
        save_curves(series, png, "NFE", result["metric"], f"{data.spec}")
    return result
