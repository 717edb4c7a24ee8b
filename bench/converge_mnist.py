"""bench (issue 25, point 5): the default's sampled weights confirmed on MNIST, by FID (Inception-v3 pool3, n samples
against the statistics of n training images). One teacher and one CTM distilled with today's defaults, `mnist_cpu`
sized, two threads:

    ctmkit train-teacher --preset mnist_cpu --data ../shared/data/mnist --out bench/out/converge_mnist/teacher
    ctmkit distill --preset mnist_cpu --teacher bench/out/converge_mnist/teacher --data ../shared/data/mnist \\
        --out bench/out/converge_mnist/ctm --steps 2500 --ckpt-every 500 ctm.gan_start=1250
    python bench/converge_mnist.py

Measured from the same run: the training EMA (train.ema's first rate, the sampled weights before issue 25) and
post-hoc EMA widths rebuilt from RUN/phema at the last step (0.05 is the new default, `ctm.sample_sigma_rel`; the
raw weights are left out to keep the Inception time down); gamma-0 samples with balanced labels (seed 1), beside the
teacher's Heun 35 and the FID of n real test images (the floor at this n). Resumable: each finished point is written
to --json at once and skipped later.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from converge_2d import weights
from mnist_fid import test_split

from ctmkit import load_model
from ctmkit.data import load_data
from ctmkit.eval.generate import generate
from ctmkit.io.atomic import atomic_write_text
from ctmkit.metrics.fid import InceptionFeatures, fid_stats, reference_stats
from ctmkit.metrics.frechet import frechet_distance

WIDTHS = (0.05, 0.1, 0.2)
NFES = {"ema": (1, 4), "phema 0.05": (1, 2, 4), "phema 0.1": (1,), "phema 0.2": (1,)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="bench/out/converge_mnist", help="folder holding teacher/ and ctm/")
    ap.add_argument("--data", default="../shared/data/mnist")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json", default="bench/results/converge_mnist.json")
    a = ap.parse_args()
    out = Path(a.json)
    res = json.loads(out.read_text()) if out.exists() else {"n": a.n, "fid": {}}
    data = load_data(a.data)
    inc = InceptionFeatures()
    ref = reference_stats(data, a.n, features=inc)
    labels = torch.arange(a.n) % data.num_classes

    def point(key: str, stats) -> None:
        """FID of stats() = (mu, sigma) against the reference, unless already in the JSON."""
        if key not in res["fid"]:
            t0 = time.time()
            res["fid"][key] = {"fid": frechet_distance(*stats(), *ref), "seconds": time.time() - t0}
            atomic_write_text(out, json.dumps(res, indent=1))
        print(f"{key:24s} FID {res['fid'][key]['fid']:7.2f}", flush=True)

    def samples(model, k: int, sampler: str):
        return lambda: fid_stats(inc(generate(model, a.n, k, 0.0, 1, labels, 500, sampler, progress=False)))

    point("real test", lambda: reference_stats(load_data(str(test_split(Path(a.data)))), a.n, features=inc))
    teacher = load_model(Path(a.runs) / "teacher")
    point("teacher heun 35", samples(teacher, 35, "heun"))
    for name, model in weights(Path(a.runs) / "ctm", WIDTHS, "ema"):
        model.eval()
        for k in NFES.get(name, ()):
            point(f"{name} nfe {k}", samples(model, k, "gamma"))


if __name__ == "__main__":
    main()
