"""bench (issue 27): classifier-free guidance on digits, a label-dropout teacher and its CTMs.

    ctmkit train-teacher --preset digits --data digits --out bench/out/guidance_digits/teacher label_dropout=0.1
    python bench/guidance_digits.py --teacher bench/out/guidance_digits/teacher

distills (resumable, one thread) the unguided CTM (it keeps a null branch: the teacher's label dropout) and the CTM
of the guided teacher at W = 2 (ctm.guidance=2) with the digits preset, then samples n balanced labels (seed 1) from
the teacher (Heun 35) at W = 1, 2, 3, the unguided CTM at NFE 1/2/4 and W = 1, 2, 3 (sampled guidance) and the W = 2
CTM at NFE 1/2/4, and reports the classifier-feature Frechet distance (the `eval` metric's classifier, trained on the
data) and the class accuracy: the share of samples that classifier assigns to the label they were drawn for. Grids of
the first 100 samples (10 per class) go to OUT/grids/. One JSON line is appended to bench/results/guidance_digits.jsonl.
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
from ctmkit.core.sampling import gamma_sample, heun_sample, per_sample_normal, sample_schedule
from ctmkit.data import load_data
from ctmkit.eval.guide import guided_callables
from ctmkit.eval.quality import ClassifierFD
from ctmkit.eval.report import save_image_grid
from ctmkit.metrics.frechet import frechet_distance, streamed_stats

SCALES = (1.0, 2.0, 3.0)
NFES = (1, 2, 4)


def distill(teacher: str, out: Path, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "ctmkit", "distill", "--preset", "digits", "--data", "digits", "--teacher", teacher,
           "--out", str(out), "--quiet", *overrides]
    if (out / "checkpoints").exists():
        cmd.append("--resume")
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.time() - t0


@torch.no_grad()
def samples(model, w: float, nfe: int, n: int, is_ctm: bool, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples for balanced labels 0..9, 0.. (per-sample noise, seed 1) at guidance w: (x, labels)."""
    labels = torch.arange(n) % model.card.num_classes
    jump, denoise = guided_callables(model, w, is_ctm)
    card, out = model.card, []
    for s in range(0, n, batch):
        b = min(batch, n - s)
        z = per_sample_normal(b, (nfe,) + card.shape, 1, s)
        lab = labels[s:s + b]
        if is_ctm:
            out.append(gamma_sample(jump, z[:, 0], sample_schedule(nfe, card.sigma_min, card.sigma_max), 0.0,
                                    labels=lab, step_noise=z[:, 1:]))
        else:
            out.append(heun_sample(denoise, z[:, 0], nfe=nfe, labels=lab, sigma_max=card.sigma_max,
                                   sigma_min=card.sigma_min))
    return torch.cat(out), labels


def score(q: ClassifierFD, x: torch.Tensor, labels: torch.Tensor) -> dict:
    with torch.no_grad():
        mu, s = streamed_stats(q.features(x[i:i + 500]) for i in range(0, len(x), 500))
        acc = float((torch.cat([q.net(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]) == labels)
                    .float().mean())
    return {"fd": frechet_distance(mu, s, q.mu_r, q.s_r), "accuracy": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="bench/out/guidance_digits/teacher")
    ap.add_argument("--out", default="bench/out/guidance_digits")
    ap.add_argument("--n", type=int, default=1797)
    ap.add_argument("--json", default="bench/results/guidance_digits.jsonl")
    args = ap.parse_args()
    out = Path(args.out)
    secs = {name: round(distill(args.teacher, out / name, over), 1)
            for name, over in (("ctm", []), ("ctm_w2", ["ctm.guidance=2"]))}
    data = load_data("digits")
    q = ClassifierFD(data, n=args.n)
    points = [("teacher", args.teacher, False, w, 35) for w in SCALES]
    points += [("ctm", str(out / "ctm"), True, w, k) for w in SCALES for k in NFES]
    points += [("ctm_w2", str(out / "ctm_w2"), True, 2.0, k) for k in NFES]
    rows, grids = [], out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    for name, path, is_ctm, w, nfe in points:
        t0 = time.time()
        x, labels = samples(load_model(path), w, nfe, args.n, is_ctm)
        rows.append({"model": name, "w": w, "nfe": nfe, **score(q, x, labels), "sample_s": round(time.time() - t0, 1)})
        order = torch.argsort(labels[:100], stable=True)     # a row per class
        save_image_grid(x[:100][order], grids / f"{name}_w{w:g}_nfe{nfe}.png", nrow=10)
        print(json.dumps(rows[-1]), flush=True)
    line = {"n": args.n, "train_s": secs, "classifier_accuracy_on_data": q.info["classifier_accuracy"],
            "floor": q.floor()[1], "rows": rows}
    with Path(args.json).open("a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
