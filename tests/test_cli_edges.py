"""Rough edges a new user met (issue 26, point 6): `ctmkit config` with each key's description (YAML that --config
reads back), `--version`, short unknown-key errors with the closest keys, YAML errors with their line and column,
one policy for existing outputs (refused unless --force), the training bar's loss from the first step, a useful
`help(ctmkit)`, and model-space samples converted to the data's space as `ctmkit sample` writes them. Point 5
(`eval --ref` given the wrong kind of file) is in test_reliability.py's table of bad command lines."""

from __future__ import annotations

import json
import pydoc
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import ctmkit
from ctmkit.cli import main
from ctmkit.config import DistillConfig, TeacherConfig, descriptions, load_config, to_dict, valid_keys
from ctmkit.core.sampling import per_sample_normal
from ctmkit.metrics.fid import fid_available

from .test_cli import UNET
from .test_layout import LEGACY_RUN
from .test_reliability import MLP, files_under, one_line_error

ROOT = Path(__file__).resolve().parents[1]


def cli_ok(*args) -> str:
    """Run the CLI in-process; exit 0 required; returns stdout."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0 and res.exception is None, f"{res.output}\n{res.exception!r}"
    return res.stdout


# ---- --version ------------------------------------------------------------------------------------
def test_version_is_the_package_version():
    assert cli_ok("--version") == f"ctmkit {ctmkit.__version__}\n"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == ctmkit.__version__


# ---- ctmkit config: every key with its description, read back by --config -----------------------------------
@pytest.mark.parametrize("command, cls, preset", [("teacher", TeacherConfig, None), ("distill", DistillConfig, None),
                                                  ("distill", DistillConfig, "toy")])
def test_config_prints_every_key_with_its_description_as_yaml_that_reads_back(command, cls, preset, tmp_path):
    text = cli_ok("config", command, *(["--preset", preset] if preset else []))
    docs = descriptions(cls)
    assert set(valid_keys(cls)) <= set(docs) and all(docs.values()), "every key and section has a description"
    for key in valid_keys(cls):   # the key, its value and its description (a comment) on one line
        depth, leaf = key.count("."), key.split(".")[-1]
        first_words = " ".join(docs[key].split()[:2])
        assert re.search(rf"^{'  ' * depth}{leaf}: \S.*# {re.escape(first_words)}", text, re.M), key
    assert "placeholders" in text.splitlines()[2] and "-1.0" in text
    want = load_config(cls, preset)
    assert yaml.safe_load(text) == to_dict(want)
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(cls, None, str(tmp_path / "c.yaml")) == want


def test_config_explains_the_placeholders():
    text = cli_ok("config", "distill")
    line = {ln.split(":")[0].strip(): ln for ln in text.splitlines() if not ln.lstrip().startswith("#")}
    assert "-1 (any value < 0) = adaptive" in line["dsm_weight"] and "adaptive" in line["gan_weight"]
    assert "unchanged: the teacher's" in line["student_dropout"]
    assert "0 = automatic" in line["huber_c"] and "0 = unchanged, train.lr" in line["gan_lr"]


def test_a_printed_config_trains_through_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text(cli_ok("config", "teacher", "--preset", "toy"))
    cli_ok("train-teacher", "--data", "ring", "--config", tmp_path / "c.yaml", "--out", tmp_path / "run", "--steps",
           1, "--batch-size", 8, "--quiet", *MLP)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    want = load_config(TeacherConfig, "toy", None, MLP, data="ring", **{"train.steps": 1, "train.batch_size": 8})
    assert saved == to_dict(want)


# ---- unknown keys and invalid YAML -----------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["distill", "--teacher", "exact", "--data", "ring", "ctm.gan_strat=3"], "did you mean ctm.gan_start?"),
    (["distill", "--teacher", "exact", "--data", "ring", "train.gan_start=3"], "did you mean ctm.gan_start?"),
    (["train-teacher", "--data", "ring", "lrr=1"], "did you mean train.lr?"),
    (["train-teacher", "--data", "ring", "model.hiden=3"], "did you mean model.hidden?"),
    (["train-teacher", "--data", "ring", "zzzz=3"], "unknown config key 'zzzz' (`ctmkit config teacher`"),
])
def test_an_unknown_key_names_the_closest_ones_in_a_short_line(args, says, tmp_path):
    line = one_line_error([*args, "--out", tmp_path / "r"], says)
    assert "lists every key" in line and len(line) < 160, line


def test_an_unknown_key_in_a_config_file_names_the_closest_one(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lrr: 1\n")
    line = one_line_error(["train-teacher", "--data", "ring", "--config", tmp_path / "c.yaml", "--out",
                           tmp_path / "r"], "unknown config key 'train.lrr'; did you mean train.lr?")
    assert len(line) < 160


@pytest.mark.parametrize("text, says", [
    ("train:\n  lr: [1, 2\n  steps: 3\n", "at line 3, column 8: expected ',' or ']', but got ':' (while parsing a "
                                          "flow sequence started at line 2, column 7)"),
    ("train:\n\tlr: 1\n", "at line 2, column 1: found character '\\t' that cannot start any token"),
    ("data: \"ring\n", "at line 2, column 1: found unexpected end of stream"),
])
def test_invalid_yaml_says_where(text, says, tmp_path):
    (tmp_path / "c.yaml").write_text(text)
    one_line_error(["train-teacher", "--data", "ring", "--config", tmp_path / "c.yaml", "--out", tmp_path / "r"],
                   f"config file '{tmp_path / 'c.yaml'}' is not valid YAML {says}")


# ---- one policy for existing outputs: refused unless --force ------------------------------------------------
WRITERS = {   # command -> (argv without --force, its output files); d: the test's folder
    "sample": lambda d: (["sample", "--model", LEGACY_RUN, "--n", 4, "--nfe", 1, "--quiet", "--out", d / "s.npz"],
                         [d / "s.npz", d / "s.png"]),
    "eval": lambda d: (["eval", "--model", LEGACY_RUN, "--data", "ring", "--n", 20, "--seeds", 1, "--nfe", 1, "--gamma",
                        0, "--heun", "", "--out", d / "e.json"], [d / "e.json", d / "e.png"]),
    "diagnose": lambda d: (["diagnose", "--model", LEGACY_RUN, "--teacher", "exact", "--n", 4, "--nfe", 1, "--gamma", 0,
                            "--grid", 4, "--steps", 8, "--quiet", "--out", d / "diag"],
                           [d / "diag" / "diagnose.json", d / "diag" / "coupled_error.png",
                            d / "diag" / "jump_error.png"]),
    "prepare": lambda d: (["prepare", _images_npz(d), d / "p.npy", "--quiet"], [d / "p.npy", d / "p.labels.npy"]),
    "fid-ref": lambda d: (["fid-ref", "--data", "digits", "--n", 12, "--quiet", "--out", d / "ref.npz"],
                          [d / "ref.npz"]),
}


def _images_npz(d: Path) -> Path:
    np.savez(d / "imgs.npz", x=np.arange(48, dtype=np.uint8).reshape(3, 4, 4))   # unlabelled
    return d / "imgs.npz"


@pytest.mark.parametrize("command, which", [("sample", 0), ("sample", 1), ("eval", 0), ("eval", 1), ("diagnose", 0),
                                            ("diagnose", 2), ("prepare", 0), ("prepare", 1), ("fid-ref", 0)])
def test_an_existing_output_is_refused_unless_force(command, which, tmp_path):
    argv, outputs = WRITERS[command](tmp_path)
    old = outputs[which]
    old.parent.mkdir(exist_ok=True)
    old.write_bytes(b"an earlier result")
    before = files_under(tmp_path)
    one_line_error(argv, f"'{old}' already exists; pass --force to replace it")
    assert files_under(tmp_path) == before and old.read_bytes() == b"an earlier result"
    if command == "fid-ref" and not fid_available():
        pytest.skip("the fid extra (Inception network) is not installed")
    cli_ok(*argv, "--force")
    if command == "prepare" and which == 1:   # an unlabelled source: the stale labels file is removed, not kept
        assert not old.exists() and np.load(outputs[0]).shape == (3, 4, 4)
    else:
        assert old.read_bytes() != b"an earlier result"


@pytest.mark.parametrize("command", list(WRITERS))
def test_every_writer_documents_force(command):
    text = " ".join(cli_ok(command, "--help").split())
    assert "--force" in text and "refused" in text


def test_sample_writes_a_new_file_without_force(tmp_path):
    cli_ok("sample", "--model", LEGACY_RUN, "--num-samples", 5, "--quiet", "--out", tmp_path / "new.npz")
    assert np.load(tmp_path / "new.npz")["samples"].shape == (5, 2) and (tmp_path / "new.png").is_file()
    cli_ok("sample", "--model", LEGACY_RUN, "--num-samples", 5, "--quiet", "--out", tmp_path / "only.png")
    assert (tmp_path / "only.png").is_file() and not (tmp_path / "only.npz").exists()


# ---- the training bar shows the loss from the first step ---------------------------------------------------
def test_the_training_progress_shows_the_loss_from_the_first_step(tmp_path):
    res = CliRunner().invoke(main, ["train-teacher", "--data", "ring", "--out", str(tmp_path / "run"), "--steps", "10",
                                    "--batch-size", "8", *MLP])   # not --quiet; no terminal: a line per 10 %
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("teacher:")]
    assert len(lines) == 10 and lines[0].startswith("teacher:  10% (1/10) loss=")
    shown = [float(re.search(r"loss=(\S+)", ln).group(1)) for ln in lines]
    assert len(set(shown)) > 1, "a value repeated instead of the loss of each step"
    stats = [json.loads(ln) for ln in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [10]               # stats.jsonl as before: one line per log period
    assert lines[-1].split("loss=")[1].split()[0] == f"{stats[0]['loss']:.4g}"   # the bar ends on the logged mean


# ---- model space -> the data's space, as `ctmkit sample` writes it ------------------------------------------
def test_card_to_data_equals_what_sample_writes_for_a_ctm(tmp_path):
    model = ctmkit.load_model(LEGACY_RUN)
    card = model.card
    z = per_sample_normal(6, (2, *card.shape), seed=3)      # the noise `ctmkit sample --seed 3 --nfe 2` draws
    x = ctmkit.gamma_sample(model, z[:, 0], ctmkit.sample_schedule(2, card.sigma_min, card.sigma_max), 0.5,
                            step_noise=z[:, 1:])
    cli_ok("sample", "--model", LEGACY_RUN, "--n", 6, "--nfe", 2, "--gamma", 0.5, "--seed", 3, "--quiet", "--out",
           tmp_path / "s.npz")
    written = np.load(tmp_path / "s.npz")["samples"]
    data = card.to_data(x)
    assert data.dtype == written.dtype == np.float32 and np.array_equal(data, written)
    assert not np.allclose(data, x.numpy(), atol=1e-3)     # not model space (ring: shifted and scaled)


def test_card_to_data_gives_images_in_their_own_layout(tmp_path):
    np.save(tmp_path / "img.npy", np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    cli_ok("train-teacher", "--data", tmp_path / "img.npy", "--out", tmp_path / "t", "--steps", 1, "--batch-size", 4,
           "--quiet", *UNET)
    model = ctmkit.load_model(tmp_path / "t")
    z = per_sample_normal(3, (3, *model.card.shape), seed=0)
    x = ctmkit.heun_sample(model, z[:, 0], nfe=3, sigma_min=model.card.sigma_min, sigma_max=model.card.sigma_max)
    cli_ok("sample", "--model", tmp_path / "t", "--n", 3, "--nfe", 3, "--quiet", "--out", tmp_path / "s.npz")
    data, written = model.card.to_data(x), np.load(tmp_path / "s.npz")["samples"]
    assert x.shape == (3, 3, 8, 8) and data.shape == (3, 8, 8, 3) and data.dtype == np.uint8
    assert np.array_equal(data, written)


# ---- help(ctmkit) -----------------------------------------------------------------------------------------
def test_help_of_the_package_opens_with_the_public_api():
    assert all(hasattr(ctmkit, name) for name in ctmkit.__all__) and "__version__" not in ctmkit.__all__
    text = pydoc.render_doc(ctmkit, renderer=pydoc.plaintext)
    head = text[:text.index("PACKAGE CONTENTS")]            # before the classes and their inherited methods
    for name in ctmkit.__all__:
        assert re.search(rf"^ {{8}}{name}\b", head, re.M), f"{name} is not listed in the package docstring"
    assert "card.to_data(x)" in head and len(head.splitlines()) < 60    # one screen or two, each name on one line


# ---- ctmkit eval samples on the job's device ---------------------------------------------------------------
def test_eval_moves_the_model_and_the_teacher_to_the_job_s_device(tmp_path, monkeypatch):
    """`eval` samples where `sample` does (a GPU where there is one): both networks go to dist.setup's device."""
    import torch

    import ctmkit.cli.evaluate as evaluate
    import ctmkit.job as job
    tiny = ["--steps", "3", "--batch-size", "16", "--quiet", *MLP]
    cli_ok("train-teacher", "--data", "moons", "--out", tmp_path / "t", *tiny)
    cli_ok("distill", "--teacher", tmp_path / "t", "--data", "moons", "--out", tmp_path / "c", *tiny, "ctm.gan=false")
    moved, load = [], evaluate.load_model_spec

    def spied(spec, text=False):
        net = load(spec, text=text)
        to = net.to
        net.to = lambda device: (moved.append((Path(spec).name, str(device))), to(device))[1]
        return net

    monkeypatch.setattr(evaluate, "load_model_spec", spied)
    monkeypatch.setattr(job, "setup", lambda device: (job.Dist(), torch.device("cpu")))
    cli_ok("eval", "--model", tmp_path / "c", "--teacher", tmp_path / "t", "--data", "moons", "--nfe", "1",
           "--gamma", "0", "--heun", "3", "--n", "50", "--seeds", "1", "--out", tmp_path / "ev.json")
    assert sorted(moved) == [("c", "cpu"), ("t", "cpu")]
    assert len(json.loads((tmp_path / "ev.json").read_text())["rows"]) == 2
