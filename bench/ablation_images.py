"""bench: what the DSM and GAN terms do on images (the paper: DSM helps multi-step sampling, GAN helps one step).

Distills a CTM from one trained teacher three times with the same seed and budget (full objective, ctm.dsm=false,
ctm.gan=false) and evaluates each at NFE 1, 2, 4, 8 with gamma 0 and 1 in one shared metric: the Frechet distance
in the features of a small classifier trained on the data (domain-specific, not FID; fast on a CPU). JSON + PNG.

    python bench/ablation_images.py --teacher bench/out/images_mnist_cpu/teacher --data ../shared/data/mnist \\
        --preset mnist_cpu --n 1000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ctmkit import load_model
from ctmkit.config import DistillConfig, load_config
from ctmkit.data import load_data
from ctmkit.eval.quality import make_quality
from ctmkit.eval.report import save_curves
from ctmkit.io.atomic import atomic_write_text
from ctmkit.train.ctm import CTMRun

VARIANTS = {"full": [], "nodsm": ["ctm.dsm=false"], "nogan": ["ctm.gan=false"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--preset", default="mnist_cpu")
    ap.add_argument("--variants", default="full,nodsm,nogan")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default="bench/out/ablation_mnist")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "ablation.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    fd, data = None, None
    for name in args.variants.split(","):
        cfg = load_config(DistillConfig, args.preset, None, [*args.overrides, *VARIANTS[name]], data=args.data,
                          teacher=args.teacher)
        run_dir = out / name
        if not (run_dir / "checkpoints").exists() or name not in res:
            data = load_data(cfg.data, n=cfg.n_data or None, seed=cfg.train.seed)
            t0 = time.time()
            CTMRun(cfg, run_dir, data, resume=(run_dir / "checkpoints").exists()).fit(progress=False)
            train_s = time.time() - t0
            if fd is None:
                fd = make_quality("classifier", data, args.n)
            model = load_model(run_dir)
            rows = [{"nfe": k, "gamma": g, "value": fd.point(model, "gamma", k, g)[0]} for g in (0.0, 1.0)
                    for k in (1, 2, 4, 8)]
            res[name] = {"overrides": VARIANTS[name], "train_seconds": train_s, "rows": rows}
            print(name, json.dumps(res[name]), flush=True)
            atomic_write_text(res_path, json.dumps(res, indent=1))
    series = {}
    for name, r in res.items():
        for g in (0.0, 1.0):
            pts = [(x["nfe"], x["value"]) for x in r["rows"] if x["gamma"] == g]
            series[f"{name} gamma={g:g}"] = ([p[0] for p in pts], [p[1] for p in pts])
    save_curves(series, out / "ablation.png", "NFE", "classifier-feature Frechet distance", "CTM ablations")


if __name__ == "__main__":
    main()
