"""Teachers behind the denoiser protocol `D(x, sigma, labels=None) -> x0_hat` (model space, EDM convention
x = x0 + sigma n): `load_teacher(SPEC)`. SPECs today: a ctmkit teacher run folder, or `exact` (the known
density of data with one). Foreign teachers (diffusers folders, EDM pickles, Python callables) go here."""

from __future__ import annotations

import logging
from pathlib import Path

from ..core.mixtures import EmpiricalDenoiser, GaussianMixture  # noqa: F401  (their home in ctmkit 0.1.0)
from ..errors import UserError
from ..io.runs import load_model

log = logging.getLogger(__name__)

__all__ = ["load_teacher"]


def load_teacher(spec: str | Path, data=None):
    """The teacher denoiser of a SPEC: 'exact' -> the exact mixture denoiser of `data` (a Dataset with a known
    density), else a teacher run folder -> its EDMDenoiser (CPU, eval mode, `.card` attached). With `data`, the
    teacher is checked against it (shape; a differing normalisation is a warning)."""
    if str(spec) == "exact":
        if data is None or data.mixture is None:
            what = f"'{data.spec}' has none" if data is not None else "no data was given"
            raise UserError(f"teacher=exact needs data with a known density (gmm:PATH.json or a built-in mixture such "
                            f"as ring or grid); {what}: train a teacher with `ctmkit train-teacher`")
        return data.mixture
    teacher = load_model(spec)
    if teacher.card.kind != "teacher":
        raise UserError(f"'{spec}' is a {teacher.card.kind} run, not a teacher")
    if data is not None:
        teacher.card.check_data(data, f"teacher '{spec}'")
        if teacher.card.data.normalizer != data.normalizer.to_dict():
            log.warning("the data normalisation differs from the teacher's (different data or n_data?)")
    return teacher
