"""bench: CTM training pair draws (ctm.pairs) on 2-D mixtures with the exact teacher, measured by coupled error.

For each set x pair draw x seed x budget: `ctmkit distill --preset toy --teacher exact` (resumable), then
`ctmkit diagnose`-style coupled errors: mean |x_NFE(z) - Phi(z)| of the CTM's gamma-sample against the exact PF-ODE
solution Phi from the same noise z (n samples, model space), at NFE 1/2/4/8, gamma 0 and 1. Beside it the floor:
the teacher's own Heun solve on the N-point training grid against Phi (N = 18, and finer grids for comparison),
and the seconds per training step of each draw (from stats.jsonl).

    python bench/pairs_2d.py --sets ring,grid --pairs reference,uniform,all_the_way --seeds 0,1,2 --steps 3000
    python bench/pairs_2d.py --sets ring --seeds 0 --steps 9000 --jobs 2
    python bench/pairs_2d.py --sets ring --seeds 0 --tag nogan ctm.gan=false        # extra overrides, tagged
    python bench/pairs_2d.py --step-cost 300                                        # seconds per step, one thread

Prints one JSON line per run and writes --json (merged with earlier runs: a re-run skips what is there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ctmkit import karras_sigmas, load_model, solve_pf_ode
from ctmkit.core.sampling import per_sample_normal
from ctmkit.data import load_data
from ctmkit.eval.diagnostics import diagnose

NFES = (1, 2, 4, 8)


def train(set_name: str, pairs: str, seed: int, steps: int, out: Path, overrides=()) -> None:
    cmd = [sys.executable, "-m", "ctmkit", "distill", "--teacher", "exact", "--data", set_name, "--preset", "toy",
           "--out", str(out), "--seed", str(seed), "--steps", str(steps), "--quiet", f"ctm.pairs={pairs}",
           f"train.ckpt_every={max(500, steps // 6)}", *overrides]
    if (out / "checkpoints").exists():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def seconds_per_step(run: Path) -> float:
    """Training seconds per step from stats.jsonl, whose `time` restarts at 0 in each (resumed) session."""
    rows = [json.loads(ln) for ln in (run / "stats.jsonl").read_text().splitlines() if ln.strip()]
    session_ends = [a["time"] for a, b in zip(rows, rows[1:]) if b["time"] < a["time"]] + [rows[-1]["time"]]
    return sum(session_ends) / rows[-1]["step"]


def floors(mixture, n: int, grids=(18, 40, 80), steps: int = 512) -> dict:
    """The teacher's Heun solve on an N-point Karras grid against a fine solve, from the same noise (float64)."""
    z = per_sample_normal(n, (2,), 0).double() * 80.0
    fine = solve_pf_ode(mixture, z, karras_sigmas(steps + 1), "heun")
    return {n_: float((solve_pf_ode(mixture, z, karras_sigmas(n_), "heun") - fine).norm(dim=1).mean())
            for n_ in grids}


def measure(set_name: str, pairs: str, seed: int, steps: int, root: Path, n: int, tag: str = "",
            overrides=()) -> dict:
    run = root / f"{set_name}_{pairs}_s{seed}_{steps}{'_' + tag if tag else ''}"
    train(set_name, pairs, seed, steps, run, overrides)
    torch.set_num_threads(1)
    d = diagnose(load_model(run), load_data(set_name).mixture, n=n, nfes=NFES, grid=18, steps=512, exact=True,
                 jump_map=False)
    return {"set": set_name, "pairs": pairs, "seed": seed, "steps": steps, "n": n, "tag": tag,
            "overrides": list(overrides),
            "gamma0": {k: round(d.coupled[(0.0, k)], 4) for k in NFES},
            "gamma1": {k: round(d.coupled[(1.0, k)], 4) for k in NFES},
            "floor18": round(d.floor, 4), "seconds_per_step": round(seconds_per_step(run), 4)}


def step_cost(steps: int, draws: list[str], set_name: str = "ring") -> dict:
    """Seconds per training step of each pair draw, one thread, in this process, GAN off and on (after 20 warm-up
    steps): what the per-sample teacher solves cost against the reference draw."""
    import tempfile
    import time

    from ctmkit.config import DistillConfig, load_config
    from ctmkit.train.ctm import CTMRun
    torch.set_num_threads(1)
    out = {}
    for gan in (False, True):
        for pairs in draws:
            cfg = load_config(DistillConfig, "toy", None, [f"ctm.pairs={pairs}", f"ctm.gan={str(gan).lower()}",
                                                            "ctm.gan_start=0"], data=set_name, teacher="exact")
            with tempfile.TemporaryDirectory() as tmp:
                run = CTMRun(cfg, Path(tmp) / "run", load_data(set_name))
                for _ in range(20):
                    run.train_step()
                t0 = time.perf_counter()
                for _ in range(steps):
                    run.train_step()
                out[f"{pairs}{' +gan' if gan else ''}"] = round((time.perf_counter() - t0) / steps, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="ring,grid", help="built-in mixtures (exact teacher)")
    ap.add_argument("--pairs", default="reference,uniform,all_the_way", help="ctm.pairs values")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds")
    ap.add_argument("--steps", type=int, default=3000, help="distillation steps (toy preset: 3000)")
    ap.add_argument("--n", type=int, default=1024, help="noise draws for the coupled error")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    ap.add_argument("--out", default="bench/out/pairs_2d", help="run folders")
    ap.add_argument("--json", default="bench/results/pairs_2d.json", help="results (merged)")
    ap.add_argument("--tag", default="", help="name of this variant (with the overrides)")
    ap.add_argument("--step-cost", type=int, default=0, help="only time STEPS training steps of each draw")
    ap.add_argument("overrides", nargs="*", help="extra key=value settings for distill")
    args = ap.parse_args()
    if args.step_cost:
        print(json.dumps(step_cost(args.step_cost, args.pairs.split(","))))
        return
    root, path = Path(args.out), Path(args.json)
    res = json.loads(path.read_text()) if path.exists() else {"runs": [], "floors": {}}
    have = {(r["set"], r["pairs"], r["seed"], r["steps"], r.get("tag", "")) for r in res["runs"]}
    todo = [(s, p, int(seed), args.steps) for s in args.sets.split(",") for p in args.pairs.split(",")
            for seed in args.seeds.split(",") if (s, p, int(seed), args.steps, args.tag) not in have]
    for s in args.sets.split(","):
        res["floors"].setdefault(s, floors(load_data(s).mixture, args.n))

    def one(job):
        row = measure(*job, root, args.n, args.tag, args.overrides)
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(one, todo):
            res["runs"].append(row)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["floors"]))


if __name__ == "__main__":
    main()
