"""`ctmkit diagnose`: coupled errors and the (t, s) jump-error map, held against the exact flow map."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ctmkit import flow_map
from ctmkit.eval.diagnostics import diagnose

from .conftest import ring_mixture

LEGACY_RUN = Path(__file__).parent / "fixtures" / "run_v0_ring_ctm"


class FlowMapCTM(nn.Module):
    """A 'CTM' whose jump is the exact flow map of a mixture (a fine Heun solve of its exact denoiser)."""

    def __init__(self, gmm, steps: int = 96):
        super().__init__()
        self.gmm, self.steps, self.dummy = gmm, steps, nn.Parameter(torch.zeros(()))
        self.card = SimpleNamespace(sigma_min=0.002, sigma_max=80.0, shape=(2,))

    def forward(self, x, t, s, labels=None):
        return flow_map(self.gmm, x.double(), t, s, self.steps).to(x.dtype)


def test_the_exact_flow_map_has_no_error_anywhere_and_a_wrong_one_does(ring):
    exact = diagnose(FlowMapCTM(ring), ring, n=64, nfes=(1, 2, 4), grid=8, steps=140, exact=True)
    wrong = diagnose(FlowMapCTM(ring_mixture(std=0.12)), ring, n=64, nfes=(1, 2, 4), grid=8, steps=140, exact=True)
    worst = max(exact.coupled[(0.0, k)] for k in (1, 2, 4))
    jumps = [v for row in exact.jump for v in row if not math.isnan(v)]
    assert worst < 1e-3 and max(jumps) < 1e-3, (exact.coupled, max(jumps))      # float32 jumps, fine solves
    assert exact.floor > worst                      # an 8-point Heun solve is coarser than the exact jumps
    assert min(wrong.coupled[(0.0, k)] for k in (1, 2, 4)) > 20 * worst
    # a jump that ends at sigma_min from the top is the one-step sample: the map's corner is the NFE 1 error
    assert abs(wrong.jump[0][-1] - wrong.coupled[(0.0, 1)]) < 1e-6
    assert all(math.isnan(exact.jump[i][j]) for i in range(8) for j in range(i + 1))   # only s < t is defined
    d = exact.to_dict()
    assert len(d["coupled"]) == 6 and len(d["jump_error"]) == 8 and d["grid"][0] == 80.0


def test_diagnose_command_writes_json_and_pictures(tmp_path):
    from click.testing import CliRunner

    from ctmkit.cli import main
    out = tmp_path / "diag"
    res = CliRunner().invoke(main, ["diagnose", "--model", str(LEGACY_RUN), "--teacher", "exact", "--out", str(out),
                                    "--n", "16", "--nfe", "1,2", "--grid", "5", "--steps", "32", "--quiet"])
    assert res.exit_code == 0, res.output
    d = json.loads((out / "diagnose.json").read_text())
    assert {(r["gamma"], r["nfe"]) for r in d["coupled"]} == {(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)}
    assert d["teacher"] == "exact" and len(d["grid"]) == 5 and d["teacher_grid_floor"] > 0
    assert (out / "coupled_error.png").stat().st_size > 1000 and (out / "jump_error.png").stat().st_size > 1000
    res = CliRunner().invoke(main, ["diagnose", "--model", str(LEGACY_RUN), "--teacher", "exact", "--data", "moons",
                                    "--out", str(out)])
    assert res.exit_code == 2 and "known density" in res.output


def test_without_the_map_only_the_coupled_errors_are_computed_and_drawn(ring, tmp_path):
    from ctmkit.eval.diagnostics import plot_diagnosis
    d = diagnose(FlowMapCTM(ring, steps=16), ring, n=8, nfes=(1,), gammas=(0.0,), grid=4, steps=12, exact=True,
                 jump_map=False)
    assert d.jump is None and d.to_dict()["jump_error"] is None
    assert [p.name for p in plot_diagnosis(d, tmp_path)] == ["coupled_error.png"]
    assert not (tmp_path / "jump_error.png").exists()
