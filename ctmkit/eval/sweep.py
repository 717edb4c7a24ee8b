"""The one evaluation path (`ctmkit eval` and `ctmkit demo`): a model's samples at several (sampler, NFE, gamma)
points scored by one Quality metric, as a list of `Row`s in an `EvalResult` with one headline ratio."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import Tensor

from .quality import Quality
from .report import all_positive, draw_curves, pyplot, save_curves, save_fig

CTM_NFES = (1, 2, 4, 8)
HEUN_NFES = (1, 3, 5, 9, 17, 35)   # EDM Heun budgets: n steps use 2n - 1 NFE


def heun_nfes(max_nfe: int = 35) -> list[int]:
    """Heun budgets 1, 3, 5, 9, 17, 35 (n steps = 2n - 1 NFE) up to max_nfe."""
    return [v for v in HEUN_NFES if v <= max_nfe]


@dataclass
class Row:
    """One evaluated point: which network sampled (`model`: 'ctm' | 'teacher'), how, and the metric `value`
    (lower is better); `extras` holds metric-specific figures (swd: swd, floor, ratio, mmd); `guidance`: the
    classifier-free guidance scale w it sampled at (None: not asked for, the model's own)."""

    model: str
    sampler: str
    nfe: int
    gamma: float
    value: float
    extras: dict = field(default_factory=dict)
    guidance: float | None = None

    def to_dict(self) -> dict:
        w = {} if self.guidance is None else {"guidance": self.guidance}
        return {"model": self.model, "sampler": self.sampler, "nfe": self.nfe, "gamma": self.gamma, **w,
                "value": self.value, **self.extras}


@dataclass
class EvalResult:
    """Rows of one metric on one data set, with the metric's facts (`info`, e.g. classifier accuracy)."""

    metric: str
    metric_doc: str
    axis: str
    data: str
    model_kind: str
    rows: list[Row]
    info: dict = field(default_factory=dict)

    def value(self, model: str, sampler: str, nfe: int, gamma: float = 0.0, guidance: float | None = None
              ) -> float | None:
        for r in self.rows:
            if (r.model, r.sampler, r.nfe, r.gamma, r.guidance) == (model, sampler, nfe, gamma, guidance):
                return r.value
        return None

    def headline(self) -> float | None:
        """CTM NFE 1 (gamma 0) divided by the teacher's Heun 35 NFE, when both were evaluated (at the first
        guidance scale evaluated)."""
        w = self.rows[0].guidance if self.rows else None
        ctm, heun = self.value("ctm", "gamma", 1, guidance=w), self.value("teacher", "heun", 35, guidance=w)
        return ctm / heun if ctm is not None and heun else None

    def to_dict(self) -> dict:
        out = {"metric": self.metric, "metric_doc": self.metric_doc, **self.info, "model_kind": self.model_kind,
               "data": self.data, "rows": [r.to_dict() for r in self.rows]}
        if self.headline() is not None:
            out["ctm_nfe1_vs_teacher_heun35"] = self.headline()
        return out


def sweep(model, data, points: list[tuple], quality: Quality, teacher=None,
          on_samples: Callable[[Row, Tensor], None] | None = None, guidance=None) -> EvalResult:
    """Evaluate each point (sampler, nfe, gamma) by `quality`; nfe may be a tuple of custom times t_0 > ... > t_K
    instead (the row then has nfe K and the times in `ts`). 'heun' points run on `teacher` when given, else on
    the model (a CTM as a denoiser); `on_samples(row, samples)` sees every point's samples (e.g. for grids; the
    image metrics pass their first 256). `guidance`: classifier-free guidance scales w (eval/guide.py), every
    point evaluated at each, its rows labelled with it; None: the models' own, rows unlabelled."""
    rows = []
    for w in [None] if guidance is None else list(guidance):
        for sampler, nfe, gamma in points:
            net = teacher if teacher is not None and sampler == "heun" else model
            ts = list(nfe) if isinstance(nfe, (tuple, list)) else None
            value, extras, x = quality.point(net, sampler, nfe if ts is None else len(ts) - 1, gamma, ts, guidance=w)
            rows.append(Row(net.card.kind, sampler, nfe if ts is None else len(ts) - 1, gamma, value,
                            extras if ts is None else {**extras, "ts": ts}, w))
            if on_samples is not None:
                on_samples(rows[-1], x)
    spec = data.spec if data is not None else f"reference statistics {quality.info.get('reference')}"
    return EvalResult(quality.name, quality.doc, quality.axis, spec, model.card.kind, rows, dict(quality.info))


def series_name(model: str, sampler: str, gamma: float, ts: list | None = None, guidance: float | None = None) -> str:
    w = "" if guidance is None else f", w={guidance:g}"
    if ts is not None:
        return f"CTM gamma={gamma:g}, ts={','.join(f'{v:g}' for v in ts)}{w}"
    if sampler == "gamma":
        return f"CTM gamma={gamma:g}{w}"
    return ("teacher Heun" if model == "teacher" else "Heun (CTM as denoiser)") + w


def close_up(series: dict[str, tuple[list, list]], hline: tuple[str, float] | None = None) -> tuple[float, float]:
    """y limits that hold every CTM (gamma) point and the floor line, with a margin: the linear close-up panel."""
    ys = [y for name, (_, yv) in series.items() if name.startswith("CTM") for y in yv] + ([hline[1]] if hline else [])
    lo, hi = min(ys), max(ys)
    pad = 0.08 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 1.0
    return lo - pad, hi + pad


def plot_result(result: EvalResult, png: Path, title: str = "", hline: tuple[str, float] | None = None) -> None:
    """Value vs NFE, one line per series (CTM gamma=..., teacher Heun), log-2 NFE axis. When the values span more
    than a factor 10 (a teacher's Heun at 3 NFE can be 1000x the floor), the y axis is logarithmic, and beside it a
    linear close-up holds the CTM's points and the floor, so that its curves are not flattened."""
    series: dict[str, tuple[list, list]] = {}
    for r in result.rows:
        xs, ys = series.setdefault(series_name(r.model, r.sampler, r.gamma, r.extras.get("ts"), r.guidance), ([], []))
        xs.append(r.nfe)
        ys.append(r.value)
    title = title or result.data
    ys = [y for _, yv in series.values() for y in yv]
    wide = all_positive(series) and max(ys) > 10 * min(ys)
    if not wide:
        return save_curves(series, png, "NFE", result.axis, title, hline=hline)
    ctm = any(name.startswith("CTM") for name in series)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if ctm else 1, figsize=(10 if ctm else 5, 3.8), squeeze=False)
    draw_curves(axes[0][0], series, "NFE", result.axis, f"{title} (log scale)", hline=hline,
                logy=all_positive(series, (hline[1],) if hline else ()))
    if ctm:
        draw_curves(axes[0][1], series, "NFE", result.axis, "close-up on the CTM (linear scale)", hline=hline,
                    ylim=close_up(series, hline))
    fig.tight_layout()
    save_fig(fig, png)
