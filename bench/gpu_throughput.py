"""bench (GPU): training and sampling throughput of a CIFAR-10-sized CTM (the cifar10 preset's EDM DDPM++-like
UNet, ~58M parameters, 32x32x3), bf16 autocast.

Measures, with CUDA synchronisation around timed loops (after warm-up):
  - DSM teacher step (EDM loss) and CTM step (CTM + DSM + GAN, adaptive weights, k teacher Heun steps with the
    per-iteration k ~ P(k) prop. to k, averaged over many iterations) in images/s, and their cost ratio;
  - peak GPU memory of each;
  - one-step sampling (G(z, T, sigma_min) through ctmkit.gamma_sample) vs a bare backbone forward on the same
    batch: the preconditioning/jump overhead in percent.
Writes JSON (device, versions, figures) to --out.  On a CPU, --small runs a tiny model as a smoke test.

    python bench/gpu_throughput.py --out bench/results/gpu_throughput.json
    python bench/gpu_throughput.py --small --device cpu --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctmkit.config import DistillConfig, TeacherConfig, load_config
from ctmkit.core.sampling import gamma_sample
from ctmkit.core.schedules import sample_schedule
from ctmkit.data import load_data
from ctmkit.train.ctm import CTMRun
from ctmkit.train.teacher import TeacherRun


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> float:
    """Seconds per call of fn over n calls (after the caller's warm-up)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128, help="training batch (images per step)")
    ap.add_argument("--sample-batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="timed training steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="train.compile=true")
    ap.add_argument("--small", action="store_true", help="tiny UNet (CPU smoke test)")
    ap.add_argument("--out", default="bench/results/gpu_throughput.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    np.save(tmp / "cifar_like.npy", rng.integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8))
    data = load_data(str(tmp / "cifar_like.npy"))
    over = [f"train.precision={args.precision}", f"train.device={args.device}", "train.ckpt_every=1000000",
            f"train.compile={str(args.compile).lower()}", "model.dropout=0.0"]
    if args.small:
        over += ["model.channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]"]

    tcfg = load_config(TeacherConfig, "cifar10", None, over, data=str(tmp / "cifar_like.npy"),
                       **{"train.steps": 1, "train.batch_size": args.batch})
    teacher = TeacherRun(tcfg, tmp / "teacher", data)
    device = teacher.device
    params = sum(p.numel() for p in teacher.net.parameters())
    for _ in range(args.warmup):
        teacher.train_step()
    reset_peak(device)
    dsm_s = timed(teacher.train_step, args.steps, device)
    dsm_mem = peak_mb(device)
    teacher.fit(progress=False)   # one more step, then writes the run folder the CTM reads its teacher from

    res = {}
    for name, gan in (("ctm_gan", True), ("ctm_nogan", False)):
        dcfg = load_config(DistillConfig, "cifar10", None, [*over, f"ctm.gan={str(gan).lower()}", "ctm.gan_start=0"],
                           data=str(tmp / "cifar_like.npy"), teacher=str(tmp / "teacher"),
                           **{"train.steps": 1, "train.batch_size": args.batch})
        ctm = CTMRun(dcfg, tmp / name, data)
        for _ in range(args.warmup):
            ctm.train_step()
        reset_peak(device)
        res[name] = (timed(ctm.train_step, args.steps, device), peak_mb(device))
    net = ctm.emas[0].eval()

    # one-step sampling vs the bare backbone forward (same batch, same precision)
    z = torch.randn(args.sample_batch, 3, 32, 32, device=device) * dcfg.sigma_max
    sched = sample_schedule(1, dcfg.sigma_min, dcfg.sigma_max)
    t = torch.full((args.sample_batch,), dcfg.sigma_max, device=device)
    c_t, c_s = (t.log() / 4), (torch.full_like(t, dcfg.sigma_min).log() / 4)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if args.precision != "fp32" else torch.no_grad

    def sample_once():
        with torch.no_grad(), amp():
            gamma_sample(net, z / dcfg.sigma_max, sched)

    def bare_once():
        with torch.no_grad(), amp():
            net.backbone(z, c_t, c_s, None)

    for _ in range(3):
        sample_once()
        bare_once()
    n = max(5, args.steps)
    sample_s, bare_s = timed(sample_once, n, device), timed(bare_once, n, device)

    b = args.batch
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "precision": args.precision, "compile": args.compile, "backbone_params_M": round(params / 1e6, 2),
        "batch": b, "timed_steps": args.steps,
        "dsm_teacher_img_s": b / dsm_s, "dsm_peak_mem_MB": dsm_mem,
        "ctm_gan_img_s": b / res["ctm_gan"][0], "ctm_gan_peak_mem_MB": res["ctm_gan"][1],
        "ctm_nogan_img_s": b / res["ctm_nogan"][0], "ctm_nogan_peak_mem_MB": res["ctm_nogan"][1],
        "ctm_gan_over_dsm_cost": res["ctm_gan"][0] / dsm_s, "ctm_nogan_over_dsm_cost": res["ctm_nogan"][0] / dsm_s,
        "sample_batch": args.sample_batch, "one_step_sample_img_s": args.sample_batch / sample_s,
        "bare_backbone_img_s": args.sample_batch / bare_s, "one_step_overhead_pct": 100 * (sample_s / bare_s - 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
