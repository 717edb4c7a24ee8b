"""Quality sweeps: a model's samples at several (sampler, NFE, gamma) against the data, as ratios to the
true-vs-true floor of the sliced W1 distance (vectors), averaged over sampling seeds (DESIGN.md section 5)."""

from __future__ import annotations

import torch

from .metrics import mmd_rbf, swd_ratio


def true_sampler(data):
    """(n, generator) -> n true model-space samples: fresh draws for generated sets, pool subsets otherwise."""
    return lambda n, g: data.fresh(n, g)


def swd_sweep(model, data, points: list[tuple[str, int, float]], n: int = 2000, seeds: int = 4,
              progress: bool = False) -> list[dict]:
    """For each (sampler, nfe, gamma): {'sampler', 'nfe', 'gamma', 'swd', 'floor', 'ratio', 'mmd'} in model space
    (mmd: unbiased squared RBF-kernel MMD of the first seed's samples to a fresh true sample, at most 2000 each)."""
    from .generate import generate
    rows = []
    for sampler, nfe, gamma in points:
        samples = [generate(model, n, nfe, gamma, 1000 + s, None, n, sampler, progress=False) for s in range(seeds)]
        r = swd_ratio([x.float() for x in samples], true_sampler(data))
        m = min(n, 2000)
        r["mmd"] = mmd_rbf(samples[0][:m].float(), true_sampler(data)(m, torch.Generator().manual_seed(7000)))
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


METRICS = ("auto", "swd", "classifier", "fid")


def resolve_metric(metric: str, data) -> str:
    """'auto' -> 'swd' for vectors, 'classifier' for labelled images, 'fid' for unlabelled images (fid extra);
    an explicit choice is checked against the data (and the fid extra) before any sampling."""
    from .errors import UserError
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if data.kind == "vector":
        if metric in ("auto", "swd"):
            return "swd"
        raise UserError(f"--metric {metric} needs images, but '{data.spec}' holds vectors: use --metric swd")
    if metric == "auto":
        from .metrics.fid import INSTALL_HINT, fid_available
        if data.labels is not None:
            return "classifier"
        if not fid_available():
            raise UserError(f"'{data.spec}' has no labels (the classifier-feature distance needs them) and "
                            f"{INSTALL_HINT} (or use --metric swd)")
        return "fid"
    if metric == "classifier" and data.labels is None:
        raise UserError(f"'{data.spec}' has no labels: --metric classifier needs a labelled image set "
                        "(use --metric fid)")
    if metric == "fid":
        from .metrics.fid import inception_path
        inception_path()  # UserError with the install line when the extra is missing
    return metric


def sweep(model, data, points: list[tuple[str, int, float]], n: int = 2000, seeds: int = 4, png=None,
          metric: str = "auto", teacher=None, progress: bool | None = False) -> dict:
    """Evaluate sampling points (sampler, nfe, gamma) by `metric` (see resolve_metric): SWD ratio (vectors, or
    flattened images), classifier-feature Frechet distance or FID (images). 'heun' points run on `teacher` when
    given, else on the model as a denoiser. Rows carry 'value'; an optional PNG plots value vs NFE per series."""
    metric = resolve_metric(metric, data)
    heun_model = teacher if teacher is not None else model
    if metric == "swd":
        rows = [swd_sweep(heun_model if p[0] == "heun" else model, data, [p], n, seeds)[0] for p in points]
        for r in rows:
            r["value"] = r["ratio"]
        result = {"metric": "swd_ratio", "metric_doc": "sliced W1 to true data / true-vs-true floor"}
    else:
        from .image_eval import feature_fd
        fd = feature_fd(metric, data, n, progress=progress)
        rows = [{"sampler": sm, "nfe": k, "gamma": g, "value": fd(heun_model if sm == "heun" else model, k, g, sm)[1]}
                for sm, k, g in points]
        result = {"metric": fd.name, "metric_doc": fd.doc}
        if metric == "classifier":
            result["classifier_accuracy"] = fd.accuracy
        else:
            result["reference_n"] = fd.n_ref
    for r in rows:
        r["model"] = "teacher" if teacher is not None and r["sampler"] == "heun" else model.info["kind"]
    result.update(model_kind=model.info["kind"], data=data.spec, rows=rows)
    if png is not None:
        from .report import save_curves
        series: dict = {}
        heun_name = "teacher Heun" if teacher is not None else "Heun (model as denoiser)"
        for r in rows:
            name = f"CTM gamma={r['gamma']:g}" if r["sampler"] == "gamma" else heun_name
            series.setdefault(name, ([], []))
            series[name][0].append(r["nfe"])
            series[name][1].append(r["value"])
        save_curves(series, png, "NFE", result["metric"], f"{data.spec}")
    return result
