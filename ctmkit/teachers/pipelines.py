"""`diffusers:DIR`: which loader a diffusers folder goes to (docs/method.md sections 7 and 9).

Pixel folders (`unet/` UNet2DModel + `scheduler/`, with no model_index.json or one naming no vae) go to
teachers/foreign.py; latent text-to-image pipelines (model_index.json naming a vae) to teachers/sd3.py when they
name a transformer (SD3; others refused there), to teachers/sdxl.py when they are SDXL's (a StableDiffusionXL... class
or a text_encoder_2 entry) and to teachers/latent.py otherwise (a UNet2DConditionModel: SD 1.x / 2.x). A folder
holding ctmkit's own export (`_class_name` CTMPipeline) is refused with a pointer to `--model`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..io.card import read_json_object
from ..io.export import is_export
from .foreign import diffusers_source, load_diffusers
from .latent import listed, load_latent
from .sd3 import load_sd3
from .sdxl import is_sdxl, load_sdxl


def load_diffusers_folder(source: str | Path):
    """The part of a SPEC after 'diffusers:' -> its teacher: a latent pipeline (model_index.json naming a vae) ->
    LatentTeacher (a transformer: load_sd3, SDXL: load_sdxl, else load_latent); a pixel folder -> teachers/foreign.py:
    load_diffusers; ctmkit's own export -> UserError."""
    folder, settings = diffusers_source(source)
    if not (folder / "model_index.json").is_file() or is_export(folder):
        return load_diffusers(source)          # a pixel folder, or ctmkit's own export (refused there)
    index = read_json_object(folder / "model_index.json", f"diffusers teacher '{folder}'")
    if not listed(index, "vae"):
        return load_diffusers(source)
    if settings:
        raise UserError(f"diffusers teacher '{source}': a text-conditioned pipeline takes no settings (its null "
                        "condition is the empty prompt)")
    if listed(index, "transformer"):
        return load_sd3(folder, index)
    return load_sdxl(folder, index) if is_sdxl(index) else load_latent(folder, index)
