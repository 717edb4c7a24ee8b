"""ctmkit in diffusers: `CTMPipeline` (pipeline.py), `CTMModel` (model.py), `CTMScheduler` (scheduler.py), and
`export_run` (export.py, `ctmkit export`), which writes a run as a diffusers folder for `CTMPipeline.from_pretrained`.

    from ctmkit.diffusers import CTMPipeline
    pipe = CTMPipeline.from_pretrained("exported_ctm")
    images = pipe(batch_size=16, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images

diffusers is an optional extra (pip install 'ctmkit[diffusers]'): this package imports it when one of these names
is first used (`import ctmkit` never does), and says how to install it when it is missing.
"""

from __future__ import annotations

import importlib

__all__ = ["CTMModel", "CTMPipeline", "CTMScheduler", "export_run"]
_WHERE = {"CTMModel": "model", "CTMPipeline": "pipeline", "CTMScheduler": "scheduler", "export_run": "export"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ctmkit.diffusers' has no attribute {name!r}")
    from ..nets.diffusers_unet import import_diffusers
    import_diffusers()         # one line naming the extra when diffusers is not installed
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
