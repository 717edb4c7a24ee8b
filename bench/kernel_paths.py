"""bench: how far the numbers the repository stores drift when the floating-point kernels change.

Floating-point kernels (vectorised math, BLAS, reductions) round differently between CPUs and instruction sets, so
values stored in the repository (EDM parity outputs, iDDPM levels, the first release's samples) are met only up to
their last bits on another machine. This script recomputes each stored value under every ATEN_CPU_CAPABILITY this
CPU offers x 1 and 2 threads, each in a fresh process, and prints the largest difference in float32 ulps of the
stored value's scale (|a - b| / (eps * max|b|), eps = 2^-23), beside the tolerance the test allows in the same unit.

    python bench/kernel_paths.py            # the table (JSON lines, then a summary)
    python bench/kernel_paths.py --one      # this process's kernel path only
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ctmkit import load_model, load_teacher  # noqa: E402
from ctmkit.eval.generate import generate  # noqa: E402
from tests.test_edm_teachers import NETS, write_edm_pickle  # noqa: E402
from tests.test_layout import LEGACY_RUN, LEGACY_SAMPLES  # noqa: E402

EPS = torch.finfo(torch.float32).eps
# what each test allows, in the same unit (ulps of the stored value's largest magnitude)
ALLOWED = {"edm": "1e-5 x max(1, max|D|): 84 ulps of max|D| (tests/test_edm_teachers.py)",
           "iddpm_u": "relative 1e-5 per level above sigma 1, 1e-3 below (tests/test_edm_teachers.py)",
           "legacy_samples": "absolute 1e-6 (tests/test_layout.py)"}


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float32 ulps of max |b|."""
    return float((a.double() - b.double()).abs().max() / (EPS * b.double().abs().max()))


def one() -> dict:
    """Every stored comparison under this process's kernels."""
    res = {"capability": os.environ.get("ATEN_CPU_CAPABILITY", "(unset)"), "threads": torch.get_num_threads()}
    folder = pathlib.Path(tempfile.mkdtemp())
    for name in NETS:
        t = write_edm_pickle(name, folder / f"{name}.pkl", folder / "EXECUTED")
        teacher = load_teacher(f"edm:{folder / f'{name}.pkl'}")
        with torch.no_grad():
            res[f"edm/{name}"] = ulps(teacher(t["__x"], t["__sigma"], t.get("__labels")), t["__out"])
        if name == "iddpm_dhariwal_cond":
            u, want = teacher.precond.u.double(), t["u"].double()
            res["iddpm_u_max_rel"] = float(((u - want).abs() / want)[:-1].max())
    x = generate(load_model(LEGACY_RUN), 4, 2, 0.5, 0, None, progress=False)
    want = torch.tensor(LEGACY_SAMPLES, dtype=torch.float32)
    res["legacy_samples_abs"] = float((x - want).abs().max())
    res["legacy_samples"] = ulps(x, want)
    return res


def main() -> None:
    if "--one" in sys.argv:
        print(json.dumps(one()))
        return
    rows = []
    for cap in ["", "default", "avx2", "avx512"]:
        for threads in ("1", "2"):
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            env.pop("ATEN_CPU_CAPABILITY", None)
            if cap:
                env["ATEN_CPU_CAPABILITY"] = cap
            out = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True,
                                 check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
    keys = [k for k in rows[0] if k not in ("capability", "threads")]
    print(json.dumps({"max_over_kernel_paths": {k: max(r[k] for r in rows) for k in keys}, "allowed": ALLOWED},
                     indent=1))


if __name__ == "__main__":
    main()
