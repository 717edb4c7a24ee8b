"""bench (issue 25, point 5): the pair draw and the sampled weights on digits. Each run is a digits-preset distill
from the same teacher (the label-dropout digits teacher of bench/guidance_digits.py, seed 0, 1500 steps, one
thread); `ref` is bench/guidance_digits.py's unguided CTM (the defaults), `mixed` the same with ctm.pairs=mixed:

    ctmkit distill --preset digits --data digits --teacher bench/out/guidance_digits/teacher \\
        --out bench/out/converge_digits/mixed --quiet ctm.pairs=mixed
    python bench/converge_digits.py --runs "ref=bench/out/guidance_digits/ctm;mixed=bench/out/converge_digits/mixed"

For each run and each choice of weights (the training EMA 0.999, post-hoc EMA widths rebuilt from the snapshots,
the raw weights): the classifier-feature Frechet distance (the `eval` metric's classifier) of n gamma-0 samples with
balanced labels (seed 1) at NFE 1, 2, 4, beside the teacher's Heun 35 (bench/guidance_digits.py: samples, score).
One JSON object to --json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from converge_2d import weights
from guidance_digits import samples, score

from ctmkit import load_model
from ctmkit.data import load_data
from ctmkit.eval.quality import ClassifierFD

NFES = (1, 2, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="ref=bench/out/guidance_digits/ctm;mixed=bench/out/converge_digits/mixed")
    ap.add_argument("--teacher", default="bench/out/guidance_digits/teacher")
    ap.add_argument("--n", type=int, default=1797)
    ap.add_argument("--json", default="bench/results/converge_digits.json")
    a = ap.parse_args()
    t0 = time.time()
    q = ClassifierFD(load_data("digits"), n=a.n)
    out = {"n": a.n, "floor": q.floor()[1], "teacher_heun35": score(q, *samples(load_model(a.teacher), 1.0, 35, a.n,
                                                                                  False))["fd"], "runs": {}}
    print(f"floor {out['floor']:.3f}  teacher Heun 35 {out['teacher_heun35']:.3f}", flush=True)
    for spec in a.runs.split(";"):
        name, run = spec.split("=", 1)
        rows = {}
        for wname, model in weights(Path(run)):
            model.eval()
            rows[wname] = {str(k): score(q, *samples(model, 1.0, k, a.n, True))["fd"] for k in NFES}
            print(f"{name:6s} {wname:12s} " + "  ".join(f"NFE {k} {rows[wname][str(k)]:.3f}" for k in NFES),
                  flush=True)
        out["runs"][name] = {"path": run, "fd": rows}
    out["seconds"] = round(time.time() - t0, 1)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"{out['seconds']} s")


if __name__ == "__main__":
    main()
