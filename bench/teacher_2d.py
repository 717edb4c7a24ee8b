"""bench: an EDM teacher trained by `ctmkit train-teacher` on each built-in 2-D set, sampled with Heun at 35 NFE.

Prints JSON: per set, the sliced-W1 ratio to the true-vs-true floor (target < 2) and the training time.
    python bench/teacher_2d.py [--sets ring,moons] [--steps N] [--out bench/out/teacher_2d]
"""

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
from ctmkit.eval.quality import SWDQuality
from ctmkit.eval.sweep import sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="ring,grid,moons,checkerboard,spiral")
    ap.add_argument("--steps", type=int, default=None, help="override the toy preset's teacher steps")
    ap.add_argument("--out", default="bench/out/teacher_2d")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    results = {}
    for name in args.sets.split(","):
        out = Path(args.out) / name
        cmd = [sys.executable, "-m", "ctmkit", "train-teacher", "--data", name, "--out", str(out), "--preset", "toy",
               "--quiet"] + (["--steps", str(args.steps)] if args.steps else [])
        if (out / "checkpoints").exists():
            cmd.append("--resume")
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        train_s = time.time() - t0
        data = load_data(name)
        row = sweep(load_model(out), data, [("heun", 35, 0.0)], SWDQuality(data)).rows[0]
        results[name] = {"heun35_swd_ratio": row.value, "swd": row.extras["swd"], "floor": row.extras["floor"],
                         "train_seconds": round(train_s, 1), "target_ratio": 2.0, "pass": row.value < 2.0}
        print(json.dumps({name: results[name]}), file=sys.stderr)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
