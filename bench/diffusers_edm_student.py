"""bench: distill the diffusers-built digits teacher (bench/diffusers_teacher.py) with the student in EDM's form
(ctm.student_precond=edm), STEPS steps (GAN from STEPS / 2, as the digits preset), and score CTM NFE 1/2/4 in the
classifier-feature Frechet distance.

    python bench/diffusers_edm_student.py [PIPELINE_DIR] [STEPS]    # defaults bench/out/diffusers_digits/pipeline, 300
"""
import json
import pathlib
import shutil
import sys
import time

import torch

from ctmkit import load_model
from ctmkit.config import DistillConfig, load_config
from ctmkit.data import load_data
from ctmkit.eval.generate import generate
from ctmkit.eval.quality import balanced_labels, make_quality
from ctmkit.metrics.frechet import feature_stats, frechet_distance
from ctmkit.train.ctm import CTMRun


def main() -> None:
    torch.set_num_threads(1)
    pipe = sys.argv[1] if len(sys.argv) > 1 else "bench/out/diffusers_digits/pipeline"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    data = load_data("digits")
    overrides = ["ctm.student_precond=edm", f"ctm.gan_start={steps // 2}", f"train.steps={steps}"]
    cfg = load_config(DistillConfig, "digits", None, overrides, data="digits", teacher=f"diffusers:{pipe}")
    out = pathlib.Path(f"bench/out/diffusers_digits/ctm_edm_{steps}")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    CTMRun(cfg, out, data).fit(progress=False)
    print("train s", round(time.time() - t0), flush=True)
    model = load_model(out)
    fd = make_quality("classifier", data, 1797)

    def score(x):
        return frechet_distance(*feature_stats(fd.features(x)), fd.mu_r, fd.s_r)

    print({k: round(score(generate(model, 1797, k, 0.0, 1, balanced_labels(model, 1797), progress=False)), 2)
           for k in (1, 2, 4)}, flush=True)
    for line in open(out / "stats.jsonl"):
        r = json.loads(line)
        print(r["step"], round(r["loss_ctm"], 3), round(r.get("loss_dsm", 0), 3))


if __name__ == "__main__":
    main()
