"""EDM network pickles (`edm:FILE.pkl`) loaded safely: the tests build EDM-format snapshots themselves from the
committed parity fixtures (tests/fixtures/edm: tensors and JSON made with NVIDIA's original code outside this
repository), with the persistence structure EDM writes and, where EDM embeds its module source, a placeholder that
would create a marker file if anyone executed it. ctmkit must reproduce the original outputs to float32 round-off,
never run the embedded source, and refuse any other global before anything executes."""

from __future__ import annotations

import collections
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ctmkit import load_teacher
from ctmkit.core.precond import CTM
from ctmkit.errors import UserError

FIX = Path(__file__).parent / "fixtures" / "edm"
NETS = ["vp_songunet_ddpmpp", "vp_songunet_ddpmpp_cond", "vp_songunet_ddpmpp_aug", "ve_songunet_ncsnpp",
        "iddpm_dhariwal_cond", "edm_dhariwal_cond", "edm_songunet"]


def _decode(v):
    if isinstance(v, dict) and "__tuple__" in v:
        return tuple(_decode(x) for x in v["__tuple__"])
    if isinstance(v, dict) and "__numpy__" in v:
        return np.dtype(v["__numpy__"]).type(v["value"])
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def _fake_persistence(marker: Path):
    """A stand-in `torch_utils.persistence` module, so pickle can name EDM's reconstructor; and the 'source' EDM
    would embed: code that creates `marker` if it were ever executed."""
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):   # never called by ctmkit: its unpickler maps the name to a stand-in
        raise AssertionError("the real reconstructor must not run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    src = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n"
    return mod, src


class _Persistent:
    def __init__(self, fn, meta):
        self.fn, self.meta = fn, meta

    def __reduce__(self):
        return self.fn, (self.meta,)


def _node(tree: dict, tensors: dict, prefix: str, base: dict, fn, src: str):
    """The object EDM's persistence would pickle for one node of the fixture tree."""
    state = {}
    for key in tree["dict_keys"]:
        if key == "_parameters":
            state[key] = {n: torch.nn.Parameter(tensors[prefix + n], requires_grad=False) for n in tree["parameters"]}
        elif key == "_buffers":
            state[key] = {n: (None if n in tree["null_buffers"] else tensors[prefix + n]) for n in tree["buffers"]}
        elif key == "_modules":
            state[key] = {n: None if sub is None else _node(sub, tensors, f"{prefix}{n}.", base, fn, src)
                          for n, sub in tree["modules"].items()}
        elif key == "_non_persistent_buffers_set":
            state[key] = set(tree["non_persistent_buffers"])
        elif key in base["hook_dicts"]:
            state[key] = collections.OrderedDict()
        elif key == "_init_args":
            state[key] = _decode(tree["init_args"])
        elif key == "_init_kwargs":
            state[key] = _decode(tree["init_kwargs"])
        else:
            state[key] = _decode(tree["attributes"][key])
    if not tree["persistent"]:
        assert tree["class_name"] == "ModuleDict"
        obj = torch.nn.ModuleDict()
        obj.__dict__.clear()
        obj.__dict__.update(state)
        return obj
    meta = dict(type="class", version=tree["meta"]["version"], module_src=src, class_name=tree["class_name"],
                state=state)
    return _Persistent(fn, meta)


def write_edm_pickle(name: str, path: Path, marker: Path, label_dropout: float | None = None) -> dict:
    """An EDM-format snapshot of fixture `name` at `path`; returns the fixture's tensors (inputs and output).
    `label_dropout`: the snapshot of the same network built with EDM's label_dropout=p (it changes training only:
    EDM records it in the U-Net's and the preconditioning's init kwargs and as the U-Net's attribute)."""
    fix = json.loads((FIX / f"{name}.json").read_text())
    if label_dropout is not None:
        unet = fix["tree"]["modules"]["model"]
        for kw in (fix["tree"]["init_kwargs"], unet["init_kwargs"], unet["attributes"]):
            kw["label_dropout"] = label_dropout
    tensors = load_file(str(FIX / f"{name}.safetensors"))
    mod, src = _fake_persistence(marker)
    sys.modules["torch_utils.persistence"] = mod
    sys.modules.setdefault("torch_utils", types.ModuleType("torch_utils"))
    try:
        ema = _node(fix["tree"], tensors, "", fix["torch_module_base"], mod._reconstruct_persistent_obj, src)
        loss = _Persistent(mod._reconstruct_persistent_obj, dict(type="class", version=6, module_src=src,
                                                               class_name="EDMLoss", state={"P_mean": -1.2}))
        with open(path, "wb") as f:
            pickle.dump(dict(ema=ema, loss_fn=loss, augment_pipe=None, dataset_kwargs=dict(resolution=8)), f)
    finally:
        sys.modules.pop("torch_utils.persistence", None)
        sys.modules.pop("torch_utils", None)
    return tensors


@pytest.mark.parametrize("name", NETS)
def test_edm_pickle_matches_the_original_network(tmp_path, name):
    marker = tmp_path / "EXECUTED"
    t = write_edm_pickle(name, tmp_path / "net.pkl", marker)
    teacher = load_teacher(f"edm:{tmp_path / 'net.pkl'}")
    assert not marker.exists()                                 # the embedded 'source' never ran
    with torch.no_grad():
        out = teacher(t["__x"], t["__sigma"], t.get("__labels"))
    err = float((out - t["__out"]).abs().max())
    scale = float(t["__out"].abs().max())
    assert err <= 1e-5 * max(1.0, scale), (name, err, scale)
    card = teacher.card
    assert card.shape == (3, 8, 8) and card.num_classes == (10 if "__labels" in t else 0)
    assert 0.002 <= card.sigma_min < card.sigma_max <= 80


@pytest.mark.parametrize("name", ["vp_songunet_ddpmpp_cond", "ve_songunet_ncsnpp", "iddpm_dhariwal_cond",
                                  "edm_dhariwal_cond"])
def test_student_of_an_edm_teacher_starts_as_the_teacher(tmp_path, name):
    t = write_edm_pickle(name, tmp_path / "net.pkl", tmp_path / "EXECUTED")
    teacher = load_teacher(f"edm:{tmp_path / 'net.pkl'}")
    student = CTM(teacher.card.backbone.build(), teacher.sigma_data, teacher.precond).eval()
    missing = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not missing.unexpected_keys and all(".s_" in k or k.startswith("backbone.s_")
                                               for k in missing.missing_keys)
    x, sigma, labels = t["__x"], t["__sigma"].clamp(0.002, 80), t.get("__labels")
    with torch.no_grad():
        want = teacher(x, sigma, labels)
        for s in (sigma, sigma / 2, torch.full_like(sigma, 0.002)):
            assert torch.equal(student.g(x, sigma, s, labels), want)


def test_iddpm_levels_are_edms(tmp_path):
    t = load_file(str(FIX / "iddpm_dhariwal_cond.safetensors"))
    write_edm_pickle("iddpm_dhariwal_cond", tmp_path / "net.pkl", tmp_path / "EXECUTED")
    teacher = load_teacher(f"edm:{tmp_path / 'net.pkl'}")
    u, want = teacher.precond.u.double(), t["u"].double()
    assert u.shape == want.shape == (1001,) and u[-1] == want[-1] == 0
    rel = ((u - want).abs() / want)[:-1]
    # EDM tabulates the levels by a 1000-step float32 recursion; kernels (sin, reductions) round differently on
    # other CPUs, so compare to a tolerance, not bitwise. Above sigma 1 the recursion is well conditioned: EDM's own
    # float32 table is within 1.1e-6 of the exact float64 levels, so two float32 tables agree to twice that (1e-5
    # leaves a margin of 4). Below it `(u^2 + 1) / ratio - 1` cancels and the float32 table drifts from the exact
    # levels by up to 4.8e-4 (at sigma 0.006); two such tables may differ by the sum of their drifts: 1e-3.
    # Measured here: 9.7e-7 at most under ATEN_CPU_CAPABILITY default / avx2 / avx512.
    assert rel[want[:-1] >= 1].max() <= 1e-5 and rel.max() <= 1e-3, (rel[want[:-1] >= 1].max(), rel.max())


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_a_command_is_refused_with_nothing_executed(tmp_path):
    from .test_cli import ctmkit
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": _Evil(marker)}))
    with pytest.raises(UserError, match=r"refusing to load '(posix|os|nt)\.system'"):
        load_teacher(f"edm:{evil}")
    r = ctmkit("sample", "--model", f"edm:{evil}", "--n", "2", "--out", tmp_path / "s.npz", cwd=tmp_path)
    assert r.returncode != 0 and "refusing to load" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_broken_edm_files_are_one_clear_error(tmp_path):
    for content, says in [(b"not a pickle", "cannot read"), (pickle.dumps({"x": 1}), "not an EDM network snapshot")]:
        (tmp_path / "bad.pkl").write_bytes(content)
        with pytest.raises(UserError, match=says):
            load_teacher(f"edm:{tmp_path / 'bad.pkl'}")
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(f"edm:{tmp_path / 'missing.pkl'}")


@pytest.mark.parametrize("form", ["auto", "teacher"])
def test_cli_distills_an_edm_teacher_without_a_preset(tmp_path, form):
    """auto (the default): a VP teacher's student takes EDM's form, as the reference's CIFAR-10 student does."""
    from .test_cli import ctmkit, ok
    write_edm_pickle("vp_songunet_ddpmpp", tmp_path / "net.pkl", tmp_path / "EXECUTED")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "imgs.npy", rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8))
    spec = f"edm:{tmp_path / 'net.pkl'}"
    ok(ctmkit("distill", "--teacher", spec, "--data", tmp_path / "imgs.npy", "--out", tmp_path / "ctm", "--steps", "2",
              "--batch-size", "4", "--quiet", "ctm.num_scales=6", "ctm.max_k=5", f"ctm.student_precond={form}",
              cwd=tmp_path))
    card = json.loads((tmp_path / "ctm" / "model.json").read_text())
    assert card["backbone"]["arch"] == "edm_songunet"
    assert card.get("precond") is None if form == "auto" else card["precond"]["kind"] == "edm_vp"
    for i, (model, nfe) in enumerate([(tmp_path / "ctm", "2"), (spec, "5")]):
        ok(ctmkit("sample", "--model", model, "--n", "4", "--nfe", nfe, "--out", tmp_path / f"s{i}.npz", "--quiet",
                  cwd=tmp_path))
        assert np.load(tmp_path / f"s{i}.npz")["samples"].shape == (4, 8, 8, 3)
    assert not (tmp_path / "EXECUTED").exists()


def test_multihead_attention_block_matches_the_original():
    """EDM's attention with several heads (Dhariwal nets use 64-channel heads, too big for a fixture): one block
    with 4-channel heads, built by EDM's code outside the repository."""
    from ctmkit.nets.edm_unets import BlockStyle, EDMBlock
    t = load_file(str(FIX / "unetblock_multihead.safetensors"))
    block = EDMBlock(8, 16, BlockStyle(emb_channels=32, dropout=0.0, skip_scale=1.0, eps=1e-5, channels_per_head=4),
                     attention=True).eval()
    block.load_state_dict({k: v for k, v in t.items() if not k.startswith("__")})
    with torch.no_grad():
        out = block(t["__x"], t["__emb"])
    assert float((out - t["__out"]).abs().max()) <= 1e-5 * max(1.0, float(t["__out"].abs().max()))
