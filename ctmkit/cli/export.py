"""`ctmkit export`: a CTM run folder as a diffusers folder for `ctmkit.diffusers.CTMPipeline.from_pretrained`."""

from __future__ import annotations

import click

from .base import force_option, main, user_errors


@main.command("export")
@click.argument("run", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--eval", "eval_json", default=None, type=click.Path(dir_okay=False),
              help="A `ctmkit eval` result (FILE.json) whose quality table goes into the model card.")
@force_option
@user_errors
def export(run, out, eval_json, force):
    """Write the CTM of RUN (a run folder of `ctmkit distill`, image data) as the diffusers folder OUT.

    OUT holds model_index.json (ctmkit's CTMPipeline), unet/ (the CTM: safetensors weights, its model card in
    config.json), scheduler/ (CTMScheduler: the sigma range, the training grid, gamma), README.md (a model card for
    the hub: teacher, data, training config, the --eval table, the code that samples it) and samples.png. No
    pickle, no code: it loads with trust_remote_code unset. Written beside OUT and renamed into place; an existing
    OUT is replaced only with --force, once the new folder is complete. Needs the diffusers extra.

    \b
      ctmkit export runs/ctm exported_ctm --eval ev.json
      python -c "import torch; from ctmkit.diffusers import CTMPipeline; \\
        print(CTMPipeline.from_pretrained('exported_ctm')(batch_size=4, output_type='np').images.shape)"
    `ctmkit sample --model OUT` and `ctmkit eval --model OUT` read the folder too."""
    from ..nets.diffusers_unet import import_diffusers
    import_diffusers()                   # one line naming the extra when diffusers is missing
    from ..diffusers.export import export_run
    click.echo(f"wrote {export_run(run, out, eval_json, force)}")
