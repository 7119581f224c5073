"""``plantml data``: make or inspect image data sets."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("data", context_settings={"help_option_names": ["-h", "--help"]})
def data() -> None:
    """Make or inspect image data sets (ImageFolder layout: one sub-folder per class)."""


@data.command("synth", context_settings={"show_default": True})
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--per-class", type=click.IntRange(min=3), default=200, help="Images per class.")
@click.option("--size", type=click.IntRange(16, 1024), default=96, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, help="Seed; the same values always give the same files.")
def synth(directory: Path, per_class: int, size: int, seed: int) -> None:
    """Write the synthetic two-class leaf set (healthy, diseased) into DIRECTORY."""
    from plantml.training import synth as synth_mod
    from plantml.training.data import scan_image_folder

    synth_mod.generate(directory, synth_mod.SynthSpec(per_class=per_class, size=size, seed=seed))
    scan = scan_image_folder(directory)
    counts = ", ".join(f"{name} {count}" for name, count in scan.class_counts().items())
    click.echo(f"{directory}: {len(scan.samples)} images ({counts}), content hash {scan.content_hash[:16]}")


@data.command("inspect")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--skip-bad-images", is_flag=True, help="Count unreadable images instead of failing.")
def inspect(directory: Path, skip_bad_images: bool) -> None:
    """Check DIRECTORY as a data set: classes, image counts, unreadable files, content hash."""
    from plantml.training.data import scan_image_folder

    scan = scan_image_folder(directory, skip_bad_images=skip_bad_images)
    for name, count in scan.class_counts().items():
        click.echo(f"{name}\t{count}")
    click.echo(f"total\t{len(scan.samples)}")
    if scan.skipped:
        click.echo(f"skipped\t{len(scan.skipped)} unreadable")
    click.echo(f"hash\t{scan.content_hash}")
