"""Foreign teachers behind the denoiser protocol (docs/method.md section 7): diffusers pipeline folders and the
user's own Python denoisers.

`diffusers:DIR` (pixel folders; latent pipelines: see teachers/pipelines.py): a folder written by
`save_pretrained` with `unet/` (a UNet2DModel, class-conditional ones
included) and `scheduler/`: discrete-time VP schedulers with `alphas_cumprod` (DDPM, DDIM, ...) and prediction type
epsilon, v_prediction or sample; or FlowMatchEulerDiscreteScheduler (rectified flow, velocity). Weights are read
from the folder only (nothing downloads). The result is an EDMDenoiser around ctmkit's DiffusersUNet backbone with
the teacher's own preconditioning and a ModelCard (so it samples, evaluates and distills like a ctmkit teacher).
Settings follow the folder after `?`: `diffusers:DIR?null_class=K` names the class index that a class-conditional
UNet was trained with for dropped labels (its null branch: diffusers does not record it); with it the null label -1
becomes class K and the teacher can be guided (classifier-free guidance, ctmkit/core/guidance.py).

`py:MODULE:ATTR`: a denoiser callable D(x, sigma, labels=None) in model space, or a zero-argument factory that
returns one. This imports and runs the user's module: the one SPEC that runs code, by the user's explicit choice.
Optional attributes of the denoiser: sigma_min, sigma_max (default EDM's 0.002 and 80), shape (default: the data's),
num_classes (default 0), label_dropout (default 0; > 0: it answers the null label -1 and can be guided).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from ..core.precond import EDMDenoiser, FlowPrecond, VPPrecond
from ..core.schedules import SIGMA_MAX, SIGMA_MIN
from ..data.normalize import Normalizer, uint8_image_normalizer
from ..errors import UserError
from ..io.card import DataCard, ModelCard, read_json_object
from ..io.export import is_export
from ..nets.diffusers_unet import DiffusersUNet, import_diffusers, load_unet_weights, unet_config_from
from ..nets.registry import BackboneSpec

FLOW_TAU_MAX = 0.995   # a rectified flow's tau = 1 is sigma = infinity: ctmkit starts at tau = 0.995 (sigma 199)


def scheduler_precond(folder: Path):
    """The preconditioning and sigma range of a diffusers scheduler folder: (precond, sigma_min, sigma_max)."""
    cfg = read_json_object(folder / "scheduler_config.json", f"diffusers teacher '{folder.parent}'")
    name = str(cfg.get("_class_name", ""))
    diffusers = import_diffusers()
    if name == "FlowMatchEulerDiscreteScheduler":
        T = int(cfg.get("num_train_timesteps", 1000))
        return FlowPrecond(T), (1 / T) / (1 - 1 / T), FLOW_TAU_MAX / (1 - FLOW_TAU_MAX)
    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if cls is None:
        raise UserError(f"diffusers teacher '{folder.parent}': unknown scheduler class '{name}'")
    try:
        sched = cls.from_config(cfg)
    except Exception as e:    # a foreign config: any failure is the user's file, said in one line
        raise UserError(f"diffusers teacher '{folder.parent}': cannot build {name} from its config ({e})") from None
    ac = getattr(sched, "alphas_cumprod", None)
    if ac is None:
        raise UserError(f"diffusers teacher '{folder.parent}': {name} has no alphas_cumprod (not a discrete VP "
                        "scheduler); supported: DDPM/DDIM-style schedulers and FlowMatchEulerDiscreteScheduler")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise UserError(f"diffusers teacher '{folder.parent}': prediction_type '{prediction}' is not supported "
                        "(epsilon, v_prediction, sample)")
    pre = VPPrecond(torch.as_tensor(ac, dtype=torch.float64), prediction)
    return (pre, *pre.sigma_range)


DIFFUSERS_SETTINGS = ("null_class",)


def diffusers_source(source: str | Path) -> tuple[Path, dict]:
    """The part of a SPEC after 'diffusers:' -> (folder, settings): 'DIR' or 'DIR?null_class=K' (settings joined
    by '&'; a folder whose own name holds '?' is taken whole when it exists)."""
    source = str(source)
    if "?" not in source or Path(source).is_dir():
        return Path(source), {}
    folder, query = source.rsplit("?", 1)
    settings = {}
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if key not in DIFFUSERS_SETTINGS or not eq:
            raise UserError(f"diffusers teacher '{source}': unknown setting '{item}'; settings: "
                            "?null_class=K (the class index of the null label, for guidance)")
        try:
            settings[key] = int(value)
        except ValueError:
            raise UserError(f"diffusers teacher '{source}': {key} must be a class index, got '{value}'") from None
    return Path(folder), settings


def load_diffusers(source: str | Path) -> EDMDenoiser:
    """A diffusers pipeline folder, with its settings ('DIR' or 'DIR?null_class=K', see diffusers_source) -> its
    denoiser (CPU, eval mode, `.card`)."""
    folder, settings = diffusers_source(source)
    if is_export(folder):
        raise UserError(f"'{folder}' is a ctmkit export (a CTM, not a diffusers teacher): use --model {folder}, "
                        "without diffusers:")
    if not (folder / "unet").is_dir() or not (folder / "scheduler").is_dir():
        raise UserError(f"diffusers teacher '{folder}' must be a folder written by save_pretrained with unet/ and "
                        "scheduler/ inside")
    cfg = read_json_object(folder / "unet" / "config.json", f"diffusers teacher '{folder}'")
    if cfg.get("_class_name") != "UNet2DModel":
        raise UserError(f"diffusers teacher '{folder}': its unet is a {cfg.get('_class_name')}; a pixel folder takes "
                        "UNet2DModel (a latent text-to-image pipeline needs its whole save_pretrained folder, with "
                        "model_index.json, vae/, text_encoder/ and tokenizer/)")
    precond, sigma_min, sigma_max = scheduler_precond(folder / "scheduler")
    diffusers = import_diffusers()
    try:
        unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:    # corrupt or missing weights: one line naming the folder
        raise UserError(f"diffusers teacher '{folder}': cannot load unet/ ({str(e).splitlines()[0]})") from None
    config = unet_config_from(unet)
    null = {"null_class": settings["null_class"]} if "null_class" in settings else {}
    try:
        net = DiffusersUNet(config, **null)
    except UserError as e:
        raise UserError(f"diffusers teacher '{folder}': {e}") from None
    load_unet_weights(net, unet.state_dict())
    teacher = EDMDenoiser(net, 0.5, precond)
    size = config.get("sample_size") or 32
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    c = int(config.get("in_channels", 3))
    data = DataCard(f"diffusers:{folder}", "image", (c, h, w), net.num_classes, uint8_image_normalizer(c).to_dict())
    teacher.card = ModelCard("teacher", data, BackboneSpec("diffusers_unet2d", {"config": config, **null}), 0.5,
                             float(sigma_min), float(sigma_max), precond=precond.spec, guidance=null or None)
    teacher.requires_grad_(False)
    return teacher.eval()


class PyTeacher(torch.nn.Module):
    """A user's denoiser callable behind the protocol, with its reported sigma range, shape and classes."""

    def __init__(self, fn, spec: str) -> None:
        super().__init__()
        self.fn, self.spec = fn, spec
        self.sigma_min = float(getattr(fn, "sigma_min", SIGMA_MIN))
        self.sigma_max = float(getattr(fn, "sigma_max", SIGMA_MAX))
        shape = getattr(fn, "shape", None)
        self.shape = tuple(int(v) for v in shape) if shape is not None else None
        self.num_classes = int(getattr(fn, "num_classes", 0))
        self.label_dropout = float(getattr(fn, "label_dropout", 0.0))   # > 0: it answers the null label -1
        if not 0 < self.sigma_min < self.sigma_max:
            raise UserError(f"teacher '{spec}': needs 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                            f"{self.sigma_max}")
        if self.shape is not None:   # a card, so that `ctmkit sample` can run it (samples stay in model space)
            kind = "vector" if len(self.shape) == 1 else "image"
            norm = (Normalizer("vector", "ND", "float32", shift=[0.0] * self.shape[0]) if kind == "vector" else
                    Normalizer("image", "NCHW", "float32", lo=-1.0, hi=1.0))
            data = DataCard(spec, kind, self.shape, self.num_classes, norm.to_dict())
            guidance = {"label_dropout": self.label_dropout} if self.label_dropout > 0 else None
            self.card = ModelCard("teacher", data, BackboneSpec("py", {"spec": spec}), 0.5, self.sigma_min,
                                  self.sigma_max, guidance=guidance)

    def forward(self, x, sigma, labels=None):
        return self.fn(x, sigma, labels)


def load_py(spec: str) -> PyTeacher:
    """`py:MODULE:ATTR` -> the user's denoiser (imported from the current folder or sys.path)."""
    parts = spec[len("py:"):].split(":")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"teacher SPEC '{spec}' must be py:MODULE:ATTR, e.g. py:my_teacher:make_denoiser")
    module_name, attr = parts
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")   # the current folder, as `python -m` would
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"teacher '{spec}': cannot import module '{module_name}' ({e})") from None
    if not hasattr(module, attr):
        raise UserError(f"teacher '{spec}': module '{module_name}' has no attribute '{attr}'")
    obj = getattr(module, attr)
    if not callable(obj):
        raise UserError(f"teacher '{spec}': '{attr}' is not callable")
    if not isinstance(obj, torch.nn.Module) and _takes_no_arguments(obj):
        obj = obj()                # a factory
        if not callable(obj):
            raise UserError(f"teacher '{spec}': the factory '{attr}' did not return a callable denoiser")
    return PyTeacher(obj, spec)


def _takes_no_arguments(fn) -> bool:
    import inspect
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
