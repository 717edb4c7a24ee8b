"""bench: a teacher built from diffusers' own components, distilled by ctmkit.

1. Train a small class-conditional diffusers `UNet2DModel` on scikit-learn digits (8x8) with `DDPMScheduler.add_noise`
   and the epsilon loss (`--prediction v_prediction`: the v loss, target `DDPMScheduler.get_velocity`; diffusers ships
   no training loop: this short one is the bench's), then save it with `save_pretrained` as a pipeline folder
   (unet/ + scheduler/).
2. Sample it with diffusers' own DDIM loop (eta 0) at 10 and 50 steps.
3. `ctmkit distill --teacher diffusers:DIR --data digits --preset digits` (the student is the teacher's UNet with an
   s-embedding), then sample the CTM at NFE 1, 2, 4 (gamma 0).
All points in one metric: the Frechet distance in the features of a small classifier trained on digits (as
bench/images.py; domain-specific, not FID), n samples each, class-balanced labels.

    python bench/diffusers_teacher.py --steps 4000 --out bench/out/diffusers_digits
    python bench/diffusers_teacher.py --steps 3000 --prediction v_prediction --out bench/out/diffusers_digits_v \
        --json bench/results/diffusers_digits_v.json
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
from ctmkit.eval.generate import generate
from ctmkit.eval.quality import balanced_labels, make_quality
from ctmkit.metrics.frechet import feature_stats, frechet_distance


def train_teacher(data, steps: int, batch: int, folder: Path, seed: int = 0, prediction: str = "epsilon") -> float:
    import diffusers
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=16,
                                 num_class_embeds=10, dropout=0.1)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction,
                                    clip_sample=False)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    ema = [p.detach().clone() for p in unet.parameters()]
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x0, labels = data.x[idx], data.labels[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        target = noise if prediction == "epsilon" else sched.get_velocity(x0, noise, t)
        loss = ((unet(sched.add_noise(x0, noise, t), t, class_labels=labels).sample - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        for grp in opt.param_groups:
            grp["lr"] = 1e-3 * min(1.0, (step + 1) / 200)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p, 1 - 0.999)
        if step % 500 == 0:
            print(f"teacher step {step} loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    unet.eval().save_pretrained(folder / "unet")
    sched.save_pretrained(folder / "scheduler")
    return time.time() - t0


@torch.no_grad()
def ddim_samples(folder: Path, n: int, steps: int, seed: int = 1) -> torch.Tensor:
    import diffusers
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).eval()
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler", clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    x = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % 10
    for t in sched.timesteps:
        x = sched.step(unet(x, t, class_labels=labels).sample, t, x, eta=0.0).prev_sample
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000, help="teacher training steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prediction", default="epsilon", choices=["epsilon", "v_prediction"], help="the teacher's target")
    ap.add_argument("--n", type=int, default=1797, help="samples per point")
    ap.add_argument("--out", default="bench/out/diffusers_digits")
    ap.add_argument("--json", default="bench/results/diffusers_digits.json")
    ap.add_argument("overrides", nargs="*", help="extra key=value settings for ctmkit distill")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    out, data = Path(args.out), load_data("digits")
    pipe, res = out / "pipeline", {"teacher_steps": args.steps, "n": args.n, "prediction": args.prediction}
    if not (pipe / "unet").exists():
        res["teacher_seconds"] = round(train_teacher(data, args.steps, args.batch, pipe, prediction=args.prediction), 1)
    fd = make_quality("classifier", data, args.n)
    score = lambda x: frechet_distance(*feature_stats(fd.features(x)), fd.mu_r, fd.s_r)   # noqa: E731
    res["ddim"] = {str(k): round(score(ddim_samples(pipe, args.n, k)), 3) for k in (10, 50)}
    print(json.dumps(res), flush=True)
    run = out / "ctm"
    if not (run / "checkpoints").exists():
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "ctmkit", "distill", "--teacher", f"diffusers:{pipe}", "--data",
                        "digits", "--preset", "digits", "--out", str(run), "--quiet", *args.overrides], check=True)
        res["ctm_seconds"] = round(time.time() - t0, 1)
    ctm = load_model(run)
    res["ctm"] = {str(k): round(score(generate(ctm, args.n, k, 0.0, 1, balanced_labels(ctm, args.n),
                                               progress=False)), 3) for k in (1, 2, 4)}
    res["classifier_accuracy"] = fd.info["classifier_accuracy"]
    print(json.dumps(res), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
