"""bench (issue 25): how close the default 2-D distillation comes to its exact teacher, and what helps: the weights
sampled (raw, the training EMA, post-hoc EMA widths), learning-rate schedules and pair draws.

Each variant is `ctmkit distill --teacher exact --data SET` with the defaults plus its overrides (resumable, one
thread), then the coupled error of every weight choice: mean |x_NFE(z) - Phi(z)| of gamma-0 samples against the
exact PF-ODE solution from the same n noises (`eval.diagnostics.coupled_sweep`), at NFE 1, 2, 4, 8, beside the
floor (the teacher's own Heun solve on the 18-point training grid).

    python bench/converge_2d.py --variants "ref=" --seeds 0 --steps 6000
    python bench/converge_2d.py --variants "ref=;cos=train.lr_schedule=cosine,train.lr_final=0.02" --seeds 0,1,2
    python bench/converge_2d.py --variants "mixed=ctm.pairs=mixed" --steps 4000 --jobs 2

One JSON line per run (appended to --json; a re-run skips what is there), then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ctmkit import load_model
from ctmkit.data import load_data
from ctmkit.eval.diagnostics import coupled_sweep
from ctmkit.io.phema import rebuild
from ctmkit.io.runs import newest_state

NFES = (1, 2, 4, 8)
WIDTHS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2)


def train(set_name: str, seed: int, steps: int, out: Path, overrides: list[str]) -> float:
    """Distill (or resume) one run; returns the wall seconds this call took."""
    cmd = [sys.executable, "-m", "ctmkit", "distill", "--teacher", "exact", "--data", set_name, "--out", str(out),
           "--seed", str(seed), "--steps", str(steps), "--quiet", *overrides]
    if (out / "checkpoints").exists():
        cmd.append("--resume")
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.time() - t0


def weights(run: Path, widths=WIDTHS, ema_name: str = "ema 0.999"):
    """(name, model) for the raw weights, the training EMA and each post-hoc width, one module reloaded in turn."""
    model = load_model(run, ema=0)
    yield ema_name, model
    for s in widths:
        model.load_state_dict(rebuild(run, s)[0])
        yield f"phema {s:g}", model
    model.load_state_dict(newest_state(run)["nets"]["net"])
    yield "raw", model


def measure(run: Path, set_name: str, n: int) -> dict:
    data = load_data(set_name)
    card = load_model(run, ema=0).card
    errs = coupled_sweep(card, weights(run), data.mixture, n, NFES, steps=512, exact=True)
    floor = coupled_sweep(card, [("x", _TeacherGrid(data.mixture, card))], data.mixture, n, (1,), steps=512,
                          exact=True)["x"][1]
    return {"errors": {name: {str(k): v for k, v in e.items()} for name, e in errs.items()}, "floor": floor}


class _TeacherGrid:
    """The exact teacher's Heun solve on the 18-point training grid, shaped as a one-jump 'CTM' (the floor)."""

    def __init__(self, mixture, card):
        self.mixture, self.card = mixture, card

    def __call__(self, x, t, s, labels=None):
        from ctmkit import karras_sigmas, solve_pf_ode
        return solve_pf_ode(self.mixture, x.double(), karras_sigmas(18, self.card.sigma_min, self.card.sigma_max),
                            "heun").to(x.dtype)


def one(args, name: str, overrides: list[str], seed: int) -> dict:
    out = Path(args.out) / f"{args.set}-{name}-s{seed}-{args.steps}"
    secs = train(args.set, seed, args.steps, out, overrides)
    res = {"set": args.set, "variant": name, "overrides": overrides, "seed": seed, "steps": args.steps,
           "train_s": round(secs, 1), **measure(out, args.set, args.n)}
    print(json.dumps(res), flush=True)
    return res


def table(rows: list[dict]) -> None:
    for r in rows:
        print(f"\n{r['variant']} seed {r['seed']} ({r['steps']} steps, {r['train_s']} s); floor {r['floor']:.4f}")
        print("weights".ljust(14) + "".join(f"NFE {k:<8}" for k in NFES) + "NFE1/floor")
        for name, e in r["errors"].items():
            print(name.ljust(14) + "".join(f"{e[str(k)]:<12.4f}" for k in NFES) + f"{e['1'] / r['floor']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="ring")
    ap.add_argument("--variants", default="ref=", help="name=override,override;name2=...")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="bench/out/converge_2d")
    ap.add_argument("--json", default="bench/results/converge_2d.jsonl")
    args = ap.parse_args()
    variants = [(v.split("=", 1)[0], [o for o in v.split("=", 1)[1].split(",") if o]) for v in args.variants.split(";")]
    done = []
    path = Path(args.json)
    if path.exists():
        done = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    have = {(r["set"], r["variant"], r["seed"], r["steps"]) for r in done}
    todo = [(n, o, int(s)) for n, o in variants for s in args.seeds.split(",")
            if (args.set, n, int(s), args.steps) not in have]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: one(args, *job), todo))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    table([r for r in done + rows if r["set"] == args.set and r["steps"] == args.steps])


if __name__ == "__main__":
    main()
