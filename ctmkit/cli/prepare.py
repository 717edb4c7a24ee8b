"""`ctmkit prepare` and `fid-ref`: data sources converted to .npy, and FID reference statistics."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .base import DATA_HELP, check_new_outputs, check_out_dir, force_option, main, user_errors


@main.command("prepare")
@click.argument("paths", nargs=-1, metavar="[SRC] OUT")
@click.option("--resolution", type=int, default=None,
              help="Centre-crop to a square and resize to R x R (Lanczos; EDM dataset_tool's center-crop). For "
                   "image files (folders, zips) of differing sizes, e.g. ImageNet.")
@click.option("--pipeline", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="A latent text-to-image pipeline folder (diffusers save_pretrained, model_index.json + vae/ "
                   "text_encoder/ ...): OUT becomes a prepared latent folder for --data OUT, from SRC's images or "
                   "from --prompts.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="With --pipeline and no SRC: make the data from the teacher's own samples, one prompt a line.")
@click.option("--num-samples", "--n", "n", type=int, default=1, show_default=True,
              help="With --prompts: samples per prompt.")
@click.option("--nfe", type=int, default=None, help="With --prompts: the teacher's Heun NFE (default 35).")
@click.option("--guidance", type=float, default=None, metavar="W",
              help="With --prompts: classifier-free guidance scale (default the pipeline's 7.5).")
@click.option("--seed", type=int, default=0, show_default=True, help="With --prompts: sample i depends on (seed, i).")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="With --pipeline: images encoded, or samples drawn, at a time.")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def prepare_cmd(paths, resolution, pipeline, prompts_file, n, nfe, guidance, seed, batch_size, force, quiet):
    """Convert a data source to OUT.npy: uint8 images [N, H, W(, C)], labels (if any) in OUT.labels.npy beside it,
    read back together by `--data OUT.npy`. SRC: an image folder (class subfolders = labels), an EDM dataset zip or
    folder (dataset.json labels), a CIFAR-10 batches folder, an MNIST idx folder, or an .npz / .npy of uint8
    images. Images are decoded one at a time into a memory-mapped file: memory stays bounded. An existing OUT.npy
    or OUT.labels.npy is refused unless --force is given.

    \b
    For a latent text-to-image teacher (--pipeline DIR), OUT is a folder of VAE latents and prompt embeddings:
      ctmkit prepare --pipeline sd SRC OUT              # SRC: images + metadata.jsonl (file_name, text)
      ctmkit prepare --pipeline sd --prompts p.txt --n 4 --guidance 7.5 OUT   # the teacher's own samples
    Encode real images when you have captioned images of the teacher's size (the latents are the VAE posterior's
    mean); sample the teacher when you have only prompts (slower: a Heun solve per item). Each distinct prompt is
    encoded once; --data OUT reads the folder back in batches."""
    from ..data.images import labels_path
    from ..data.prepare import prepare
    if pipeline is not None or prompts_file is not None:
        return prepare_latents(paths, pipeline, prompts_file, resolution, n, nfe, guidance, seed, batch_size, force,
                               quiet)
    if len(paths) != 2:
        raise UserError("prepare takes SRC OUT (see `ctmkit prepare --help`)")
    src, out = paths
    if resolution is not None and resolution < 1:
        raise UserError("--resolution must be >= 1")
    src_path = Path(src)
    if not src_path.exists():
        raise UserError(f"'{src}' does not exist")
    if Path(out).is_dir():
        raise UserError(f"output '{out}' is a directory; give a file name ending in .npy")
    check_out_dir(Path(out))
    check_new_outputs([Path(out), labels_path(Path(out))], force)   # the labels file is written or removed
    info = prepare(src_path, Path(out), resolution, progress=not quiet)
    extra = f" + {Path(out).with_suffix('.labels.npy')}" if info["labelled"] else ""
    click.echo(f"wrote {out}{extra}: {info['n']} images of shape {tuple(info['shape'])}")


def prepare_latents(paths, pipeline, prompts_file, resolution, n, nfe, guidance, seed, batch_size, force, quiet):
    """`prepare --pipeline DIR (SRC | --prompts FILE) OUT`: a prepared latent folder (data/latents.py)."""
    if pipeline is None:
        raise UserError("--prompts makes data from a teacher's samples: name it with --pipeline DIR")
    if len(paths) != (1 if prompts_file else 2):
        raise UserError("give --pipeline DIR SRC OUT (images) or --pipeline DIR --prompts FILE OUT (the teacher's "
                        "samples)" + (": not both" if prompts_file and len(paths) == 2 else ""))
    if resolution is not None:
        raise UserError("--resolution does not apply with --pipeline: give images of the pipeline's size")
    if n < 1 or batch_size < 1 or (nfe is not None and nfe < 1):
        raise UserError("--num-samples, --batch-size and --nfe must be >= 1")
    from ..data.latents import is_latent_folder
    out = Path(paths[-1])
    check_out_dir(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"'{out}' already exists; pass --force to replace it")
    if out.exists() and not is_latent_folder(out):      # --force replaces an earlier preparation, nothing else
        raise UserError(f"output '{out}' exists and is not a prepared latent folder; give a new OUT")
    import torch

    from ..eval.prompts import prepare_prompts, read_prompt_file
    from ..teachers import LatentTeacher, load_teacher
    from ..teachers.latent_data import prepare_images
    prompts = read_prompt_file(Path(prompts_file)) if prompts_file else None
    if not prompts_file and not Path(paths[0]).is_dir():
        raise UserError(f"'{paths[0]}' is not a folder: SRC is an image folder with a metadata.jsonl")
    teacher = load_teacher(f"diffusers:{pipeline}")
    if not isinstance(teacher, LatentTeacher):
        raise UserError(f"--pipeline '{pipeline}' is not a latent text-to-image pipeline (model_index.json naming a "
                        "vae, text_encoder, unet ...)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if prompts_file:
        info = prepare_prompts(teacher.to(device), prompts, out, n, nfe, guidance, seed, batch_size, not quiet)
    else:
        info = prepare_images(teacher, Path(paths[0]), out, batch_size, not quiet, device)
    click.echo(f"wrote {out}: {info['count']} latents of shape {tuple(info['latent_shape'])}, {info['prompts']} "
               "distinct prompts")


@main.command("fid-ref")
@click.option("--data", required=True, help="Data SPEC of the reference images. " + DATA_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="FILE.npz: mu [2048], sigma [2048, 2048]; an existing one needs --force.")
@click.option("--num-samples", "--n", "n", type=int, default=None,
              help="Use this many items (a fixed random subset); default: all of them, as EDM's reference files do.")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def fid_ref(data, out, n, force, quiet):
    """Write FID reference statistics of a data set in EDM's format (an .npz with float64 `mu` and `sigma` of the
    Inception-v3 pool3 features, the network of the fid extra), for `ctmkit eval --metric fid --ref FILE`. An
    existing --out is refused unless --force is given."""
    import torch

    from ..data import load_data
    from ..metrics.fid import InceptionFeatures, write_ref_stats
    from ..metrics.frechet import streamed_stats
    from ..progress import progress_bar
    out = Path(out)
    if out.suffix != ".npz":
        raise UserError(f"--out must end in .npz, got '{out.name}'")
    check_out_dir(out)
    dataset = load_data(data)
    if dataset.kind != "image":
        raise UserError(f"'{data}' holds {dataset.kind}s; FID statistics need images")
    if n is not None and n < 2:
        raise UserError("--num-samples must be >= 2")
    check_new_outputs([out], force)     # after the inputs, before any work
    count = len(dataset) if n is None else min(n, len(dataset))
    idx = torch.arange(count) if count == len(dataset) else dataset.subset(count, torch.Generator().manual_seed(0))
    features = InceptionFeatures()
    batches = progress_bar(dataset.batches(idx, 500), total=-(-count // 500), desc="fid-ref", enabled=not quiet)
    mu, sigma = streamed_stats(features(x) for x in batches)     # read, featurised and summed 500 images at a time
    write_ref_stats(out, mu, sigma)
    click.echo(f"wrote {out} ({count} images)")
