"""bench (issue 28, point 4): zero-shot editing on digits with the class-conditional digits CTM of
bench/guidance_digits.py (it keeps a null branch, label -1) and its teacher: inpainting (the bottom half unknown),
super-resolution x2 (the 4x4 block means given), SDEdit from a blurred input (Gaussian blur, std 1 pixel; t0 = 0.25,
0.5, 1) and inversion (data -> noise with the model's own score, 64 Heun steps -> 1 or 4 jumps back).

Inputs: `--m` digits drawn at random (seed 3) from the 1797 of scikit-learn's set (the only digits there are: the
models were trained on them too). Each edit runs through `ctmkit edit`'s engine (eval/editing.py: run_edit) with
`--n` draws per input, with the null label (-1: the model does not know the class) and with the input's own label.
Class agreement: the share of edited samples that the `eval` metric's classifier (trained on digits) assigns to the
original's class; beside it the classifier on the observation itself (the masked image, the enlarged block means,
the blurred input) and the error of the result against the original (RMS over the pixels the observation hides, in
model space [-1, 1]). Grids of the CTM at NFE 4 and the teacher (SDEdit: t0 = 0.5; one row per input: input,
observation, 4 results) in bench/results/edit_digits/.

    OMP_NUM_THREADS=1 python bench/edit_digits.py --out bench/results/edit_digits.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ctmkit import load_model
from ctmkit.core.sampling import sample_schedule
from ctmkit.data import load_data
from ctmkit.eval.editing import Edit, observation, run_edit, save_edit_grid
from ctmkit.eval.quality import ClassifierFD


def blur(x: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-r ** 2 / (2 * std ** 2))
    k = (k / k.sum())[:, None] * (k / k.sum())[None]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k[None, None].expand(x.shape[1], 1, 5, 5),
                    groups=x.shape[1])


def edits(x: torch.Tensor, labels: torch.Tensor) -> dict:
    """task -> (Edit inputs, mask or None, factor, what the observation hides as a bool mask over pixels)."""
    top = torch.zeros(1, *x.shape[1:], dtype=torch.bool)
    top[..., : x.shape[2] // 2, :] = True
    low = F.avg_pool2d(x, 2)
    return {"inpaint": (x, top, 1, ~top.expand_as(x)), "superres": (low, None, 2, torch.ones_like(x, dtype=torch.bool)),
            "sdedit": (blur(x), None, 1, torch.ones_like(x, dtype=torch.bool)),
            "invert": (x, None, 1, torch.ones_like(x, dtype=torch.bool))}


def agreement(q, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((q.net(x).argmax(1) == labels).float().mean())


def one(model, q, task, inputs, mask, factor, hidden, x, labels, lab, nfe, gamma, n, t0=None) -> dict:
    card = model.card
    top = t0 if task == "sdedit" else card.sigma_max
    sig = sample_schedule(nfe, card.sigma_min, top)
    e = Edit(task, inputs, sig, gamma, n, 0, mask, factor, lab, 64)
    res = run_edit(model, e, batch_size=512, progress=False)
    s = res["samples"]
    orig = x.repeat_interleave(n, 0)
    h = hidden.expand_as(x).repeat_interleave(n, 0)
    rms = float(((s - orig)[h] ** 2).mean().sqrt())
    return {"agreement": agreement(q, s, labels.repeat_interleave(n)), "rms_hidden": rms, "edit": e, "result": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctm", default="bench/out/guidance_digits/ctm")
    ap.add_argument("--teacher", default="bench/out/guidance_digits/teacher")
    ap.add_argument("--m", type=int, default=200)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--out", default="bench/results/edit_digits.json")
    ap.add_argument("--grids", default="bench/results/edit_digits")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()
    data = load_data("digits")
    q = ClassifierFD(data, n=500)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))[: a.m]
    x, labels = data[idx], data.labels[idx]
    null = torch.full_like(labels, -1)
    ctm, teacher = load_model(a.ctm).eval(), load_model(a.teacher).eval()
    grids = Path(a.grids)
    grids.mkdir(parents=True, exist_ok=True)
    rows = []
    for task, (inputs, mask, factor, hidden) in edits(x, labels).items():
        obs = {"invert": None, "sdedit": inputs}.get(task) if task in ("invert", "sdedit") else \
            observation(Edit(task, inputs, sample_schedule(1), mask=mask, factor=factor), None)
        base = None if obs is None else agreement(q, obs, labels)
        gamma = 1.0 if task in ("inpaint", "superres") else 0.0
        points = [("ctm", ctm, k, lab_name, lab) for k in (1, 2, 4) for lab_name, lab in (("null", null),
                                                                                           ("own", labels))]
        points.append(("teacher heun", teacher, 18, "null", null))
        for name, model, nfe, lab_name, lab in points:
            for t0 in ((0.25, 0.5, 1.0) if task == "sdedit" else (None,)):
                t = time.time()
                r = one(model, q, task, inputs, mask, factor, hidden, x, labels, lab, nfe, gamma,
                        a.n if task != "invert" else 1, t0)
                tag = f"{task}_{name.split()[0]}_nfe{nfe}_{lab_name}" + ("" if t0 is None else f"_t0{t0:g}")
                if nfe in (4, 18) and t0 in (None, 0.5):
                    save_edit_grid(r["edit"], r["result"], grids / f"{tag}.png", rows=16, cols=4)
                rows.append({"task": task, "model": name, "nfe": nfe, "labels": lab_name, "gamma": gamma, "t0": t0,
                             "agreement": r["agreement"], "rms_hidden": r["rms_hidden"],
                             "observation_agreement": base, "seconds": round(time.time() - t, 1)})
                print(json.dumps(rows[-1]), flush=True)
    out = {"m": a.m, "n": a.n, "classifier_accuracy_on_data": q.info["classifier_accuracy"], "rows": rows,
           "seconds": round(time.time() - t_start, 1)}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"{out['seconds']} s")


if __name__ == "__main__":
    main()
