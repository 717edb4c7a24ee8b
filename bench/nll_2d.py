"""bench: PF-ODE likelihood of trained models on exact 2-D Gaussian mixtures, against the true log-density.

For each run folder (a CTM, used through its denoiser g(x, t, t), or a teacher), computes the NLL of the first
--n data points with `ctmkit.eval.likelihood.data_nll` (exact divergence, RK45) and the true NLL of the same points:
-log p_{sigma_min}(x) of the mixture (the density the ODE integral estimates: data at sigma_min), in the data's
own units. Also the exact mixture denoiser itself (checks the solver alone). Target (issue 5): a trained CTM
within 0.1 nats per sample of the true value. Prints and writes JSON.

    python bench/ctm_2d.py --cases ring:exact,ring,grid      # trains the runs read here (if not present)
    python bench/nll_2d.py --runs bench/out/ctm_2d/ring_exact_full,bench/out/ctm_2d/ring_teacher_full
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from ctmkit import load_model
from ctmkit.data import load_data
from ctmkit.eval.likelihood import data_nll


def true_nll(data, n: int, sigma_min: float) -> float:
    """Mean -log p(x) in data units of the first n points: mixture at sigma_min, plus the normaliser's Jacobian."""
    x = data.x[:n].double()
    d = x.shape[1]
    return float(-(data.mixture.log_prob(x, sigma=sigma_min) + d * math.log(data.normalizer.scale)).mean())


class Exact:
    """The mixture's exact denoiser dressed as a loaded model (what data_nll expects)."""

    def __init__(self, data, sigma_min=0.002, sigma_max=80.0):
        self.mix = data.mixture
        self.card = SimpleNamespace(kind="teacher", is_ctm=False, conditional=False, sigma_min=sigma_min,
                                    sigma_max=sigma_max)

    def __call__(self, x, sigma, labels=None):
        return self.mix(x.double(), sigma.double()).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="bench/out/ctm_2d/ring_exact_full,bench/out/ctm_2d/ring_teacher_full,"
                                     "bench/out/teacher_2d/ring,bench/out/ctm_2d/grid_teacher_full,"
                                     "bench/out/teacher_2d/grid")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--out", default="bench/results/nll_2d.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows, exact_done = [], set()
    for run in args.runs.split(","):
        model = load_model(run)
        spec = model.card.data.spec
        data = load_data(spec)
        if data.mixture is None:
            raise SystemExit(f"{run}: data '{spec}' has no exact density")
        truth = true_nll(data, args.n, model.card.sigma_min)
        todo = [(run, model)] + ([] if spec in exact_done else [(f"exact:{spec}", Exact(data))])
        exact_done.add(spec)
        for name, m in todo:
            r = data_nll(m, data, args.n, 512, args.rtol, args.atol, exact=True)
            rows.append({"model": name, "kind": m.card.kind, "data": spec, "n": args.n,
                         "nll_model": r["nats_per_sample"], "nll_true": truth,
                         "diff_nats_per_sample": r["nats_per_sample"] - truth})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"rtol": args.rtol, "atol": args.atol, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
