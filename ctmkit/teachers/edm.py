"""NVIDIA EDM network pickles (`edm:FILE.pkl`), loaded without running their code (docs/method.md section 7).

An EDM snapshot is a pickle of `dict(ema=network, loss_fn=..., augment_pipe=..., dataset_kwargs=...)` whose
networks are "persistent classes": each object is pickled as a call `_reconstruct_persistent_obj(meta)` with `meta`
holding the Python SOURCE of its module, the class name and the object's state. A plain `pickle.load` imports and
executes that source. ctmkit's restricted unpickler admits only the few globals such files use (tensor and storage
rebuilding, OrderedDict, plain modules' reconstruction, numpy scalars and dtypes, the persistence reconstructor)
and maps each to a harmless stand-in: a persistent object becomes a `Persistent(class_name, state)` record whose
source is never imported or executed. Any other global is refused with one error naming it, before anything runs.
The network is then rebuilt from ctmkit's clean-room SongUNet / DhariwalUNet with the hyper-parameters recorded in
the pickled state, and the weights copied by name.

Classifier-free guidance: an EDM network built with `label_dropout > 0` (EDM's option: a training label is replaced
by the zero class vector, EDM's unconditional input) has a null branch; its card says so (`guidance =
{"label_dropout": p}`) and the null label -1 gives the zero class vector. The rebuilt backbone itself drops no
labels (a student's label dropout is ctm.label_dropout, the teacher's by default). A conditional network built
without label dropout (the published conditional ImageNet-64 one) has no null branch and cannot be guided.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import torch

from ..core.precond import EDMDenoiser, EDMNetPrecond, make_precond
from ..core.schedules import SIGMA_MAX, SIGMA_MIN
from ..data.normalize import uint8_image_normalizer
from ..errors import UserError
from ..io.card import DataCard, ModelCard
from ..nets.registry import BackboneSpec

PRECONDS = ("VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond")
UNETS = {"SongUNet": "edm_songunet", "DhariwalUNet": "edm_dhariwalunet"}


class Persistent:
    """An EDM persistent object as data: its class name and pickled state (the module source is dropped)."""

    def __init__(self, class_name: str, state: dict) -> None:
        self.class_name, self.state = class_name, state


class PlainObject:
    """A plain (non-persistent) pickled torch module, e.g. torch.nn.ModuleDict, as data: its class and state."""

    def __init__(self, qualname: str) -> None:
        self.class_name, self.state = qualname, {}

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {"_state": state}


def _reconstruct_persistent(meta) -> Persistent:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str) \
            or not isinstance(meta.get("state"), dict):
        raise UserError("unexpected persistent-object record in the EDM pickle")
    return Persistent(meta["class_name"], meta["state"])     # meta["module_src"] is never looked at


def _load_storage_bytes(b: bytes):
    """torch.storage._load_from_bytes, with torch's safe (weights-only) loader."""
    return torch.load(io.BytesIO(b), weights_only=True)


_PLAIN_MODULES = {("torch.nn.modules.container", "ModuleDict"), ("torch.nn.modules.container", "ModuleList"),
                  ("torch.nn.modules.container", "Sequential")}


def _reconstructor(cls, base, state=None):
    """copyreg._reconstructor for the stand-ins only."""
    if not (isinstance(cls, type) and issubclass(cls, PlainObject)) or base is not object:
        raise UserError("unexpected object reconstruction in the EDM pickle")
    return cls.__new__(cls)


def _plain(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (PlainObject,), {"__init__": lambda self: PlainObject.__init__(
        self, qualname)})


class EDMUnpickler(pickle.Unpickler):
    """Resolves only the globals of EDM network snapshots, each to a stand-in that runs no foreign code."""

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return _reconstruct_persistent
        if key in _PLAIN_MODULES:
            return _plain(f"{module}.{name}")
        if key == ("copyreg", "_reconstructor"):
            return _reconstructor
        if key in (("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset")):
            return {"object": object, "set": set, "frozenset": frozenset}[name]
        if key == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if key == ("torch.storage", "_load_from_bytes"):
            return _load_storage_bytes
        if key in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                   ("torch._tensor", "_rebuild_from_type_v2")):
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and name in ("Tensor", "FloatStorage", "float32", "Size") or \
                module == "torch.nn.parameter" and name == "Parameter":
            return getattr(__import__(module, fromlist=[name]), name)
        if key in (("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")):
            import importlib
            return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")
                                                   if module.startswith("numpy.core") and _numpy2() else module), name)
        raise UserError(f"refusing to load '{module}.{name}' from the EDM pickle: ctmkit admits only the globals of "
                        "EDM network snapshots (tensors, OrderedDict, EDM's persistence records), and runs no code")


def _numpy2() -> bool:
    import numpy
    return int(numpy.__version__.split(".")[0]) >= 2


def read_edm_pickle(path: str | Path) -> dict:
    """The top-level dict of an EDM snapshot, persistent objects as `Persistent` records (no code executed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"EDM pickle '{path}' does not exist")
    try:
        with open(path, "rb") as f:
            data = EDMUnpickler(f).load()
    except UserError:
        raise
    except Exception as e:      # a truncated or foreign file: one line naming it
        raise UserError(f"cannot read '{path}' as an EDM network pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ema"), Persistent):
        raise UserError(f"'{path}' is not an EDM network snapshot (no 'ema' network in it)")
    return data


def state_dict_of(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """The flat state dict of a Persistent / PlainObject module tree (parameters and persistent buffers)."""
    st, out = obj.state, {}
    for name, t in (st.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    skip = set(st.get("_non_persistent_buffers_set") or ())
    for name, t in (st.get("_buffers") or {}).items():
        if t is not None and name not in skip:
            out[prefix + name] = torch.as_tensor(t)
    for name, child in (st.get("_modules") or {}).items():
        if isinstance(child, (Persistent, PlainObject)):
            out.update(state_dict_of(child, f"{prefix}{name}."))
    return out


def _precond_of(net: Persistent):
    """(precond object, its spec, sigma_data, sigma range of the network) from a pickled EDM precond."""
    st = net.state
    ch = int(st["img_channels"])
    if net.class_name == "EDMPrecond":
        sd = float(st.get("sigma_data", 0.5))
        return make_precond(None, sd), None, sd, (float(st.get("sigma_min", 0)), float(st.get("sigma_max", 1e9)))
    if net.class_name == "VPPrecond":
        p = {k: float(st[k]) for k in ("beta_d", "beta_min", "epsilon_t")} | {"M": int(st["M"])}
        pre = EDMNetPrecond("vp", ch, **p)
    elif net.class_name == "VEPrecond":
        pre = EDMNetPrecond("ve", ch)
    else:
        pre = EDMNetPrecond("iddpm", ch, M=int(st["M"]), C_1=float(st["C_1"]), C_2=float(st["C_2"]))
    return pre, pre.spec, 0.5, (float(st["sigma_min"]), float(st["sigma_max"]))


def edm_label_dropout(state: dict, from_kwargs) -> float:
    """The label dropout an EDM U-Net was built with: its `label_dropout` attribute (what it trained with), else its
    constructor argument; 0 when absent. A value outside [0, 1) is a malformed file (UserError)."""
    value = state.get("label_dropout", from_kwargs)
    try:
        p = float(value or 0)
    except (TypeError, ValueError):
        p = -1.0
    if not 0 <= p < 1:
        raise UserError(f"the EDM network's label_dropout must be in [0, 1), got {value!r}")
    return p


def load_edm(path: str | Path) -> EDMDenoiser:
    """`edm:FILE.pkl` -> the snapshot's `ema` network as a ctmkit EDMDenoiser with `.card` (CPU, eval mode)."""
    net = read_edm_pickle(path)["ema"]
    if net.class_name not in PRECONDS:
        raise UserError(f"'{path}': its network is a {net.class_name}; supported: {', '.join(PRECONDS)}")
    model = (net.state.get("_modules") or {}).get("model")
    if not isinstance(model, Persistent) or model.class_name not in UNETS:
        what = getattr(model, "class_name", type(model).__name__)
        raise UserError(f"'{path}': its U-Net is a {what}; supported: {', '.join(UNETS)}")
    precond, spec, sigma_data, (lo, hi) = _precond_of(net)
    kwargs = dict(model.state.get("_init_kwargs") or {})
    label_dropout = edm_label_dropout(model.state, kwargs.pop("label_dropout", 0))
    backbone = BackboneSpec(UNETS[model.class_name], kwargs)
    teacher = EDMDenoiser(backbone.build(), sigma_data, precond)
    weights = {k[len("model."):]: v for k, v in state_dict_of(net).items() if k.startswith("model.")}
    try:
        missing = teacher.backbone.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise UserError(f"'{path}': the weights do not fit the network its hyper-parameters describe "
                        f"({str(e).splitlines()[0]})") from None
    bad = [k for k in missing.missing_keys if not k.startswith("s_")] + list(missing.unexpected_keys)
    if bad:
        raise UserError(f"'{path}': weights missing or unexpected for the rebuilt network: {', '.join(bad[:5])}")
    c, res = int(net.state["img_channels"]), int(net.state["img_resolution"])
    data = DataCard(f"edm:{path}", "image", (c, res, res), int(net.state.get("label_dim", 0)),
                    uint8_image_normalizer(c).to_dict())
    # EDM's own sampler range: max(0.002, net.sigma_min) .. min(80, net.sigma_max)
    teacher.card = ModelCard("teacher", data, backbone, sigma_data, max(SIGMA_MIN, lo), min(SIGMA_MAX, hi),
                             precond=spec, guidance={"label_dropout": label_dropout}
                             if label_dropout > 0 and backbone.num_classes else None)
    teacher.requires_grad_(False)
    return teacher.eval()
