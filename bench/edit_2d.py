"""bench: zero-shot inpainting (ctmkit.core.editing.inpaint) with the exact flow map of a Gaussian mixture as the
jump, against the mixture's exact posterior (issue 28, point 4 (a): what the algorithm itself costs, before any
network error).

Mixtures (model space): `ring2` the 8-Gaussian ring of the tests (radius 1, std 0.08; observe x, infer y), `pairs2`
the 2-D pairs of tests/test_editing.py (x = +-1.5 picks a pair, y = +-0.4 with weights 3:1 / 1:3), `gmm16` a random
16-D mixture (8 components, means N(0, 1), std 0.3; observe the first 8 coordinates, infer the last 8). For each,
`--obs` observations drawn from the mixture itself, and for each observation `--n` inpainting draws per sampling
seed (`--seeds`): sliced W1 of the unknown coordinates to `--n` exact posterior draws
(GaussianMixture.conditional_sample), divided by the floor (the mean over 4 pairs of exact posterior sets of that
size), averaged over observations and seeds. `prior` is the same ratio for draws of the unknown coordinates from
the mixture itself (an inpainter that ignores the observation). Also: invert (exact denoiser, Heun, 256 steps) +
exact flow map back, max relative error over 256 points.

    OMP_NUM_THREADS=1 python bench/edit_2d.py --out bench/results/edit_2d.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ctmkit.core.editing import edit_noise, inpaint, inversion_schedule, invert
from ctmkit.core.mixtures import GaussianMixture
from ctmkit.core.sampling import sample_schedule
from ctmkit.core.solvers import flow_map
from ctmkit.metrics.swd import sliced_w1


def mixtures() -> dict:
    ang = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    ring = GaussianMixture(torch.stack([ang.cos(), ang.sin()], 1), [0.08] * 8, [1] * 8)
    pairs = GaussianMixture([[-1.5, 0.4], [-1.5, -0.4], [1.5, 0.4], [1.5, -0.4]], [0.15] * 4, [1, 3, 3, 1])
    g = torch.Generator().manual_seed(16)
    gmm16 = GaussianMixture(torch.randn(8, 16, generator=g, dtype=torch.float64), [0.3] * 8, torch.rand(8, generator=g)
                            + 0.5)
    known16 = torch.arange(16) < 8
    return {"ring2": (ring, torch.tensor([True, False])), "pairs2": (pairs, torch.tensor([True, False])),
            "gmm16": (gmm16, known16)}


def exact_jump(gmm: GaussianMixture, steps: int):
    return lambda x, t, s, labels=None: flow_map(gmm, x, t, s, steps)


def ratio(samples, gmm, y, known, n_proj=128, pairs=4) -> float:
    u = ~known
    ex = [gmm.conditional_sample(y, known, len(samples), torch.Generator().manual_seed(900 + i))[0][:, u]
          for i in range(2 * pairs + 1)]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    floor = sum(sliced_w1(ex[2 * i], ex[2 * i + 1], n_proj, g()) for i in range(pairs)) / pairs
    return sliced_w1(samples[:, u], ex[-1], n_proj, g()) / floor


def bench_case(jump, gmm, known, nfes, gammas, n, seeds, n_obs) -> dict:
    """Inpainting ratios of `jump` (model(x, t, s, labels) in float64) on `n_obs` observations drawn from gmm."""
    ys = gmm.sample(n_obs, torch.Generator().manual_seed(7), torch.float64)
    rows = []
    for gamma in gammas:
        for nfe in nfes:
            vals = []
            for y in ys:
                for seed in range(seeds):
                    z, step, obs = (v.double() for v in edit_noise(n, nfe, (gmm.dim,), seed))
                    x = inpaint(jump, z, sample_schedule(nfe), y[None].expand(n, -1), known, gamma, step_noise=step,
                                obs_noise=obs)
                    vals.append(ratio(x, gmm, y[None], known))
            rows.append({"gamma": gamma, "nfe": nfe, "ratio": sum(vals) / len(vals),
                         "per_obs": [sum(vals[i * seeds:(i + 1) * seeds]) / seeds for i in range(n_obs)]})
            print(f"  gamma {gamma} nfe {nfe:3d}: ratio {rows[-1]['ratio']:.2f}", flush=True)
    prior = [ratio(gmm.sample(n, torch.Generator().manual_seed(s), torch.float64), gmm, y[None], known)
             for y in ys for s in range(seeds)]
    return {"rows": rows, "prior": sum(prior) / len(prior)}


def finish(out: dict, t0: float, path: str | None) -> None:
    """Record the wall seconds since t0 in `out`, print them, and write `out` as JSON to `path` (if given)."""
    out["seconds"] = round(time.time() - t0, 1)
    print(f"{out['seconds']} s")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="ring2,pairs2,gmm16")
    ap.add_argument("--nfe", default="1,2,4,8,16,32")
    ap.add_argument("--gammas", default="0,1")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--obs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32, help="Heun steps of each exact jump")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    nfes, gammas = [int(v) for v in a.nfe.split(",")], [float(v) for v in a.gammas.split(",")]
    out, t0 = {"n": a.n, "seeds": a.seeds, "obs": a.obs, "steps": a.steps, "cases": {}}, time.time()
    for name in a.cases.split(","):
        gmm, known = mixtures()[name]
        print(name, flush=True)
        res = bench_case(exact_jump(gmm, a.steps), gmm, known, nfes, gammas, a.n, a.seeds, a.obs)
        x = gmm.sample(256, torch.Generator().manual_seed(1), torch.float64)
        back = flow_map(gmm, invert(gmm, x, inversion_schedule(256)) * 80.0, 80.0, 0.002, 256)
        res["invert_rel_err_max"] = float(((back - x).norm(dim=1) / x.norm(dim=1)).max())
        print(f"  prior {res['prior']:.2f}  invert+flow map max rel err {res['invert_rel_err_max']:.1e}", flush=True)
        out["cases"][name] = res
    finish(out, t0, a.out)


if __name__ == "__main__":
    main()
