"""Prepared latent folders (docs/method.md section 9): the data of a latent text-to-image teacher, encoded once.

`ctmkit prepare --pipeline DIR ...` writes a folder OUT holding
    ctmkit_latents.json     the manifest (written last): format, pipeline, latent / image shape, VAE factors, text
                            encoder, counts, shard size, where the items came from
    latents-00000.npy ...   float32 latents [n_k, C, h, w] in shards of `shard_size` items: item i is row
                            i mod shard_size of shard i // shard_size; z = (E(x) - shift_factor) * scaling_factor
    prompt_index.npy        int64 [N]: the prompt of each item, a row of the table below
    prompts.json            the P distinct prompts, in order of first appearance
    embeds.npy              float32 [P, L, D]: each distinct prompt's embedding, stored once
    null_embeds.npy         float32 [L, D]: the empty prompt's embedding (the null condition)
    pooled.npy              float32 [P, Dp]: each prompt's pooled embedding, when the pipeline's denoiser takes one
                            (SD3, SDXL; the manifest's text["pooled"] = Dp, None for an SD 1.x / 2.x pipeline)
    null_pooled.npy         float32 [Dp]: the empty prompt's pooled embedding (with pooled.npy)
and `load_data(OUT)` reads it as a `LatentData`: items are the latents (read per batch with positioned reads:
nothing is loaded up front, memory stays bounded), the condition of an item is its prompt index (`labels`), and
`text_cond(idx)` gives the TextCond of some items from the embeddings table (with pooled embeddings when stored).
Format version 2 added the pooled files; version 1 folders (UNet pipelines, no pooled) are read as they are. The
folder is written into a temp folder
beside OUT and renamed into place when complete: a failed preparation leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.conditions import TextCond
from ..errors import UserError
from .dataset import Dataset
from .normalize import Normalizer
from .readers import NpyRows, read_npy

MANIFEST = "ctmkit_latents.json"
FORMAT, VERSION = "ctmkit-latents", 2     # 2: pooled.npy / null_pooled.npy (SD3, SDXL); 1 is read
SHARD_SIZE = 4096            # items per latents shard (SD 1.x at 512 px: 64 KB an item, 256 MB a shard)


def is_latent_folder(path: Path) -> bool:
    """A folder written by `ctmkit prepare --pipeline` (it holds the manifest)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def shard_name(k: int) -> str:
    return f"latents-{k:05d}.npy"


def read_manifest(folder: Path) -> dict:
    """The manifest of a prepared latent folder, checked (one UserError otherwise)."""
    path = Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{path}' ({e}); prepare the folder again") from None
    keys = ("format", "version", "pipeline", "latent_shape", "count", "prompts", "shard_size", "vae", "text")
    if not isinstance(m, dict) or m.get("format") != FORMAT or any(k not in m for k in keys):
        raise UserError(f"'{path}' is not a ctmkit latent manifest; prepare the folder again with ctmkit prepare")
    if not isinstance(m["version"], int) or m["version"] > VERSION:
        raise UserError(f"'{folder}' was prepared by a newer ctmkit (format version {m['version']}); upgrade ctmkit")
    return m


class LatentRows:
    """The latents of a prepared folder as a read-only array [N, C, h, w] over its shards, read on access
    (`a[index array]`, `a[i]`, `a[start:stop]`): each shard is an NpyRows (positioned reads, nothing kept)."""

    def __init__(self, folder: Path, count: int, shard_size: int, shape: tuple) -> None:
        self.shape, self.dtype, self.shard_size = (count, *shape), np.dtype(np.float32), shard_size
        self.shards = []
        for k in range(-(-count // shard_size)):
            rows = read_npy(folder / shard_name(k), lazy=True).data
            want = (min(shard_size, count - k * shard_size), *shape)
            if not isinstance(rows, NpyRows) or rows.shape != want or rows.dtype != self.dtype:
                raise UserError(f"'{folder / shard_name(k)}' is not a float32 array of shape {want}; prepare the "
                                "folder again")
            self.shards.append(rows)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(*key.indices(len(self)))
        if np.ndim(key) == 0:
            return self[np.asarray([key])][0]
        idx = np.asarray(key, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"an index is out of range for {len(self)} items")
        idx = idx % max(len(self), 1)
        out = np.empty((idx.size, *self.shape[1:]), self.dtype)
        for k in np.unique(idx // self.shard_size):          # one shard at a time, only the rows asked for
            mine = np.flatnonzero(idx // self.shard_size == k)
            out[mine] = self.shards[k][idx[mine] % self.shard_size]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[np.arange(len(self))]
        return a if dtype is None else a.astype(dtype)


@dataclass
class LatentData(Dataset):
    """A prepared latent folder as a Dataset: items = latents (model space as stored), labels = each item's prompt
    index (int64 [N]; num_classes 0: the condition is text, not a class), `prompts` (the P texts), `embeds` (the
    table [P, L, D], read per row), `null_embeds` [L, D], the pooled embeddings `pooled` [P, Dp] and `null_pooled`
    [Dp] (None when the pipeline takes none), the `manifest` and the `folder`."""

    prompts: list = field(default_factory=list)
    embeds: object = None
    null_embeds: Tensor | None = None
    pooled: Tensor | None = None
    null_pooled: Tensor | None = None
    manifest: dict = field(default_factory=dict)
    folder: Path | None = None

    @property
    def kind(self) -> str:
        return "latent"

    def __getitem__(self, idx) -> Tensor:
        """Latents [len(idx), C, h, w] float32, exactly as stored (they are already in model space)."""
        return self.raw(idx).float()

    def prompt_embeds(self, prompt_idx) -> TextCond:
        """The TextCond of prompt rows `prompt_idx` [B] (rows of the table, read on access; with their pooled
        embeddings when the folder has them)."""
        rows = np.asarray(prompt_idx, dtype=np.int64).reshape(-1)
        pooled = None if self.pooled is None else self.pooled[torch.from_numpy(rows)]
        return TextCond(torch.from_numpy(np.ascontiguousarray(self.embeds[rows])), self.null_embeds, pooled,
                        self.null_pooled)

    def text_cond(self, idx) -> TextCond:
        """The TextCond of items `idx` [B]: their prompts' embeddings, with the null (empty prompt) embedding."""
        return self.prompt_embeds(self.labels[torch.as_tensor(np.asarray(idx, dtype=np.int64))].numpy())


def load_latents(folder: Path, n: int | None = None) -> LatentData:
    """A prepared latent folder -> LatentData (the first `n` items when given); UserError on a broken folder."""
    folder = Path(folder)
    m = read_manifest(folder)
    count, shape = int(m["count"]), tuple(int(v) for v in m["latent_shape"])
    rows = LatentRows(folder, count, int(m["shard_size"]), shape)
    index = read_npy(folder / "prompt_index.npy").data
    try:
        prompts = json.loads((folder / "prompts.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{folder / 'prompts.json'}' ({e}); prepare the folder again") from None
    embeds = read_npy(folder / "embeds.npy", lazy=True).data
    null = read_npy(folder / "null_embeds.npy").data
    table = (int(m["prompts"]), *m["text"]["embeds"])
    if (index.shape != (count,) or index.dtype != np.int64 or len(prompts) != table[0] or embeds.shape != table
            or null.shape != table[1:] or (count and not 0 <= index.min() <= index.max() < table[0])):
        raise UserError(f"'{folder}' is inconsistent with its manifest ({count} items, {table[0]} prompts, "
                        f"embeddings {list(table[1:])}); prepare it again")
    pooled = read_pooled(folder, m)
    if n is not None:
        rows, index = rows if n >= count else _first(rows, n), index[:n]
    norm = Normalizer("image", "NCHW", "float32", lo=-1.0, hi=1.0)       # the identity: latents as they are
    return LatentData(items=rows, labels=torch.from_numpy(index.copy()), num_classes=0, normalizer=norm,
                      spec=str(folder), prompts=list(prompts), embeds=embeds,
                      null_embeds=torch.from_numpy(null.astype(np.float32)), manifest=m, folder=folder, **pooled)


def read_pooled(folder: Path, m: dict) -> dict:
    """{"pooled": [P, Dp], "null_pooled": [Dp]} of a folder whose pipeline takes pooled embeddings (the manifest's
    text["pooled"] = Dp), {} for one without or prepared before they were stored (version 1: its teacher refuses
    it, teachers/latent_data.py); shapes against the manifest, one line otherwise."""
    width = m["text"].get("pooled") if isinstance(m["text"], dict) else None
    if not width or not (folder / "pooled.npy").is_file():
        return {}
    pooled, null = read_npy(folder / "pooled.npy").data, read_npy(folder / "null_pooled.npy").data
    if pooled.shape != (int(m["prompts"]), int(width)) or null.shape != (int(width),):
        raise UserError(f"'{folder}' is inconsistent with its manifest ({m['prompts']} prompts, pooled embeddings "
                        f"of width {width}); prepare it again")
    return {"pooled": torch.from_numpy(pooled.astype(np.float32)),
            "null_pooled": torch.from_numpy(null.astype(np.float32))}


def _first(rows: LatentRows, n: int) -> LatentRows:
    """The first n items of `rows` (a view: the same shards, a shorter shape)."""
    out = LatentRows.__new__(LatentRows)
    out.shape, out.dtype, out.shard_size = (n, *rows.shape[1:]), rows.dtype, rows.shard_size
    out.shards = rows.shards[:-(-n // rows.shard_size)]
    return out


class LatentWriter:
    """Writes a prepared latent folder: latents appended in order (`add`), the prompt table (`set_prompts`), then
    `finish(manifest)`. Used as a context manager: everything goes into a temp folder beside OUT, renamed into place
    by `finish`; on an error the temp folder is removed and OUT is left as it was."""

    def __init__(self, out: Path, count: int, latent_shape: tuple, shard_size: int | None = None) -> None:
        self.out, self.count, self.shape = Path(out), count, tuple(latent_shape)
        self.shard_size = shard_size or SHARD_SIZE
        self.tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
        self.written, self.shard = 0, None

    def __enter__(self) -> LatentWriter:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.shard = None
        shutil.rmtree(self.tmp, ignore_errors=True)       # gone after finish(); removed with its parts otherwise

    def add(self, z: Tensor | np.ndarray) -> None:
        """Append latents [b, C, h, w] (float32) in item order."""
        z = np.asarray(z.detach().cpu() if isinstance(z, Tensor) else z, dtype=np.float32)
        if z.shape[1:] != self.shape or self.written + len(z) > self.count:
            raise ValueError(f"LatentWriter expects latents {self.shape}, {self.count} in all; got {z.shape}")
        pos = 0
        while pos < len(z):
            k, r = divmod(self.written, self.shard_size)
            if r == 0:                   # a new shard, filled in place
                size = min(self.shard_size, self.count - self.written)
                self.shard = np.lib.format.open_memmap(self.tmp / shard_name(k), "w+", np.float32, (size, *self.shape))
            take = min(len(z) - pos, len(self.shard) - r)
            self.shard[r:r + take] = z[pos:pos + take]
            pos, self.written = pos + take, self.written + take
            if r + take == len(self.shard):
                self.shard.flush()

    def set_prompts(self, prompts: list[str], index, embeds, null_embeds) -> None:
        """The distinct prompts [P], each item's prompt index [N], their embeddings [P, L, D] (an array or an
        iterable of chunks [k, L, D], written as they come) and the null embedding [L, D]."""
        (self.tmp / "prompts.json").write_text(json.dumps(list(prompts)))
        np.save(self.tmp / "prompt_index.npy", np.asarray(index, dtype=np.int64))
        np.save(self.tmp / "null_embeds.npy", np.asarray(null_embeds, dtype=np.float32))
        table, i = None, 0
        for chunk in ([embeds] if isinstance(embeds, (np.ndarray, Tensor)) else embeds):
            chunk = np.asarray(chunk, dtype=np.float32)
            if table is None:
                table = np.lib.format.open_memmap(self.tmp / "embeds.npy", "w+", np.float32,
                                                  (len(prompts), *chunk.shape[1:]))
            table[i:i + len(chunk)] = chunk
            i += len(chunk)
        table.flush()

    def set_pooled(self, pooled, null_pooled) -> None:
        """The prompts' pooled embeddings [P, Dp] (rows as in set_prompts) and the null one [Dp]."""
        np.save(self.tmp / "pooled.npy", np.asarray(pooled, dtype=np.float32))
        np.save(self.tmp / "null_pooled.npy", np.asarray(null_pooled, dtype=np.float32))

    def finish(self, manifest: dict) -> None:
        """Write the manifest (with the counts) and move the folder to OUT (an existing OUT is replaced)."""
        if self.written != self.count:
            raise ValueError(f"LatentWriter got {self.written} of {self.count} latents")
        self.shard = None
        m = {"format": FORMAT, "version": VERSION, **manifest, "latent_shape": list(self.shape),
             "count": self.count, "shard_size": self.shard_size}
        (self.tmp / MANIFEST).write_text(json.dumps(m, indent=1))
        old = self.out.with_name(f".{self.out.name}.{os.getpid()}.old")
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        shutil.rmtree(old, ignore_errors=True)
