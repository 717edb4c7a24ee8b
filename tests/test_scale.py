"""Scale: the trained weights do not depend on how the global batch is split (ranks x micro-batches), and a
resumed run equals an uninterrupted one. The 2-process runs go through torchrun and the CLI (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ctmkit.config import DistillConfig, TeacherConfig, load_config
from ctmkit.data import load_data
from ctmkit.io.checkpoint import load_latest
from ctmkit.train.ctm import CTMRun
from ctmkit.train.teacher import TeacherRun

TINY = ["model.hidden=32", "model.depth=2", "model.emb_dim=32", "log_every=1", "train.ema=[0.9]"]
# DSM and GAN on, adaptive weights, the GAN from step 2: every term of the objective takes part
CTM_OPTS = ["ctm.num_scales=8", "ctm.max_k=7", "ctm.gan_start=2", "ctm.target_ema=0.9", "lr=1e-3"]


def final_state(run_dir) -> dict:
    st, _ = load_latest(run_dir / "checkpoints")
    return st


def assert_same_nets(a: dict, b: dict, atol: float) -> None:
    assert a["step"] == b["step"]
    for net in a["nets"]:
        for k, v in a["nets"][net].items():
            assert torch.allclose(v.double(), b["nets"][net][k].double(), atol=atol, rtol=0), (net, k)


def assert_moved(a: dict, init_like: dict) -> None:
    """Guard against a vacuous comparison: training changed the weights."""
    assert any(not torch.equal(v, init_like["nets"]["net"][k]) for k, v in a["nets"]["net"].items())


def teacher_cfg(steps, batch, extra=()):
    return load_config(TeacherConfig, None, None, [*TINY, *extra], data="ring",
                       **{"train.steps": steps, "train.batch_size": batch, "train.ckpt_every": steps})


def ctm_cfg(steps, batch, extra=()):
    return load_config(DistillConfig, None, None, [*TINY, *CTM_OPTS, *extra], data="ring", teacher="exact",
                       **{"train.steps": steps, "train.batch_size": batch, "train.ckpt_every": steps})


def test_micro_batches_equal_one_big_batch_teacher(tmp_path):
    data = load_data("ring")
    TeacherRun(teacher_cfg(4, 64), tmp_path / "one", data).fit(progress=False)
    TeacherRun(teacher_cfg(4, 64, ["train.micro_batches=2"]), tmp_path / "two", data).fit(progress=False)
    TeacherRun(teacher_cfg(1, 64), tmp_path / "first", data).fit(progress=False)
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert_moved(a, final_state(tmp_path / "first"))
    assert_same_nets(a, b, atol=1e-6)


def test_micro_batches_equal_one_big_batch_ctm(tmp_path):
    """With fixed loss weights the whole CTM + DSM + GAN step is linear in the micro-batch split. (Adaptive
    weights are a statistic of each micro-batch, as in the reference code, so they differ by design.)"""
    data = load_data("ring")
    fixed = ["ctm.dsm_weight=0.7", "ctm.gan_weight=0.2"]
    CTMRun(ctm_cfg(4, 64, fixed), tmp_path / "one", data).fit(progress=False)
    CTMRun(ctm_cfg(4, 64, [*fixed, "train.micro_batches=2"]), tmp_path / "two", data).fit(progress=False)
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert set(a["nets"]) >= {"net", "target", "ema0", "disc"}
    assert_same_nets(a, b, atol=2e-6)


def _torchrun(args: list[str], tmp_path, quiet: bool = True) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ctmkit", *args, *(["--quiet"] if quiet else [])]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def _cli(args: list[str]) -> None:
    from click.testing import CliRunner

    from ctmkit.cli import main
    r = CliRunner().invoke(main, [*args, "--quiet"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("kind", ["teacher", "ctm"])
def test_two_ranks_equal_one_rank(tmp_path, kind):
    """torchrun, 2 gloo processes x B/2 == 1 process x B, same seed; for CTM with adaptive weights and GAN."""
    if kind == "teacher":
        base = ["train-teacher", "--data", "ring", "--steps", "3", "--batch-size", "64", *TINY]
    else:
        base = ["distill", "--teacher", "exact", "--data", "ring", "--steps", "4", "--batch-size", "64",
                *TINY, *CTM_OPTS]
    _cli([*base, "--out", str(tmp_path / "one")])
    _torchrun([*base, "--out", str(tmp_path / "two")], tmp_path)
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert_same_nets(a, b, atol=2e-6)
    lines_a = (tmp_path / "one" / "stats.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "two" / "stats.jsonl").read_text().splitlines()
    assert len(lines_a) == len(lines_b)   # rank 0 alone writes the stats


@pytest.mark.parametrize("kind", ["teacher", "ctm"])
def test_resume_equals_uninterrupted(tmp_path, kind):
    """Train N steps, stop, resume to 2N == 2N steps straight: weights, EMAs, target, optimiser, discriminator,
    RNG and data order all come back from the checkpoint."""
    data = load_data("ring")
    make = (lambda steps: teacher_cfg(steps, 32)) if kind == "teacher" else (lambda steps: ctm_cfg(steps, 32))
    Run = TeacherRun if kind == "teacher" else CTMRun
    Run(make(6), tmp_path / "straight", data).fit(progress=False)
    Run(make(3), tmp_path / "split", data).fit(progress=False)
    Run(make(6), tmp_path / "split", data, resume=True).fit(progress=False)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert_same_nets(a, b, atol=0)
    for name in a["opts"]:
        for (_, sa), (_, sb) in zip(sorted(a["opts"][name]["state"].items()), sorted(b["opts"][name]["state"].items())):
            for key in sa:
                assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (name, key)
    assert torch.equal(a["gen"], b["gen"])


def test_bf16_autocast_trains(tmp_path):
    data = load_data("ring")
    TeacherRun(teacher_cfg(3, 32, ["train.precision=bf16"]), tmp_path / "bf16", data).fit(progress=False)
    st = final_state(tmp_path / "bf16")
    assert st["bad_total"] == 0 and all(torch.isfinite(v).all() for v in st["nets"]["net"].values())


def test_fp16_gradient_scaler_state_resumes_exactly(tmp_path):
    """fp16 autocast with a GradScaler (meant for GPUs; torch runs it on CPU too): the scaler is checkpointed,
    and overflowing steps are skipped (counted) while the scale backs off."""
    data = load_data("ring")
    over = ["train.precision=fp16", "ctm.dsm_weight=0.5", "ctm.gan_weight=0.1"]
    CTMRun(ctm_cfg(6, 32, over), tmp_path / "straight", data).fit(progress=False)
    CTMRun(ctm_cfg(3, 32, over), tmp_path / "split", data).fit(progress=False)
    CTMRun(ctm_cfg(6, 32, over), tmp_path / "split", data, resume=True).fit(progress=False)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert set(a["scalers"]) == {"opt", "disc_opt"}
    assert a["scalers"] == b["scalers"]
    assert a["scalers"]["opt"]["scale"] <= 65536.0 and a["bad_total"] < a["step"]   # most steps were taken
    assert_same_nets(a, b, atol=0)
    assert all(torch.isfinite(v).all() for v in a["nets"]["net"].values())


def test_batch_must_split_evenly(tmp_path):
    from ctmkit.errors import UserError
    with pytest.raises(UserError, match="divid"):
        TeacherRun(teacher_cfg(3, 30, ["train.micro_batches=4"]), tmp_path / "x", load_data("ring"))


@pytest.mark.slow
def test_compiled_backbone_matches_eager(tmp_path):
    data = load_data("ring")
    TeacherRun(teacher_cfg(3, 32), tmp_path / "eager", data).fit(progress=False)
    TeacherRun(teacher_cfg(3, 32, ["train.compile=true"]), tmp_path / "compiled", data).fit(progress=False)
    assert_same_nets(final_state(tmp_path / "eager"), final_state(tmp_path / "compiled"), atol=1e-5)


TEARDOWN_SCRIPT = """
import gc, weakref, torch, torch.distributed as dist
from ctmkit import job
from ctmkit.train import dist as d
gc.disable()                                    # deterministic: only teardown() may collect the cycle
info, dev = job.setup("cpu")
class Holder:                                   # a finished run: DDP wrapper inside a reference cycle
    pass
h = Holder()
h.me = h
h.ddp = d.wrap(torch.nn.Linear(2, 2), info, dev)
h.ddp("forward", torch.ones(4, 2)).sum().backward()
freed_while_group_alive = []
weakref.finalize(h.ddp, lambda: freed_while_group_alive.append(dist.is_initialized()))
del h
job.teardown()
assert freed_while_group_alive == [True], freed_while_group_alive
print("ok")
"""


def test_teardown_frees_ddp_before_destroying_the_group(tmp_path):
    """DDP reducers hold the process group: a wrapper left in a cycle must die before destroy_process_group,
    not at interpreter shutdown, where gloo's threads can abort the process (a flaky SIGABRT otherwise)."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ok") == 2


def test_sampling_under_torchrun_equals_one_process(tmp_path):
    """`sample` and `eval` split their batches over 2 gloo ranks (batch k on rank k mod 2, per-sample seeds): the
    samples and the metric are those of one process, bitwise; rank 0 alone writes."""
    from .test_cli import ctmkit, ok
    from .test_layout import LEGACY_RUN
    common = ["--model", str(LEGACY_RUN), "--batch-size", "4"]
    sample = ["sample", *common, "--num-samples", "31", "--nfe", "2", "--gamma", "0.5", "--quiet"]
    _torchrun([*sample, "--out", str(tmp_path / "two.npz")], tmp_path)
    ok(ctmkit(*sample, "--out", tmp_path / "one.npz", cwd=tmp_path))
    a, b = (np.load(tmp_path / f"{k}.npz")["samples"] for k in ("one", "two"))
    assert a.shape == (31, 2) and np.array_equal(a, b)
    ev = ["eval", "--model", str(LEGACY_RUN), "--data", "ring", "--nfe", "1,2", "--gamma", "0", "--heun", "",
          "--num-samples", "50", "--seeds", "2"]
    # eval writes FILE.json and FILE.png: other names than the samples' (sample wrote one.png and two.png)
    _torchrun([*ev, "--out", str(tmp_path / "ev_two.json")], tmp_path, quiet=False)
    ok(ctmkit(*ev, "--out", tmp_path / "ev_one.json", cwd=tmp_path))
    rows = [json.loads((tmp_path / f"ev_{k}.json").read_text())["rows"] for k in ("one", "two")]
    assert [r["value"] for r in rows[0]] == [r["value"] for r in rows[1]]


def _gather_transformed(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as tdist

    from ctmkit import load_model
    from ctmkit.eval.generate import generate_batches

    from .test_layout import LEGACY_RUN
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        made_here = []
        model = load_model(LEGACY_RUN)
        got = list(generate_batches(model, 19, 2, 0.5, 3, None, 4, progress=False,
                                    transform=lambda x: (made_here.append(len(x)) or x.sum(1), x)))
        if rank == 0:
            torch.save({"got": got, "made_here": made_here}, out)
    finally:
        tdist.destroy_process_group()


def test_batches_are_transformed_by_the_rank_that_made_them(tmp_path):
    """generate_batches(transform=f): each rank applies f to its own batches before the gather (the image metrics'
    feature work is split), and the gathered results equal one process's, in order."""
    from ctmkit import load_model
    from ctmkit.eval.generate import generate_batches

    from .test_layout import LEGACY_RUN
    torch.multiprocessing.spawn(_gather_transformed, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path / "r.pt")),
                                nprocs=2, join=True)
    two = torch.load(tmp_path / "r.pt")
    one = list(generate_batches(load_model(LEGACY_RUN), 19, 2, 0.5, 3, None, 4, progress=False,
                                transform=lambda x: (x.sum(1), x)))
    assert two["made_here"] == [4, 4, 3]      # rank 0 made batches 0, 2, 4 of 5 (19 samples by 4)
    assert len(two["got"]) == len(one) == 5
    for (fa, xa), (fb, xb) in zip(one, two["got"]):
        assert torch.equal(fa, fb) and torch.equal(xa, xb)
