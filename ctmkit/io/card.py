"""The model card: the typed, versioned content of a run folder's `model.json`, the one record of what a trained
network is (teacher or CTM), what data it was trained on and how to rebuild it. Written by training, read by
every loader; validated on read with one clear error.

Format versions: 0 = the files of ctmkit 0.1.0 (no `format_version` key), 1 = the same keys plus
`format_version`. Both load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from ..data.normalize import Normalizer
from ..errors import UserError
from ..nets.registry import BackboneSpec
from .atomic import atomic_write_text

FORMAT_VERSION = 1
KINDS = ("ctm", "teacher")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file holding an object; one UserError, prefixed by `what`, when it is missing, unreadable or not one."""
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what}: '{path}' is missing") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot read '{path}' ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{what}: '{path}' must hold a JSON object")
    return d


def malformed(path: Path | str, e: Exception) -> UserError:
    """The one message for a model.json whose content does not describe a network ctmkit can build."""
    return UserError(f"'{path}' is malformed ({type(e).__name__}: {e}); it was not written by this version of ctmkit")


@dataclass(frozen=True)
class DataCard:
    """What a model remembers of its data: SPEC, kind ('vector' | 'image'), per-sample shape in model space,
    class count (0 = unlabelled), the normaliser (a Normalizer dict) and the exact mixture when known."""

    spec: str
    kind: str
    shape: tuple[int, ...]
    num_classes: int
    normalizer: dict
    mixture: dict | None = None

    @classmethod
    def of(cls, data) -> DataCard:
        """The card of a ctmkit.data.Dataset."""
        return cls(data.spec, data.kind, tuple(data.shape), data.num_classes, data.normalizer.to_dict(),
                   data.mixture.to_dict() if data.mixture is not None else None)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "shape": list(self.shape), "num_classes": self.num_classes,
                "normalizer": self.normalizer, "mixture": self.mixture}

    @classmethod
    def from_dict(cls, d: dict) -> DataCard:
        shape = tuple(int(v) for v in d["shape"])
        if not (shape and all(v >= 1 for v in shape) and int(d["num_classes"]) >= 0
                and isinstance(d["normalizer"], dict)):
            raise ValueError("its 'data' entry needs shape, num_classes and normalizer")
        return cls(str(d.get("spec", "")), str(d.get("kind", d["normalizer"].get("kind", ""))), shape,
                   int(d["num_classes"]), d["normalizer"], d.get("mixture"))


@dataclass(frozen=True)
class ModelCard:
    """A trained network: kind ('ctm' | 'teacher'), its data, backbone, EDM sigma_data and sigma range, the
    evaluation EMA rates, the teacher SPEC it was distilled from (CTMs), the format version, and the
    preconditioning of a foreign teacher's form (None = EDM; see ctmkit.core.precond.make_precond)."""

    kind: str
    data: DataCard
    backbone: BackboneSpec
    sigma_data: float
    sigma_min: float
    sigma_max: float
    ema: tuple[float, ...] = (0.999,)
    teacher: str | None = None
    format_version: int = FORMAT_VERSION
    precond: dict | None = None
    sampled: dict | None = None     # the weights load_model samples when not the first EMA: a post-hoc EMA
                                    # {"phema": {"sigma_rel", "step"}, "file": path in the run} (`ctmkit ema`)
    guidance: dict | None = None    # classifier-free guidance (docs/method.md section 8): {"label_dropout": p} when
                                    # trained with the null label -1 (a null branch; EDM pickles: EDM's own
                                    # label_dropout), {"null_class": K} for a foreign network whose null branch is
                                    # a class index named by the user (diffusers:DIR?null_class=K; the backbone maps
                                    # -1 to K), {"scale": [w] | [lo, hi]} for a CTM distilled from the guided
                                    # teacher (one scale, or a range through a w input)
    latent: dict | None = None      # a latent text-to-image teacher's pipeline (docs/method.md section 9): the
                                    # folder, its VAE (class, scaling_factor, shift_factor, downscale), the
                                    # image shape, and `text` (encoders, tokenizers, embedding shape, null prompt)

    @property
    def is_ctm(self) -> bool:
        return self.kind == "ctm"

    @property
    def num_classes(self) -> int:
        """Classes the network is conditioned on (0: unconditional, even when its data has labels)."""
        return self.backbone.num_classes

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def text_conditioned(self) -> bool:
        """The network takes prompt embeddings (a TextCond, core/conditions.py) rather than class labels."""
        return bool((self.latent or {}).get("text"))

    @property
    def null_branch(self) -> bool:
        """The network has a null branch (trained with label dropout > 0, or a named null class; a text model's is
        the empty prompt): it can be guided by sampling."""
        g = self.guidance or {}
        return self.text_conditioned or (self.conditional and (float(g.get("label_dropout", 0)) > 0
                                                               or g.get("null_class") is not None))

    @property
    def guidance_scale(self) -> tuple[float, ...]:
        """The guidance scale(s) a CTM was distilled for: (1.0,) unguided, (w,) one scale, (lo, hi) a range."""
        return tuple(float(v) for v in (self.guidance or {}).get("scale", [1.0]))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def to_data(self, x: Tensor | np.ndarray) -> np.ndarray:
        """Model-space samples [N, ...] (from gamma_sample, heun_sample, ...) -> the data's own space, dtype and layout,
        as `ctmkit sample` writes them (e.g. uint8 [N, H, W, C] images; vectors shifted and scaled back)."""
        return Normalizer.from_dict(self.data.normalizer).to_data(x)

    def to_unit(self, x: Tensor | np.ndarray) -> np.ndarray:
        """Model-space images [N, C, H, W] -> float32 [N, H, W, C] in [0, 1] through the data's own space: equal, bit
        for bit, to `ctmkit sample`'s samples s after (s - lo) / (hi - lo) (Normalizer.to_unit; lo, hi: the data's
        value range in model.json, e.g. 0 and 255 for uint8 images)."""
        return Normalizer.from_dict(self.data.normalizer).to_unit(self.to_data(x))

    def check_data(self, data, what: str = "the model") -> None:
        """UserError unless `data` (a Dataset) has the per-sample shape this model was trained on."""
        if tuple(data.shape) != self.shape:
            raise UserError(f"{what} was trained on shape {self.shape}, but '{data.spec}' has shape "
                            f"{tuple(data.shape)}")

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "backbone": self.backbone.to_dict(), "sigma_data": self.sigma_data,
             "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "data": self.data.to_dict()}
        if self.teacher is not None:
            d["teacher"] = self.teacher
        if self.precond is not None:
            d["precond"] = self.precond
        if self.sampled is not None:
            d["sampled"] = self.sampled
        if self.guidance is not None:
            d["guidance"] = self.guidance
        if self.latent is not None:
            d["latent"] = self.latent
        return {**d, "ema": list(self.ema), "format_version": FORMAT_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        """Validate and build; ValueError/KeyError/TypeError on a malformed dict (see read())."""
        version = d.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"format_version must be a non-negative integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise UserError(f"model.json has format version {version}, newer than this ctmkit understands "
                            f"({FORMAT_VERSION}); upgrade ctmkit")
        if d["kind"] not in KINDS:
            raise ValueError(f"kind must be 'ctm' or 'teacher', got {d['kind']!r}")
        bb = d["backbone"]
        if not isinstance(bb, dict) or not isinstance(bb.get("kwargs"), dict):
            raise ValueError("its 'backbone' entry needs arch and kwargs")
        sig = [float(d[k]) for k in ("sigma_data", "sigma_min", "sigma_max")]
        if not (sig[0] > 0 and 0 < sig[1] < sig[2]):
            raise ValueError("need sigma_data > 0 and 0 < sigma_min < sigma_max")
        precond = d.get("precond")
        if precond is not None and not isinstance(precond, dict):
            raise ValueError("its 'precond' entry must be an object")
        sampled = d.get("sampled")
        if sampled is not None and not (isinstance(sampled, dict) and isinstance(sampled.get("file"), str)):
            raise ValueError("its 'sampled' entry must be an object with a 'file'")
        latent = d.get("latent")
        if latent is not None and not (isinstance(latent, dict) and isinstance(latent.get("vae"), dict)):
            raise ValueError("its 'latent' entry must be an object with a 'vae'")
        return cls(d["kind"], DataCard.from_dict(d["data"]), BackboneSpec(str(bb["arch"]), dict(bb["kwargs"])),
                   *sig, tuple(float(r) for r in d.get("ema", (0.999,))), d.get("teacher"), version, precond,
                   sampled, _guidance(d.get("guidance")), latent)

    def write(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / "model.json", json.dumps(self.to_dict(), indent=1))

    @classmethod
    def read(cls, run_dir: Path) -> ModelCard:
        """The card of a run folder, or one UserError that says what is wrong with its model.json."""
        path = Path(run_dir) / "model.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"'{run_dir}' is not a ctmkit run folder (no model.json); train one with "
                            "`ctmkit train-teacher` or `ctmkit distill`") from None
        except (ValueError, RecursionError):
            raise UserError(f"'{path}' is not valid JSON") from None
        except OSError as e:
            raise UserError(f"cannot read '{path}': {e.strerror or e}") from None
        if not isinstance(d, dict):
            raise UserError(f"'{path}' must hold a JSON object; it was not written by ctmkit")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise malformed(path, e) from None


def _guidance(g) -> dict | None:
    """The card's 'guidance' entry, checked: None, or an object with label_dropout in [0, 1), null_class (a class
    index) and/or scale [w] or [lo, hi] (0 <= lo < hi)."""
    if g is None:
        return None
    if not isinstance(g, dict):
        raise ValueError("its 'guidance' entry must be an object")
    if not 0 <= float(g.get("label_dropout", 0)) < 1:
        raise ValueError("guidance.label_dropout must be in [0, 1)")
    null = g.get("null_class")
    if null is not None and (isinstance(null, bool) or not isinstance(null, int) or null < 0):
        raise ValueError("guidance.null_class must be a class index (an integer >= 0)")
    scale = [float(v) for v in g.get("scale", [1.0])]
    if not (len(scale) in (1, 2) and min(scale) >= 0 and (len(scale) == 1 or scale[0] < scale[1])):
        raise ValueError("guidance.scale must be [w] or [lo, hi] with 0 <= lo < hi")
    return dict(g)
