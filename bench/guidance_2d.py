"""bench (issue 27): classifier-free guidance against the exact guided flow of a labelled 2-D mixture.

Each variant is `ctmkit distill --teacher exact --data labelled_blobs` with the defaults plus its overrides (one
thread, resumable): the unguided CTM (which keeps a null branch: label dropout 0.1), students distilled at one scale
(ctm.guidance=2, =4), a range student (ctm.guidance=[1,4]) and W = 2 with the GAN kept (ctm.gan_guided=true). Then, at
each guidance scale W, the coupled error of gamma-0 samples, mean |x_NFE(z, c) - Phi_W(z, c)| against the exact
solution of the guided PF-ODE (Heun, 512 steps on D_W of the exact mixture) from the same n noises and labels, for
every model that can sample at W (the unguided CTM through the sampled-guidance heuristic, eval/guide.py), beside the
floor: the exact guided teacher's Heun on the 18-point training grid.

    python bench/guidance_2d.py --steps 6000

One JSON line per run (bench/results/guidance_2d.jsonl; a re-run skips what is there), then the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from converge_2d import train  # bench/: the same resumable one-thread distill

from ctmkit import load_model
from ctmkit.core.guidance import guided
from ctmkit.core.sampling import gamma_sample, per_sample_normal, sample_schedule
from ctmkit.core.schedules import karras_sigmas
from ctmkit.core.solvers import flow_map, solve_pf_ode
from ctmkit.data import load_data
from ctmkit.errors import UserError
from ctmkit.eval.guide import guided_callables, resolve_scale

NFES = (1, 2, 4, 8)
SCALES = (1.0, 2.0, 4.0)
VARIANTS = {"unguided": [], "w2": ["ctm.guidance=2"], "w4": ["ctm.guidance=4"], "range": ["ctm.guidance=[1,4]"],
            "w2_gan": ["ctm.guidance=2", "ctm.gan_guided=true"]}


def noises(n: int, seed: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noises [n, max NFE, 2] and balanced labels [n]."""
    return per_sample_normal(n, (max(NFES), 2), seed), torch.arange(n) % classes


def exact_and_floor(mixture, w: float, z, labels, smin: float, smax: float) -> tuple[torch.Tensor, float]:
    """Phi_W(z, c) (512 Heun steps on the exact D_W) and the floor: Heun on the 18-point grid."""
    d_w = guided(mixture, w)
    x_t = z[:, 0].double() * smax
    ref = flow_map(d_w, x_t, smax, smin, steps=512, labels=labels)
    grid = solve_pf_ode(d_w, x_t, karras_sigmas(18, smin, smax), "heun", labels)
    return ref, float((grid - ref).norm(dim=1).mean())


def errors(model, w: float, z, labels, ref) -> dict[str, float]:
    """Coupled error of gamma-0 samples at each NFE (the model sampled at scale w)."""
    card = model.card
    jump, _ = guided_callables(model, w, True)
    out = {}
    with torch.no_grad():
        for k in NFES:
            x = gamma_sample(jump, z[:, 0], sample_schedule(k, card.sigma_min, card.sigma_max), 0.0, labels=labels,
                             step_noise=z[:, 1:k])
            out[str(k)] = float((x.double() - ref).norm(dim=1).mean())
    return out


def can_sample(model, w: float) -> bool:
    """The model samples at w (eval/guide.py's rules; a refusal is False)."""
    try:
        resolve_scale(model, w)
    except UserError:
        return False
    return True


def measure(runs: dict[str, Path], data_name: str, n: int, seed: int) -> dict:
    data = load_data(data_name)
    models = {name: load_model(path) for name, path in runs.items()}
    card = next(iter(models.values())).card
    z, labels = noises(n, seed, data.num_classes)
    res = {}
    for w in SCALES:
        ref, floor = exact_and_floor(data.mixture, w, z, labels, card.sigma_min, card.sigma_max)
        res[f"{w:g}"] = {"floor": floor, **{name: errors(m, w, z, labels, ref) for name, m in models.items()
                                            if can_sample(m, w)}}
    return res


def table(res: dict) -> None:
    for w, row in res.items():
        print(f"\nW = {w}: floor {row['floor']:.4f}")
        print("model".ljust(12) + "".join(f"NFE {k:<8}" for k in NFES) + "NFE1/floor")
        for name, e in row.items():
            if name != "floor":
                print(name.ljust(12) + "".join(f"{e[str(k)]:<12.4f}" for k in NFES) + f"{e['1'] / row['floor']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="labelled_blobs")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--out", default="bench/out/guidance_2d")
    ap.add_argument("--json", default="bench/results/guidance_2d.jsonl")
    args = ap.parse_args()
    runs, secs = {}, {}
    for name in args.variants.split(","):
        runs[name] = Path(args.out) / f"{args.data}-{name}-s{args.seed}-{args.steps}"
        secs[name] = round(train(args.data, args.seed, args.steps, runs[name], VARIANTS[name]), 1)
        print(f"{name}: {secs[name]} s", flush=True)
    res = measure(runs, args.data, args.n, args.seed)
    line = {"data": args.data, "seed": args.seed, "steps": args.steps, "train_s": secs, "n": args.n, "errors": res}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    table(res)


if __name__ == "__main__":
    main()
