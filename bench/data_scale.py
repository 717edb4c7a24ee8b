"""bench: data at scale (issue 17): peak memory and time to the first step by data source, and sharded sampling.

    python bench/data_scale.py rss          # peak RSS of `ctmkit train-teacher` on a 737 MB uint8 .npy vs a tiny one
    python bench/data_scale.py first-step   # a 100k-image folder, its zip and the prepared .npy: time + peak RSS
    python bench/data_scale.py loader       # images/s of the training loader, 0 / 1 / 2 workers, folder / zip / .npy
    python bench/data_scale.py sample       # samples/s of `ctmkit sample` under torchrun with 1 and 2 processes
                                            # (wall time of the whole command, start-up included)

Every measured command is a fresh process (`python -m ctmkit ...`); peak RSS is its ru_maxrss (os.wait4), time is
its wall time. The files are written under bench/out/data_scale (several GB; removed with --clean).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

OUT = Path("bench/out/data_scale")
PY = sys.executable
# a tiny network and batch: the figures are about the data path, not the model
SMALL = ["model.channels=8", "model.channel_mult=[1,1,1,1]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
         "train.batch_size=16", "train.ckpt_every=1000", "train.log_every=1"]


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS (MiB) of one command, which must succeed."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out[-3000:]}")
    return {"seconds": round(time.time() - t0, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def train(data: Path, steps: int, tag: str, extra: list[str] = ()) -> dict:
    out = OUT / f"run_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    r = run([PY, "-m", "ctmkit", "train-teacher", "--data", str(data), "--out", str(out), "--quiet",
             "--steps", str(steps), *SMALL, *extra])
    shutil.rmtree(out, ignore_errors=True)
    return r


def rss() -> dict:
    """737 MB: 60,000 RGB 64x64 uint8 images (the issue's file); tiny: 600 of them."""
    OUT.mkdir(parents=True, exist_ok=True)
    big, tiny = OUT / "big64.npy", OUT / "tiny64.npy"
    if not big.exists():
        mm = np.lib.format.open_memmap(big, mode="w+", dtype=np.uint8, shape=(60000, 64, 64, 3))
        rng = np.random.default_rng(0)
        for i in range(0, 60000, 5000):
            mm[i:i + 5000] = rng.integers(0, 256, (5000, 64, 64, 3), dtype=np.uint8)
        mm.flush()
        del mm
        np.save(tiny, np.load(big, mmap_mode="r")[:600])
    res = {"file_mb": round(big.stat().st_size / 1e6, 1)}
    for steps in (1, 20):
        res[f"tiny_{steps}"] = train(tiny, steps, "tiny")
        res[f"big_{steps}"] = train(big, steps, "big")
    res["extra_rss_mib"] = round(res["big_20"]["peak_rss_mib"] - res["tiny_20"]["peak_rss_mib"], 1)
    return res


def _png_set(n: int, side: int = 32) -> tuple[Path, Path]:
    """n RGB PNGs in 10 class folders (a CIFAR-sized set), and the same as an EDM zip with dataset.json."""
    from PIL import Image
    folder, zpath = OUT / f"folder{n}", OUT / f"set{n}.zip"
    if not folder.exists():
        tmp = OUT / f"folder{n}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        rng = np.random.default_rng(1)
        for c in range(10):
            (tmp / f"c{c}").mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp / f"c{i % 10}" / f"{i:06d}.png", compress_level=1)
        tmp.rename(folder)
    if not zpath.exists():
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
        with zipfile.ZipFile(str(zpath) + ".tmp", "w", zipfile.ZIP_STORED) as z:
            for name in names:
                z.write(folder / name, name)
            z.writestr("dataset.json", json.dumps({"labels": [[name, int(name[1])] for name in names]}))
        os.replace(str(zpath) + ".tmp", zpath)
    return folder, zpath


def first_step(n: int = 100_000) -> dict:
    folder, zpath = _png_set(n)
    npy = OUT / f"prepared{n}.npy"
    res = {"images": n}
    if not npy.exists():
        res["prepare"] = run([PY, "-m", "ctmkit", "prepare", str(zpath), str(npy), "--quiet"])
    for tag, data in (("folder", folder), ("zip", zpath), ("npy", npy)):
        res[f"{tag}_1_step"] = train(data, 1, tag)
        res[f"{tag}_50_steps"] = train(data, 50, tag)
        res[f"{tag}_50_steps_2_workers"] = train(data, 50, tag, ["train.workers=2"])
    return res


def loader(n: int = 100_000, batch: int = 128, steps: int = 40) -> dict:
    """Images/s the training loader delivers (read, decode, slice; no model) for the CIFAR-sized folder, zip and .npy of
    the first-step bench, with 0 (in process), 1 and 2 worker processes: what a training step's appetite is set
    against (one process, batch 128, after 2 warm-up steps)."""
    from ctmkit.data import load_data
    from ctmkit.data.loader import BatchPlan, StepBatches, StepLoader
    folder, zpath = _png_set(n)
    res = {"batch": batch, "steps": steps}
    for tag, spec in (("folder", folder), ("zip", zpath), ("npy", OUT / f"prepared{n}.npy")):
        data = load_data(str(spec))
        for workers in (0, 1, 2):
            ld = StepLoader(StepBatches(data, BatchPlan(batch, seed=0, xflip=True)), 0, workers)
            for step in range(2):
                ld.get(step)
            t0 = time.time()
            for step in range(2, 2 + steps):
                x = ld.get(step)["raw"]
                data.normalizer.to_model_batch(x)
            res[f"{tag}_workers{workers}_images_per_s"] = round(batch * steps / (time.time() - t0))
            ld.close()
    return res


def sample(n: int = 20000) -> dict:
    """A tiny CTM-less teacher run on digits, sampled with Heun 8 steps: samples/s with 1 and 2 processes."""
    run_dir = OUT / "digits_teacher"
    if not (run_dir / "model.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        run([PY, "-m", "ctmkit", "train-teacher", "--data", "digits", "--out", str(run_dir), "--quiet", "--steps", "1",
             *SMALL])
    res = {"n": n}
    for procs in (1, 2):
        out = OUT / f"samples_{procs}.npz"
        threads = str(max(1, (os.cpu_count() or 2) // procs))
        r = run([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "ctmkit",
                 "sample", "--model", str(run_dir), "--num-samples", str(n), "--nfe", "8", "--batch-size", "250",
                 "--out", str(out), "--force", "--quiet"], env={"OMP_NUM_THREADS": threads})
        res[f"procs_{procs}"] = {**r, "samples_per_s": round(n / r["seconds"], 1), "threads_each": int(threads)}
    a, b = (np.load(OUT / f"samples_{k}.npz") for k in (1, 2))
    res["equal_1_vs_2"] = bool(all(np.array_equal(a[k], b[k]) for k in a.files))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["rss", "first-step", "loader", "sample"])
    ap.add_argument("--n", type=int, default=100_000, help="images of the first-step bench")
    ap.add_argument("--num-samples", type=int, default=20000, help="samples of the sampling bench")
    ap.add_argument("--clean", action="store_true", help="remove bench/out/data_scale afterwards")
    args = ap.parse_args()
    jobs = {"rss": rss, "first-step": lambda: first_step(args.n), "loader": lambda: loader(args.n),
            "sample": lambda: sample(args.num_samples)}
    res = jobs[args.what]()
    print(json.dumps(res, indent=1))
    if args.clean:
        shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
