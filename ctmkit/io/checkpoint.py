"""Checkpoints: safetensors weights + JSON metadata, written atomically, verified by SHA-256 on load.

A checkpoint ``ckpt-00001000.safetensors`` holds every tensor of the training state (weights, EMAs,
optimiser moments, RNG states); the nested structure and scalars are JSON in the safetensors metadata.
The sidecar ``ckpt-00001000.json`` (written last) records the step and the file's SHA-256: a checkpoint
without a matching sidecar is incomplete or corrupt and is never loaded. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .atomic import atomic_write_text, plain_mode, temp_beside

log = logging.getLogger(__name__)


def _flatten(obj, prefix: str, tensors: dict):
    """Replace tensors in a nested dict/list by {'__t__': key}, collecting them in `tensors`."""
    if torch.is_tensor(obj):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__t__": prefix}
    if isinstance(obj, dict):
        return {"__d__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                          for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__l__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__t__" in obj:
            return tensors[obj["__t__"]]
        if "__d__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__d__"]}
        if "__l__" in obj:
            return [_unflatten(v, tensors) for v in obj["__l__"]]
    return obj


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write state (nested dicts/lists of tensors and scalars) as checkpoint `step`; keep the newest `keep`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    skeleton = _flatten(state, "s", tensors)
    path = ckpt_dir / f"ckpt-{step:08d}.safetensors"
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"ctmkit_state": json.dumps(skeleton)})
        os.chmod(tmp, plain_mode())  # save_file replaces tmp by a new file of mode 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(path.with_suffix(".json"), json.dumps({"step": step, "sha256": digest, "file": path.name}))
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    for stale in ckpt_dir.glob(".ckpt-*.tmp"):  # left by a process killed while writing (one writer per run)
        stale.unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files in step order (oldest first), whether valid or not."""
    return sorted(Path(ckpt_dir).glob("ckpt-*.safetensors"))


def load_checkpoint(path: Path) -> dict:
    """Load and verify one checkpoint (sidecar present, SHA-256 matches); UserError if it is not intact."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"checkpoint '{path}' is incomplete: its metadata '{meta_path.name}' is missing or unreadable"
                        ) from None
    if not path.is_file() or sha256_file(path) != expected:
        raise UserError(f"checkpoint '{path}' is corrupt or truncated (SHA-256 does not match its metadata)")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            skeleton = json.loads(f.metadata()["ctmkit_state"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"checkpoint '{path}' is not a ctmkit safetensors checkpoint ({why}); "
                        "ctmkit never loads pickled (torch.save) files") from None
    try:
        state = _unflatten(skeleton, tensors)
    except (KeyError, TypeError, ValueError, RecursionError):
        state = None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint '{path}' has a malformed state structure; it was not written by ctmkit")
    return state


def newest_intact(ckpt_dir: Path) -> tuple[dict, Path] | tuple[None, list[str]]:
    """The newest intact checkpoint of ckpt_dir as (state, path), newer broken ones skipped with one warning line
    each; or (None, problems) when none is intact (problems: each broken one's message, newest first; no
    warnings, so the caller can say it in one line). The one place that walks checkpoints newest first."""
    problems = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = load_checkpoint(path)
        except UserError as e:
            problems.append(str(e))
            continue
        for why in problems:
            log.warning("skipping %s", why)
        return state, path
    return None, problems


def load_latest(ckpt_dir: Path, strict: bool = False) -> tuple[dict, Path] | None:
    """The newest intact checkpoint in ckpt_dir (broken newer ones skipped, one warning line each), or None if
    there is none. When every checkpoint is broken: None with the warnings, or (strict) one UserError that gives
    the newest one's problem."""
    state, found = newest_intact(ckpt_dir)
    if state is not None:
        return state, found
    if found and strict:
        raise UserError(f"no intact checkpoint in '{ckpt_dir}' ({len(found)} broken, newest: {found[0]}); "
                        "move them away to start from scratch")
    for why in found:
        log.warning("skipping %s", why)
    return None
