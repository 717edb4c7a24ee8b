"""Pictures and run reports: sample grids, 2-D scatter plots, quality-vs-NFE curves, loss curves.

Every file is written atomically (rendered in memory, then temp file + rename)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io.atomic import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_fig(fig, path: Path) -> None:
    """Render a figure to PNG in memory, close it, and write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 0) -> Image.Image:
    """Model-space images [N, C, H, W] in [-1, 1] -> one PIL grid image (upscaled for small images)."""
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = scale or max(1, 512 // max(grid.shape[:2]))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_image_grid(x: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    buf = io.BytesIO()
    image_grid(x, nrow).save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def save_scatter(panels: list[tuple[str, np.ndarray]], path: Path, lim: float | None = None) -> None:
    """Side-by-side 2-D scatter plots, one per (title, points [N, 2]) panel, on shared axes."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.3), squeeze=False)
    allpts = np.concatenate([p for _, p in panels])
    lim = lim or float(np.quantile(np.abs(allpts), 0.995)) * 1.1
    for ax, (title, pts) in zip(axes[0], panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.4, linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    save_fig(fig, path)


def draw_curves(ax, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str = "",
                logx: bool = True, hline: tuple[str, float] | None = None, logy: bool = False,
                ylim: tuple[float, float] | None = None) -> None:
    """One line per series name -> (xs, ys) on `ax`; a log-2 x axis is ticked at the xs themselves (NFE 1, 2, 3..)."""
    from matplotlib.ticker import NullLocator
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if hline:
        ax.axhline(hline[1], color="gray", ls="--", label=hline[0])
    if logx:
        ticks = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
        ax.xaxis.set_minor_locator(NullLocator())
    if logy:
        ax.set_yscale("log")
        plain_log_labels(ax.yaxis, *ax.get_ylim())
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title, fontsize=10), ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plain_log_labels(axis, lo: float, hi: float) -> None:
    """Label a log axis with plain numbers (0.05, 0.1, 0.2, ...; 1, 10, 100): the decades, and also 2 and 5 x each
    decade when the axis spans at most two decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def lead(v: float) -> int:
        return round(v / 10 ** math.floor(math.log10(v) + 1e-9))

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if hi / lo <= 100:
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and lead(v) in (2, 5) else ""))
    else:
        axis.set_minor_formatter(NullFormatter())


def all_positive(series: dict[str, tuple[list, list]], extra: tuple[float, ...] = ()) -> bool:
    """Whether every y value (and every `extra` one) is finite and > 0, so a log y axis can show them."""
    ys = [y for _, yv in series.values() for y in yv] + list(extra)
    return all(math.isfinite(y) and y > 0 for y in ys)


def save_curves(series: dict[str, tuple[list, list]], path: Path, xlabel: str, ylabel: str, title: str = "",
                logx: bool = True, hline: tuple[str, float] | None = None, logy: bool = False) -> None:
    """One line per series name -> (xs, ys), e.g. quality vs NFE; `logy` applies only when every value is > 0."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    logy = logy and all_positive(series, (hline[1],) if hline else ())
    draw_curves(ax, series, xlabel, ylabel, title, logx, hline, logy)
    save_fig(fig, path)


def read_stats(path: Path | str) -> list[dict]:
    """The lines of a run's stats.jsonl."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def save_loss_curves(stats_path: Path, path: Path, keys: tuple[str, ...] | None = None,
                     marks: tuple[tuple[int, str], ...] = ()) -> None:
    """Plot the numeric columns of a stats.jsonl against step (log-scale y where positive); `marks`: (step, label)
    pairs drawn as dotted vertical lines (e.g. where the GAN term starts)."""
    rows = read_stats(stats_path)
    if not rows:
        return
    keys = keys or tuple(k for k in rows[-1] if k.startswith("loss"))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None and math.isfinite(r[k])]
        if pts:
            ax.plot(*zip(*pts), label=k)
    for step, label in marks:
        ax.axvline(step, color="black", ls=":", lw=1, label=label)
    if all(r.get(k, 1) > 0 for r in rows for k in keys if k in r):
        ax.set_yscale("log")
    ax.set_xlabel("step"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    save_fig(fig, path)


def save_heatmap(values: list[list[float]], ticks: list[str], path: Path, xlabel: str, ylabel: str,
                 title: str = "") -> None:
    """A square matrix (rows: ylabel, columns: xlabel, NaN = empty) on a log colour scale, values written in cells
    when it is small enough to read."""
    from matplotlib.colors import LogNorm
    plt = pyplot()
    a = np.array(values, dtype=float)
    finite = a[np.isfinite(a) & (a > 0)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.42 * len(ticks), 1.0 + 0.4 * len(ticks)))
    norm = LogNorm(finite.min(), finite.max()) if finite.size and finite.max() > finite.min() else None
    im = ax.imshow(np.where(np.isfinite(a) & (a > 0), a, np.nan), cmap="viridis", norm=norm)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
    if len(ticks) <= 14:
        for i, row in enumerate(a):
            for j, v in enumerate(row):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=5, color="white")
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title, fontsize=9)
    save_fig(fig, path)
