"""bench: CTM variants on images: what the DSM and GAN terms do (the paper: DSM helps multi-step sampling, GAN
helps one step), and which training pair draw (ctm.pairs) serves images best.

Distills a CTM from one trained teacher once per variant with the same seed and budget (full objective,
ctm.dsm=false, ctm.gan=false, or one of the pair draws reference / uniform / all_the_way) and evaluates each at
NFE 1, 2, 4, 8 with gamma 0 and 1 in one shared metric: the Frechet distance in the features of a small classifier
trained on the data (domain-specific, not FID; fast on a CPU); --teacher-heun adds the teacher's Heun point in the
same metric. Extra key=value overrides apply to every variant. JSON + PNG.

    python bench/ablation_images.py --teacher bench/out/images_mnist_cpu/teacher --data ../shared/data/mnist \\
        --preset mnist_cpu --n 1000
    python bench/ablation_images.py --teacher T --data digits --preset digits \\
        --variants reference,uniform,all_the_way --teacher-heun 35 --out bench/out/pairs_digits
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

VARIANTS = {"full": [], "nodsm": ["ctm.dsm=false"], "nogan": ["ctm.gan=false"],
            **{p: [f"ctm.pairs={p}"] for p in ("reference", "uniform", "all_the_way")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--preset", default="mnist_cpu")
    ap.add_argument("--variants", default="full,nodsm,nogan")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default="bench/out/ablation_mnist")
    ap.add_argument("--teacher-heun", type=int, default=0, help="also the teacher's Heun point at this NFE")
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
            res[name] = {"overrides": [*args.overrides, *VARIANTS[name]], "train_seconds": train_s, "rows": rows}
            print(name, json.dumps(res[name]), flush=True)
            atomic_write_text(res_path, json.dumps(res, indent=1))
    if args.teacher_heun and "teacher" not in res:
        fd = fd or make_quality("classifier", data or load_data(cfg.data, n=cfg.n_data or None, seed=cfg.train.seed),
                                args.n)
        res["teacher"] = {"heun_nfe": args.teacher_heun,
                          "value": fd.point(load_model(args.teacher), "heun", args.teacher_heun, 0.0)[0]}
        print("teacher", json.dumps(res["teacher"]), flush=True)
        atomic_write_text(res_path, json.dumps(res, indent=1))
    series = {}
    for name, r in res.items():
        if name == "teacher":
            series[f"teacher heun {r['heun_nfe']}"] = ([1, 8], [r["value"]] * 2)
            continue
        for g in (0.0, 1.0):
            pts = [(x["nfe"], x["value"]) for x in r["rows"] if x["gamma"] == g]
            series[f"{name} gamma={g:g}"] = ([p[0] for p in pts], [p[1] for p in pts])
    save_curves(series, out / "ablation.png", "NFE", "classifier-feature Frechet distance", "CTM ablations")


if __name__ == "__main__":
    main()
