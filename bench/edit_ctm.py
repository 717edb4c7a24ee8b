"""bench: zero-shot inpainting and inversion of a distilled CTM on an exact mixture, against the same algorithms run
with the exact flow map and with the teacher (issue 28, points 4 (b), (c) and the inversion rows).

The run is a `ctmkit distill --teacher exact` CTM; its model card holds the exact model-space mixture, so every
figure is in model space. Inpainting (ctmkit.core.editing.inpaint) of the last coordinates given the first
(`--known`, default: the first half; 2-D: observe x, infer y), measured as bench/edit_2d.py does: sliced W1 of the
unknown coordinates to exact posterior draws over the floor of two exact posterior sets, averaged over `--obs`
observations x `--seeds` sampling seeds of `--n` draws each. Jumps compared at the same NFE and gamma:
  exact    the exact flow map (32 Heun steps of the exact denoiser per jump): what the algorithm itself costs;
  teacher  one Heun step of the exact denoiser per jump, at `--teacher-nfe` jumps (how `ctmkit edit` runs a
           teacher; one Heun step from sigma_max is no sample, so its NFE is larger);
  ctm      the CTM's jump G(x, t, s) (its training EMA, the weights `ctmkit sample` uses).
Inversion: data -> noise with the CTM's own score (`invert`, Heun, 64 steps, D = g(x, t, t)) -> 1 or 4 gamma-0
jumps back; relative error |x' - x| / |x| over 512 mixture points (mean and max), beside the exact denoiser's
inversion followed by the CTM's jumps (which error is the jump's) and by the exact flow map.
With `--plot` (2-D runs): a picture of the posterior of y given x at two observations: histograms of the CTM's and
the exact algorithm's draws against the exact conditional density.

    ctmkit distill --teacher exact --data gmm:bench/results/edit_gmm16.json --out bench/out/edit/gmm16-ctm --seed 0
    OMP_NUM_THREADS=1 python bench/edit_ctm.py --run bench/out/edit/gmm16-ctm --out bench/results/edit_ctm_gmm16.json
    OMP_NUM_THREADS=1 python bench/edit_ctm.py --run bench/out/converge_2d/ring-ref-s0-6000 \\
        --out bench/results/edit_ctm_ring.json --plot bench/results/edit_ctm_ring.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from edit_2d import bench_case, exact_jump, finish

from ctmkit import load_model
from ctmkit.core.editing import edit_noise, heun_jump, inpaint, inversion_schedule, invert
from ctmkit.core.mixtures import GaussianMixture
from ctmkit.core.sampling import gamma_sample, sample_schedule


def ctm_jump(model):
    """The CTM's jump in float64 in and out (the network runs in float32)."""
    def jump(x, t, s, labels=None):
        with torch.no_grad():
            return model(x.float(), t.float(), s.float(), labels).double()
    return jump


def ctm_denoiser(model):
    def den(x, sigma, labels=None):
        with torch.no_grad():
            return model.denoise(x.float(), torch.as_tensor(sigma).float(), labels).double()
    return den


def inversion_rows(model, gmm: GaussianMixture, n: int = 512, steps: int = 64) -> dict:
    """Relative reconstruction errors of invert (CTM score or exact denoiser) -> K jumps (CTM or exact flow map)."""
    x = gmm.sample(n, torch.Generator().manual_seed(1), torch.float64)
    card = model.card
    inv = inversion_schedule(steps, card.sigma_min, card.sigma_max)
    noises = {"ctm score": invert(ctm_denoiser(model), x, inv), "exact score": invert(gmm, x, inv)}
    jumps = {"ctm": ctm_jump(model), "exact flow map": exact_jump(gmm, 256)}
    rows = []
    for (inv_name, z) in noises.items():
        for jump_name, jump in jumps.items():
            for k in (1, 4):
                if jump_name == "exact flow map" and k > 1:
                    continue
                sig = sample_schedule(k, card.sigma_min, card.sigma_max)
                back = gamma_sample(jump, z, sig, 0.0)
                err = (back - x).norm(dim=1) / x.norm(dim=1)
                rows.append({"invert": inv_name, "jumps": jump_name, "nfe": k, "rel_err_mean": float(err.mean()),
                             "rel_err_max": float(err.max())})
                print(f"  invert ({inv_name}) -> {k} x {jump_name}: mean {err.mean():.2e} max {err.max():.2e}",
                      flush=True)
    return {"n": n, "steps": steps, "rows": rows}


def plot_posterior(model, gmm: GaussianMixture, path: Path, nfe: int = 8, n: int = 4000) -> None:
    """2-D: y | x at two observed x, the CTM's and the exact algorithm's draws against the exact density."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    known = torch.tensor([True, False])
    xs = [float(gmm.means[0, 0]) * 0.999, float(gmm.means[1, 0])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, x0 in zip(axes, xs):
        y = torch.tensor([[x0, 0.0]], dtype=torch.float64).expand(n, -1)
        grid = torch.linspace(-1.2 * gmm.means.abs().max(), 1.2 * gmm.means.abs().max(), 800, dtype=torch.float64)
        pts = torch.stack([torch.full_like(grid, x0), grid], 1)
        dens = gmm.conditional_log_prob(pts, y[:1].expand(len(grid), -1), known).exp()
        ax.plot(grid, dens, "k-", lw=1.2, label="exact p(y | x)")
        for name, jump, colour in (("exact flow map", exact_jump(gmm, 32), "C0"), ("CTM", ctm_jump(model), "C3")):
            z, step, obs = (v.double() for v in edit_noise(n, nfe, (2,), 0))
            out = inpaint(jump, z, sample_schedule(nfe, model.card.sigma_min, model.card.sigma_max), y, known, 1.0,
                          step_noise=step, obs_noise=obs)
            ax.hist(out[:, 1].numpy(), bins=200, range=(float(grid[0]), float(grid[-1])), density=True, alpha=0.45,
                    color=colour, label=f"inpaint, {name}, NFE {nfe}, gamma 1")
        ax.set_title(f"observe x = {x0:.3f} (model space), infer y")
        ax.set_xlabel("y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a ctmkit distill --teacher exact run")
    ap.add_argument("--known", type=int, default=None, help="known coordinates: the first K (default: half)")
    ap.add_argument("--nfe", default="1,2,4,8")
    ap.add_argument("--teacher-nfe", default="4,8,18,35", help="the teacher's jumps (one Heun step each)")
    ap.add_argument("--gammas", default="0,1")
    ap.add_argument("--jumps", default="exact,teacher,ctm")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--obs", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="2-D runs: the posterior picture (PNG)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(a.run).eval()
    gmm = GaussianMixture(**model.card.data.mixture)
    known = torch.arange(gmm.dim) < (a.known or gmm.dim // 2)
    nfes, gammas = [int(v) for v in a.nfe.split(",")], [float(v) for v in a.gammas.split(",")]
    jumps = {"exact": exact_jump(gmm, 32), "teacher": heun_jump(gmm, 1), "ctm": ctm_jump(model)}
    out = {"run": a.run, "n": a.n, "seeds": a.seeds, "obs": a.obs, "known": int(known.sum()), "jumps": {}}
    t0 = time.time()
    for name in a.jumps.split(","):
        print(name, flush=True)
        k = [int(v) for v in a.teacher_nfe.split(",")] if name == "teacher" else nfes
        out["jumps"][name] = bench_case(jumps[name], gmm, known, k, gammas, a.n, a.seeds, a.obs)
        print(f"  prior {out['jumps'][name]['prior']:.2f}", flush=True)
    out["inversion"] = inversion_rows(model, gmm)
    if a.plot:
        plot_posterior(model, gmm, Path(a.plot))
    finish(out, t0, a.out)


if __name__ == "__main__":
    main()
