"""bench: CTM distillation on 2-D data (issue: CTM itself). Prints JSON.

For each case, distills a CTM with the toy preset and reports the sliced-W1 ratio to the true-vs-true floor at
NFE 1, 2, 4, 8 for gamma 0 and gamma 1, beside the teacher's Heun sweep, plus training time. Cases:
  ring:exact      the exact mixture teacher (target: CTM NFE1 ratio < 1.5)
  NAME            the teacher trained by bench/teacher_2d.py in bench/out/teacher_2d/NAME
                  (target: CTM NFE1 ratio < 1.5 x the teacher's Heun-35 ratio)
Variants: full, nodsm (ctm.dsm=false), nogan (ctm.gan=false).
    python bench/ctm_2d.py --cases ring:exact,moons --variants full,nodsm,nogan
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
from ctmkit.eval.sweep import heun_nfes, sweep

VARIANTS = {"full": [], "nodsm": ["ctm.dsm=false"], "nogan": ["ctm.gan=false"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="ring:exact,ring,grid,moons,checkerboard,spiral")
    ap.add_argument("--variants", default="full")
    ap.add_argument("--teachers", default="bench/out/teacher_2d")
    ap.add_argument("--out", default="bench/out/ctm_2d")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    results = {}
    for case in args.cases.split(","):
        name, _, kind = case.partition(":")
        data = load_data(name)
        teacher = "exact" if kind == "exact" else str(Path(args.teachers) / name)
        ref = None
        if teacher != "exact":
            rows = sweep(load_model(teacher), data, [("heun", n, 0.0) for n in heun_nfes()], SWDQuality(data)).rows
            ref = {r.nfe: round(r.value, 3) for r in rows}
        for variant in args.variants.split(","):
            out = Path(args.out) / f"{name}_{kind or 'teacher'}_{variant}"
            cmd = [sys.executable, "-m", "ctmkit", "distill", "--teacher", teacher, "--data", name, "--out", str(out),
                   "--preset", "toy", "--quiet", *VARIANTS[variant]] + (["--steps", str(args.steps)] if args.steps
                                                                         else [])
            if (out / "checkpoints").exists():
                cmd.append("--resume")
            t0 = time.time()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            train_s = time.time() - t0
            points = [("gamma", n, g) for g in (0.0, 1.0) for n in (1, 2, 4, 8)]
            rows = sweep(load_model(out), data, points, SWDQuality(data)).rows
            res = {"ctm_gamma0": {r.nfe: round(r.value, 3) for r in rows if r.gamma == 0.0},
                   "ctm_gamma1": {r.nfe: round(r.value, 3) for r in rows if r.gamma == 1.0},
                   "teacher_heun": ref, "train_seconds": round(train_s, 1)}
            nfe1 = res["ctm_gamma0"][1]
            if ref is None:
                res.update(target="nfe1 ratio < 1.5", pass_=nfe1 < 1.5)
            else:
                res.update(target="nfe1 ratio < 1.5 x teacher heun35", nfe1_over_heun35=round(nfe1 / ref[35], 3),
                           pass_=nfe1 < 1.5 * ref[35])
            results[f"{case}/{variant}"] = res
            print(json.dumps({f"{case}/{variant}": res}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
