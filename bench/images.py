"""bench: the demo pipeline on images (digits or MNIST): teacher, CTM, sample grids at NFE 1, 2, 4, 8 and a
Frechet distance in the features of a small classifier trained on the same data (domain-specific, NOT FID).
Prints JSON with the figures and times; the run folder holds report.md and the grids.

    python bench/images.py --preset digits
    python bench/images.py --preset mnist --data ../shared/data/mnist train.steps=2000   # CPU-sized run
"""

import argparse
import json
import shutil
from pathlib import Path

from ctmkit.demo import run_demo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out or f"bench/out/images_{args.preset}")
    shutil.rmtree(out, ignore_errors=True)
    summary = run_demo(out, args.preset, args.data, tuple(args.overrides), progress=False,
                       echo=lambda *a, **k: None, eval_samples=args.eval_samples)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
