"""`ctmkit prepare` and `fid-ref`: data sources converted to .npy, and FID reference statistics."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .base import DATA_HELP, check_new_outputs, check_out_dir, force_option, main, user_errors


@main.command("prepare")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--resolution", type=int, default=None,
              help="Centre-crop to a square and resize to R x R (Lanczos; EDM dataset_tool's center-crop). For "
                   "image files (folders, zips) of differing sizes, e.g. ImageNet.")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def prepare_cmd(src, out, resolution, force, quiet):
    """Convert a data source to OUT.npy: uint8 images [N, H, W(, C)], labels (if any) in OUT.labels.npy beside it,
    read back together by `--data OUT.npy`. SRC: an image folder (class subfolders = labels), an EDM dataset zip or
    folder (dataset.json labels), a CIFAR-10 batches folder, an MNIST idx folder, or an .npz / .npy of uint8
    images. Images are decoded one at a time into a memory-mapped file: memory stays bounded. An existing OUT.npy
    or OUT.labels.npy is refused unless --force is given."""
    from ..data.images import labels_path
    from ..data.prepare import prepare
    if resolution is not None and resolution < 1:
        raise UserError("--resolution must be >= 1")
    src_path = Path(src)
    if not src_path.exists():
        raise UserError(f"'{src}' does not exist")
    check_out_dir(Path(out))
    check_new_outputs([Path(out), labels_path(Path(out))], force)   # the labels file is written or removed
    info = prepare(src_path, Path(out), resolution, progress=not quiet)
    extra = f" + {Path(out).with_suffix('.labels.npy')}" if info["labelled"] else ""
    click.echo(f"wrote {out}{extra}: {info['n']} images of shape {tuple(info['shape'])}")


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
        raise UserError(f"'{data}' holds vectors; FID statistics need images")
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
