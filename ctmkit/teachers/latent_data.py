"""A latent teacher's data (docs/method.md section 9): an image folder encoded once into a prepared latent folder
(data/latents.py), the record that ties such a folder to its pipeline, and `check_latent_data(data, teacher)`.

The image folder follows the Hugging Face imagefolder convention: image files plus `metadata.jsonl`, one JSON object
a line with `file_name` (relative to the folder) and `text` (its prompt). Every line, file and image size is checked
before anything is encoded; images must already have the pipeline's image size (the VAE's input; nothing is cropped
or resized behind the user's back). The latents are the VAE posterior's mean, scaled (nets/vae.py), the prompts are
encoded once each by the pipeline's text encoder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..data.latents import LatentData, LatentWriter
from ..errors import UserError
from ..nets.vae import LatentVAE
from ..progress import progress_bar

METADATA = "metadata.jsonl"
PROMPT_CHUNK = 64            # prompts per call of the text encoder while the embeddings table is written


def fingerprint(folder: Path) -> str:
    """A short digest of a component folder (vae/, text_encoder/): every file's name and size and 16 spaced 64 KiB
    pieces of its bytes, so that another network is told apart without reading gigabytes."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(folder)}:{size};".encode())
        with open(path, "rb") as f:
            for k in range(16):
                f.seek(size * k // 16)
                h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


def pipeline_record(teacher) -> dict:
    """What a prepared folder records of its pipeline (and what `check_latent_data` compares): the folder, the latent
    and image shapes, the VAE (its factors and fingerprint) and the text conditioning (with the fingerprints of its
    text encoders: text_encoder/, text_encoder_2/ ...)."""
    lat, folder = teacher.card.latent, Path(teacher.folder)
    encoders = ",".join(fingerprint(p) for p in sorted(folder.glob("text_encoder*")) if p.is_dir())
    return {"pipeline": {"folder": str(folder), "class": lat.get("pipeline")},
            "image_shape": list(lat["image_shape"]), "latent_shape": list(teacher.card.shape),
            "vae": {**lat["vae"], "fingerprint": fingerprint(folder / "vae")},
            "text": {**lat["text"], "fingerprint": encoders}}


def check_latent_data(data, teacher) -> None:
    """UserError (one line) unless `data` is a prepared latent folder made with this teacher's VAE and text encoder:
    the same latent shape, VAE factors and weights, text encoder and embedding shape (the UNet may differ)."""
    if not isinstance(data, LatentData):
        raise UserError(f"teacher '{teacher.folder}' is a latent text-to-image pipeline: its data must be a prepared "
                        f"latent folder (ctmkit prepare --pipeline {teacher.folder} ...), not '{data.spec}'")
    have, want = data.manifest, pipeline_record(teacher)
    for key, what in (("latent_shape", "latent shape"), ("vae", "VAE"), ("text", "text encoder")):
        if have.get(key) != want[key]:
            raise UserError(f"'{data.spec}' was prepared with pipeline '{have['pipeline'].get('folder')}', whose "
                            f"{what} differs from that of '{teacher.folder}'; prepare it again with --pipeline "
                            f"{teacher.folder}")
    if want["text"].get("pooled") and data.pooled is None:
        raise UserError(f"'{data.spec}' holds no pooled prompt embeddings, which the denoiser of "
                        f"'{teacher.folder}' takes (prepared by an older ctmkit); prepare it again with --pipeline "
                        f"{teacher.folder}")


def read_metadata(src: Path) -> tuple[list[Path], list[str]]:
    """(image paths, prompts) of an image folder's metadata.jsonl, every line and file checked (one line each)."""
    meta = Path(src) / METADATA
    if not meta.is_file():
        raise UserError(f"'{src}' has no {METADATA}: an image folder for --pipeline needs one JSON line per image "
                        'with its file and prompt, e.g. {"file_name": "0001.png", "text": "a red dog"}')
    files, texts = [], []
    for i, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if not (isinstance(item, dict) and isinstance(item.get("file_name"), str)
                and isinstance(item.get("text"), str)):
            raise UserError(f"'{meta}' line {i}: expected a JSON object with string keys file_name and text")
        files.append(Path(src) / item["file_name"])
        texts.append(item["text"])
    if not files:
        raise UserError(f"'{meta}' lists no images")
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise UserError(f"'{meta}' names {len(missing)} missing file(s), the first '{missing[0]}'")
    return files, texts


def check_image_sizes(files: list[Path], image_shape: list[int]) -> None:
    """Every image has the pipeline's size (width x height; the header alone is read)."""
    from PIL import Image
    h, w = image_shape[1:]
    for path in files:
        try:
            with Image.open(path) as im:
                size = im.size
        except Exception as e:    # not an image PIL can read: the user's file, one line
            raise UserError(f"cannot read image '{path}' ({str(e).splitlines()[0]})") from None
        if size != (w, h):
            raise UserError(f"image '{path}' is {size[0]}x{size[1]} but the pipeline's VAE takes {w}x{h} images; "
                            f"resize (or centre-crop) the images to {w}x{h} first")


def read_image(path: Path, channels: int) -> np.ndarray:
    """uint8 [H, W, C] (RGB, or grey for a one-channel VAE)."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB" if channels == 3 else "L")).reshape(im.size[1], im.size[0], channels)


def prompt_table(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """(the distinct prompts in order of first appearance [P], each item's row in them, int64 [N])."""
    rows = {}
    index = np.asarray([rows.setdefault(t, len(rows)) for t in texts], dtype=np.int64)
    return list(rows), index


def embed_chunks(teacher, prompts: list[str], pooled: list):
    """The embeddings [k, L, D] of `prompts`, PROMPT_CHUNK prompts at a time (each distinct prompt encoded once);
    their pooled embeddings [k, Dp], when the teacher's condition has them, are appended to `pooled`."""
    for i in range(0, len(prompts), PROMPT_CHUNK):
        cond = teacher.encode_prompt(prompts[i:i + PROMPT_CHUNK])
        if cond.pooled is not None:
            pooled.append(cond.pooled.numpy())
        yield cond.embeds.numpy()


def write_prompts(writer: LatentWriter, teacher, texts: list[str]) -> int:
    """The prompt table of items whose prompts are `texts` [N] into `writer` (with the pooled embeddings of a
    teacher that takes them); returns P (distinct prompts)."""
    prompts, index = prompt_table(texts)
    null = teacher.encode_prompt([""])                        # the empty prompt: the null condition
    pooled = []
    writer.set_prompts(prompts, index, embed_chunks(teacher, prompts, pooled), null.null_embeds.numpy())
    if null.null_pooled is not None:
        writer.set_pooled(np.concatenate(pooled), null.null_pooled.numpy())
    return len(prompts)


def prepare_images(teacher, src: Path, out: Path, batch_size: int = 16, progress: bool | None = True,
                   device: str | torch.device = "cpu") -> dict:
    """Encode the image folder `src` (metadata.jsonl) into the prepared latent folder `out`; returns the manifest."""
    files, texts = read_metadata(src)
    record = pipeline_record(teacher)
    check_image_sizes(files, record["image_shape"])
    vae = LatentVAE.from_pipeline(teacher.folder, teacher.card.latent["vae"]).to(device)
    channels = record["image_shape"][0]
    with LatentWriter(out, len(files), tuple(record["latent_shape"])) as writer:
        starts = progress_bar(range(0, len(files), batch_size), desc="encode", total=-(-len(files) // batch_size),
                              enabled=progress)
        for start in starts:
            batch = np.stack([read_image(p, channels) for p in files[start:start + batch_size]])
            writer.add(vae.encode(torch.from_numpy(batch)).cpu())
        count = write_prompts(writer, teacher, texts)
        manifest = {**record, "prompts": count, "source": {"kind": "images", "folder": str(src)},
                    "encoding": "posterior mean"}
        writer.finish(manifest)
    return {**manifest, "count": len(files)}
