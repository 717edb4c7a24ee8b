"""Custom sampling times (--ts) on `sample` and `eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ctmkit
from ctmkit.cli import main
from ctmkit.core.schedules import sample_schedule
from ctmkit.errors import UserError
from ctmkit.eval.generate import generate

RUN = Path(__file__).parent / "fixtures" / "run_v0_ring_ctm"


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_times_of_the_default_schedule_give_the_default_samples(gamma):
    model = ctmkit.load_model(RUN)
    a = generate(model, 16, 3, gamma, 0, None, progress=False)
    b = generate(model, 16, None, gamma, 0, None, progress=False, ts=sample_schedule(3).tolist())
    assert torch.allclose(a, b, atol=1e-5)
    c = generate(model, 16, None, gamma, 0, None, progress=False, ts=[80.0, 5.0, 0.002])   # other times differ
    assert not torch.allclose(a[:, :1], c[:, :1], atol=1e-3)


@pytest.mark.parametrize("ts, words", [([80.0], "at least two"), ([1.0, 2.0], "strictly decreasing"),
                                       ([100.0, 1.0], "sigma range"), ([80.0, 0.0], "sigma range")])
def test_bad_times_are_one_clear_error(ts, words):
    with pytest.raises(UserError, match=words):
        generate(ctmkit.load_model(RUN), 4, None, 0.0, 0, None, progress=False, ts=ts)


def test_sample_and_eval_take_times(tmp_path):
    out = tmp_path / "s.npz"
    res = CliRunner().invoke(main, ["sample", "--model", str(RUN), "--n", "8", "--ts", "80,2.5,0.002", "--quiet",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert np.load(out)["samples"].shape == (8, 2)
    res = CliRunner().invoke(main, ["sample", "--model", str(RUN), "--n", "8", "--ts", "80,x", "--out", str(out)])
    assert res.exit_code == 2 and "comma-separated numbers" in res.output
    res = CliRunner().invoke(main, ["sample", "--model", str(RUN), "--nfe", "2", "--ts", "80,1", "--out", str(out)])
    assert res.exit_code == 2 and "not both" in res.output
    ev = tmp_path / "ev.json"
    res = CliRunner().invoke(main, ["eval", "--model", str(RUN), "--data", "ring", "--n", "50", "--seeds", "1",
                                    "--nfe", "1", "--gamma", "0", "--heun", "", "--ts", "80,2.5,0.002",
                                    "--ts", "80,10,1,0.002", "--out", str(ev)])
    assert res.exit_code == 0, res.output
    rows = json.loads(ev.read_text())["rows"]
    want = [(1, None), (2, [80.0, 2.5, 0.002]), (3, [80.0, 10.0, 1.0, 0.002])]
    assert [(r["nfe"], r.get("ts")) for r in rows] == want
