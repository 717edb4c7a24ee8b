"""bench: max |difference| between ctmkit's Euler solve of a diffusers teacher (load_teacher("diffusers:DIR")) and the
scheduler's own deterministic loop (DDIM eta 0; flow-matching Euler), on the tiny random UNet2DModels of the tests.

    python bench/foreign_identities.py
"""

import pathlib
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ctmkit import load_teacher, solve_pf_ode  # noqa: E402
from ctmkit.core.precond import vp_sigmas  # noqa: E402
from tests.test_foreign_teachers import ddim, diffusers, save_pipeline, tiny_unet  # noqa: E402


@torch.no_grad()
def ddim_case(pred: str, classes, steps: int) -> tuple[float, float]:
    unet, sched = tiny_unet(classes=classes), ddim(pred)
    teacher = load_teacher(f"diffusers:{save_pipeline(pathlib.Path(tempfile.mkdtemp()), unet, sched)}")
    sched.set_timesteps(steps)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 3 if classes else None
    x_vp = x.clone()
    for t in sched.timesteps:
        x_vp = sched.step(unet(x_vp, t, class_labels=labels).sample, t, x_vp, eta=0.0).prev_sample
    sig = vp_sigmas(sched.alphas_cumprod)[sched.timesteps.long()]
    sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    ours = solve_pf_ode(teacher, x * float((1 + sig[0] ** 2).sqrt()), sigmas, "euler", labels)
    return float((ours - x_vp).abs().max()), float(x_vp.abs().max())


@torch.no_grad()
def flow_case(steps: int) -> tuple[float, float]:
    unet = tiny_unet(channels=3)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    teacher = load_teacher(f"diffusers:{save_pipeline(pathlib.Path(tempfile.mkdtemp()), unet, sched)}")
    sched.set_timesteps(sigmas=np.linspace(0.995, 0.02, steps))
    taus = sched.sigmas.double()
    x_f = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * float(taus[0])
    start = x_f.clone()
    for t in sched.timesteps:
        x_f = sched.step(unet(x_f, t).sample, t, x_f).prev_sample
    ours = solve_pf_ode(teacher, start / float(1 - taus[0]), taus / (1 - taus), "euler")
    return float((ours - x_f).abs().max()), float(x_f.abs().max())


def main() -> None:
    for pred in ("epsilon", "v_prediction", "sample"):
        for classes in (None, 3):
            for steps in (10, 50):
                err, mag = ddim_case(pred, classes, steps)
                print(f"DDIM {pred:13} classes={classes} steps={steps}: max|diff| {err:.2e} (max|x| {mag:.2f})")
    for steps in (10, 50):
        err, mag = flow_case(steps)
        print(f"flow matching steps={steps}: max|diff| {err:.2e} (max|x| {mag:.2f})")


if __name__ == "__main__":
    main()
