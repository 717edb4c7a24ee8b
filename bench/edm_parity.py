"""bench: max |difference| between ctmkit's EDM teachers (load_teacher("edm:FILE.pkl")) and the outputs NVIDIA's own
code gave on the committed fixtures (tests/fixtures/edm), each rebuilt as an EDM-format snapshot. The fixtures were
recorded on one CPU; another CPU's kernels round differently, so the check is the tests' tolerance, not bit equality:
max|diff| <= 1e-5 x max(1, max|D|) (84 float32 ulps of max|D|; bench/kernel_paths.py measures the drift: under 4).

    python bench/edm_parity.py
"""

import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ctmkit import load_teacher  # noqa: E402
from tests.test_edm_teachers import NETS, write_edm_pickle  # noqa: E402


def main() -> None:
    for name in NETS:
        folder = pathlib.Path(tempfile.mkdtemp())
        t = write_edm_pickle(name, folder / "net.pkl", folder / "EXECUTED")
        teacher = load_teacher(f"edm:{folder / 'net.pkl'}")
        with torch.no_grad():
            out = teacher(t["__x"], t["__sigma"], t.get("__labels"))
        card = teacher.card
        kind = card.precond["kind"] if card.precond else "edm"
        diff, scale = float((out - t["__out"]).abs().max()), float(t["__out"].abs().max())
        ok = "ok" if diff <= 1e-5 * max(1.0, scale) else "OUTSIDE the tolerance"
        print(f"{name:26} max|diff| {diff:.2e} ({diff / (2**-23 * scale):.1f} ulps of max|D|)  max|D| {scale:.1f}  "
              f"range [{card.sigma_min:.4g}, {card.sigma_max:.4g}]  {kind}  {ok}")


if __name__ == "__main__":
    main()
