"""bench: the default `ctmkit distill --teacher exact --data SET` (no preset) as training goes on, by coupled error.

Trains in segments (resuming the same run) and after each segment measures the coupled error of the CTM's gamma-0
sample at NFE 1/2/4/8 against the exact PF-ODE solution from the same noise, beside the floor (the teacher's Heun
solve on the 18-point training grid), with the wall time so far. This answers how many steps the default needs to
reach a given multiple of the floor, and whether that fits a time budget.

    python bench/default_2d.py --set ring --pairs reference --every 2000 --steps 16000
    python bench/default_2d.py --set ring --pairs all_the_way --every 2000 --steps 16000

Threads: OMP_NUM_THREADS (default 2, as `ctmkit distill` gets on the 2-core machine). JSON lines to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ctmkit import load_model
from ctmkit.data import load_data
from ctmkit.eval.diagnostics import diagnose

NFES = (1, 2, 4, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="ring")
    ap.add_argument("--pairs", default="reference")
    ap.add_argument("--every", type=int, default=2000, help="steps per segment")
    ap.add_argument("--steps", type=int, default=16000, help="total steps")
    ap.add_argument("--n", type=int, default=1024, help="noise draws for the coupled error")
    ap.add_argument("--out", default="bench/out/default_2d")
    ap.add_argument("--json", default="bench/results/default_2d.jsonl")
    ap.add_argument("--tag", default="")
    ap.add_argument("overrides", nargs="*", help="extra key=value settings for distill")
    args = ap.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    torch.set_num_threads(int(threads))
    name = f"{args.set}_{args.pairs}{'_' + args.tag if args.tag else ''}"
    run, mixture = Path(args.out) / name, load_data(args.set).mixture
    train_s = 0.0
    for end in range(args.every, args.steps + 1, args.every):
        cmd = [sys.executable, "-m", "ctmkit", "distill", "--teacher", "exact", "--data", args.set, "--out", str(run),
               "--steps", str(end), "--ckpt-every", str(args.every), "--quiet", f"ctm.pairs={args.pairs}",
               *args.overrides] + (["--resume"] if (run / "checkpoints").exists() else [])
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": threads})
        train_s += time.time() - t0
        d = diagnose(load_model(run), mixture, n=args.n, nfes=NFES, grid=18, steps=512, exact=True, jump_map=False)
        row = {"set": args.set, "pairs": args.pairs, "tag": args.tag, "overrides": args.overrides, "steps": end,
               "threads": int(threads), "train_seconds": round(train_s, 1),
               "gamma0": {k: round(d.coupled[(0.0, k)], 4) for k in NFES}, "floor18": round(d.floor, 4),
               "nfe1_over_floor": round(d.coupled[(0.0, 1)] / d.floor, 2)}
        print(json.dumps(row), flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
