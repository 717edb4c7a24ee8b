"""Teachers behind the denoiser protocol `D(x, sigma, labels=None) -> x0_hat` (model space, EDM convention
x = x0 + sigma n): `load_teacher(SPEC)`. SPECs: a ctmkit teacher run folder, `exact` (the known density of data
with one), `diffusers:DIR` (a diffusers pipeline folder), `edm:FILE.pkl` (an NVIDIA EDM network pickle, read without
running its code) and `py:MODULE:ATTR` (the user's own denoiser; the one SPEC that runs code). See
ctmkit/teachers/foreign.py and ctmkit/teachers/edm.py."""

from __future__ import annotations

import logging
from pathlib import Path

from ..core.mixtures import EmpiricalDenoiser, GaussianMixture  # noqa: F401  (their home in ctmkit 0.1.0)
from ..data.latents import LatentData
from ..errors import UserError
from ..io.runs import load_model
from .edm import load_edm
from .foreign import PyTeacher, load_py
from .latent import LatentTeacher
from .latent_data import check_latent_data
from .pipelines import load_diffusers_folder

log = logging.getLogger(__name__)

__all__ = ["load_teacher", "teacher_facts", "PyTeacher", "LatentTeacher", "SPEC_HELP", "EXACT_LABEL_DROPOUT"]

EXACT_LABEL_DROPOUT = 0.1   # the exact labelled mixture has its null branch (the whole mixture) built in; its
                            # students keep one by distilling this share of null labels (ctm.label_dropout=-1);
                            # so does a teacher whose null branch is a named class (diffusers:DIR?null_class=K)

SPEC_HELP = ("a ctmkit teacher run folder, 'exact' (data with a known density), 'diffusers:DIR' (a diffusers "
             "pipeline folder: UNet2DModel + DDPM/DDIM-style or flow-matching scheduler; 'diffusers:DIR?null_class=K' "
             "names the class index a class-conditional UNet was trained with for dropped labels, so it can be "
             "guided), 'edm:FILE.pkl' (an NVIDIA EDM network pickle, loaded without running its code; guidable when "
             "built with label_dropout > 0) or 'py:MODULE:ATTR' (your own denoiser D(x, sigma, labels); runs your "
             "code)")


def load_teacher(spec: str | Path, data=None):
    """The teacher denoiser of a SPEC (see SPEC_HELP), on the CPU in eval mode: 'exact' -> the exact mixture
    denoiser of `data` (a Dataset with a known density); a run folder or `diffusers:DIR` -> an EDMDenoiser with
    `.card` (its sigma range, data shape and classes; a latent pipeline folder: a LatentTeacher, whose condition is
    a TextCond from its encode_prompt); `py:MODULE:ATTR` -> a PyTeacher. With `data`, the teacher is
    checked against it (shape and classes; a differing normalisation is a warning; a latent teacher's data must be
    a folder prepared with its VAE and text encoder: teachers/latent_data.py: check_latent_data)."""
    spec = str(spec)
    if spec == "exact":
        if data is None or data.mixture is None:
            what = f"'{data.spec}' has none" if data is not None else "no data was given"
            raise UserError(f"teacher=exact needs data with a known density (gmm:PATH.json or a built-in mixture such "
                            f"as ring or grid); {what}: train a teacher with `ctmkit train-teacher`")
        return data.mixture
    if spec.startswith("py:"):
        teacher = load_py(spec)
        if data is not None and teacher.shape is not None and tuple(teacher.shape) != tuple(data.shape):
            raise UserError(f"teacher '{spec}' takes shape {teacher.shape}, but '{data.spec}' has shape "
                            f"{tuple(data.shape)}")
        _check_classes(spec, teacher.num_classes, data)
        return teacher
    if spec.startswith("edm:"):
        teacher = load_edm(spec[len("edm:"):])
    elif spec.startswith("diffusers:"):
        teacher = load_diffusers_folder(spec[len("diffusers:"):])
    else:
        teacher = load_model(spec)
        if teacher.card.kind != "teacher":
            raise UserError(f"'{spec}' is a {teacher.card.kind} run, not a teacher")
    if data is not None and teacher.card.text_conditioned:
        check_latent_data(data, teacher)            # a prepared latent folder of this pipeline's VAE and text encoder
        return teacher
    if isinstance(data, LatentData):
        raise UserError(f"'{data.spec}' is a prepared latent folder: distil it with the pipeline it was prepared "
                        f"with, --teacher diffusers:{data.manifest['pipeline'].get('folder')}")
    if data is not None:
        teacher.card.check_data(data, f"teacher '{spec}'")
        _check_classes(spec, teacher.card.num_classes, data)
        if teacher.card.data.kind == data.kind and not spec.startswith(("diffusers:", "edm:")) \
                and teacher.card.data.normalizer != data.normalizer.to_dict():
            log.warning("the data normalisation differs from the teacher's (different data or n_data?)")
    return teacher


def _check_classes(spec: str, classes: int, data) -> None:
    if data is not None and classes > 0 and data.num_classes != classes:
        have = f"{data.num_classes} classes" if data.num_classes else "no labels"
        raise UserError(f"teacher '{spec}' is conditioned on {classes} classes, but '{data.spec}' has {have}")


def teacher_facts(teacher) -> dict:
    """What a loaded teacher reports: sigma_min, sigma_max, shape (None: any), num_classes and label_dropout (> 0:
    it has a null branch, the label -1, and can be guided; docs/method.md section 8). label_dropout is the share of
    null labels the teacher was trained with, or EXACT_LABEL_DROPOUT for a null branch built in (the exact labelled
    mixture, a named null class): the share its students distil by default (ctm.label_dropout=-1)."""
    card = getattr(teacher, "card", None)
    if card is not None:
        p = float((card.guidance or {}).get("label_dropout", 0))
        return {"sigma_min": card.sigma_min, "sigma_max": card.sigma_max, "shape": tuple(card.shape),
                "num_classes": card.num_classes,
                "label_dropout": (p if p > 0 else EXACT_LABEL_DROPOUT) if card.null_branch else 0.0}
    if isinstance(teacher, PyTeacher):
        return {"sigma_min": teacher.sigma_min, "sigma_max": teacher.sigma_max, "shape": teacher.shape,
                "num_classes": teacher.num_classes, "label_dropout": float(getattr(teacher, "label_dropout", 0))}
    classes = getattr(teacher, "num_classes", 0)    # exact: the config's range; a labelled mixture has a null branch
    return {"sigma_min": None, "sigma_max": None, "shape": None, "num_classes": classes,
            "label_dropout": EXACT_LABEL_DROPOUT if classes else 0.0}
