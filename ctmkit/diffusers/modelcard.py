"""The README.md model card of an exported CTM, in the hub's format: YAML metadata (library, pipeline tag, tags, the
license left for the user, the teacher), then the teacher, the data, the network, the training config, the quality
table of a `ctmkit eval` result, the sample grid and the code that loads and samples it."""

from __future__ import annotations

from ..io.card import ModelCard

GRID_SEED = 0     # samples.png: seed 0, one jump


def model_card(card: ModelCard, scheduler: dict, name: str, n_grid: int, config: str | None,
               quality: dict | None) -> str:
    """The README.md text."""
    parts = [_metadata(card), f"# {name}: a Consistency Trajectory Model\n",
             "A CTM (Kim et al., ICLR 2024) distilled with ctmkit: one network G(x_t, t, s) "
             "that jumps along its teacher's probability-flow ODE; one jump gives a sample, more jumps "
             "(gamma-sampling) trade speed for quality.\n", _facts(card, scheduler)]
    if config is not None:
        parts.append(f"## Training config\n\nThe run's `config.yaml`:\n\n```yaml\n{config.rstrip()}\n```\n")
    if quality is not None:
        parts.append(_quality(quality))
    scale = card.guidance_scale
    parts.append(f"## Samples\n\n![samples](samples.png)\n\n{n_grid} samples, one jump (NFE 1), seed {GRID_SEED}"
                 + (", the classes in turn" if card.conditional else "")
                 + (f", guidance_scale={scale[0]:g}" if len(scale) == 2 else "") + ".\n")
    parts.append(_usage(card, name, n_grid))
    return "\n".join(parts)


def _metadata(card: ModelCard) -> str:
    tags = ["ctmkit", "consistency-trajectory-model", "distillation"] + (["class-conditional"] * card.conditional)
    return "\n".join([
        "---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation", "tags:",
        *[f"- {t}" for t in tags],
        "license:   # fill in: the licence of this model (mind those of its data and teacher)",
        f"# base_model: the teacher's hub id, if it has one (distilled from: {card.teacher or 'unknown'})",
        "---", ""])


def _facts(card: ModelCard, scheduler: dict) -> str:
    data = card.data
    classes = f"{card.num_classes} classes" if card.conditional else "unconditional"
    scale = card.guidance_scale
    guidance = (f"distilled for guidance scale {scale[0]:g}" if len(scale) == 1 and scale[0] != 1 else
                f"distilled for guidance scales {scale[0]:g}..{scale[1]:g}" if len(scale) == 2 else
                "has a null branch: guidance_scale=W samples guided" if card.null_branch else "unguided")
    rows = [("teacher", f"`{card.teacher}`"), ("data", f"`{data.spec}`, {data.kind}s of shape {list(data.shape)}, "
                                                          f"{classes}"),
            ("value range", f"{data.normalizer.get('dtype')} data in [{data.normalizer.get('lo', 0):g}, "
                            f"{data.normalizer.get('hi', 1):g}], the pipeline's [0, 1]"),
            ("network", f"`{card.backbone.arch}` backbone"
                        + (f", {card.precond['kind']} preconditioning" if card.precond else ", EDM preconditioning")),
            ("sigma range", f"{card.sigma_min:g} .. {card.sigma_max:g} (EDM sigmas), sigma_data {card.sigma_data:g}"),
            ("training grid", f"{scheduler.get('num_train_timesteps') or 'unknown'} points (ctm.num_scales)"),
            ("guidance", guidance)]
    return "## Model\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _quality(quality: dict) -> str:
    """The rows of a `ctmkit eval` result as a table."""
    guided = any("guidance" in r for r in quality["rows"])
    head = "| model | sampler | NFE | gamma |" + (" guidance |" if guided else "") + f" {quality.get('metric')} |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in quality["rows"]:
        w = f" {r.get('guidance', '')} |" if guided else ""
        lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['gamma']} |{w} {r['value']:.4g} |")
    doc = quality.get("metric_doc")
    return (f"## Quality (`ctmkit eval` on `{quality.get('data', '?')}`)\n\n" + (f"{doc}\n\n" if doc else "")
            + "\n".join(lines) + "\n")


def _usage(card: ModelCard, name: str, n: int) -> str:
    if card.latent is not None:
        return _prompt_usage(name)
    lo, hi = card.data.normalizer.get("lo", 0), card.data.normalizer.get("hi", 1)
    return f"""## Use

```python
import torch
from ctmkit.diffusers import CTMPipeline   # pip install 'ctmkit[diffusers]'; no remote code is loaded

pipe = CTMPipeline.from_pretrained("{name}")
images = pipe(batch_size={n}, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
more = pipe(batch_size={n}, sigmas=[80.0, 2.5, 0.002], gamma=0.5, output_type="np").images  # NHWC in [0, 1]
```

These are the samples s of `ctmkit sample --model {name} --seed 0 --nfe 1 --n {n} --out s.npz`, mapped to [0, 1]
by (s - {lo:g}) / ({hi:g} - {lo:g}), bit for bit on a CPU; `ctmkit eval --model {name} ...` evaluates the folder.
"""


def _prompt_usage(name: str) -> str:
    return f"""## Use

```python
import torch
from ctmkit.diffusers import CTMPipeline   # pip install 'ctmkit[diffusers]'; no remote code is loaded

pipe = CTMPipeline.from_pretrained("{name}")   # its own VAE, text encoder and tokenizer
images = pipe(prompt=["a red dog"], num_images_per_prompt=4, num_inference_steps=1,
              generator=torch.Generator().manual_seed(0)).images
```

These are the samples of `ctmkit sample --model {name} --prompt "a red dog" --n 4 --seed 0 --nfe 1 --out s.npz`
(its uint8 pixels; the latents bit for bit on a CPU with output_type="latent").
"""
