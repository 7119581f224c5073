"""``plantml data``: make or inspect image data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from plantml.cli.bars import bytes_bar, scan_bar


@click.group("data", context_settings={"help_option_names": ["-h", "--help"]})
def data() -> None:
    """Make or inspect image data sets (ImageFolder layout: one sub-folder per class)."""


def _object_store(location: str) -> Any:
    """A client on the object store, once ``location`` is known to be a valid s3:// location (a bad one is
    the error to show, whatever the settings)."""
    from plantml.datasets.remote import S3Location, object_store_client
    from plantml.settings import resolve_tracking_settings

    S3Location.parse(location)
    return object_store_client(resolve_tracking_settings())


@data.command("synth", context_settings={"show_default": True})
@click.argument("directory")
@click.option("--per-class", type=click.IntRange(min=3), default=200, help="Images per class.")
@click.option("--size", type=click.IntRange(16, 1024), default=96, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, help="Seed; the same values always give the same files.")
def synth(directory: str, per_class: int, size: int, seed: int) -> None:
    """Write the synthetic two-class leaf set (healthy, diseased) into DIRECTORY, a folder or s3://BUCKET/PREFIX.

    A folder must be new, empty, or a synthetic set already; one holding other files is refused.
    """
    from plantml.datasets.remote import is_s3_uri
    from plantml.staging import scratch_folder
    from plantml.training import synth as synth_mod
    from plantml.training.data import scan_image_folder

    spec = synth_mod.SynthSpec(per_class=per_class, size=size, seed=seed)
    if is_s3_uri(directory):
        with scratch_folder("plantml-synth") as scratch:
            folder = synth_mod.generate(scratch / spec.name, spec)
            _push(folder, directory)
        return
    scan = scan_image_folder(synth_mod.write_set(directory, spec))
    counts = ", ".join(f"{name} {count}" for name, count in scan.class_counts().items())
    click.echo(f"{directory}: {len(scan.samples)} images ({counts}), content hash {scan.content_hash[:16]}")


@data.command("push")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.argument("destination")
@click.option("--workers", type=click.IntRange(1, 128), default=16, show_default=True, help="Parallel uploads.")
def push(directory: Path, destination: str, workers: int) -> None:
    """Upload the image set DIRECTORY to DESTINATION (s3://BUCKET/PREFIX) with its manifest.

    Files already there with the same bytes are skipped, so running it again after an
    interruption resumes. Credentials: MLFLOW_S3_ENDPOINT_URL and AWS_* (environment or .env).
    """
    _push(directory, destination, workers)


def _push(directory: Path, destination: str, workers: int = 16) -> None:
    from plantml.cli.warnings_output import show_warnings
    from plantml.datasets.manifest import class_folders
    from plantml.datasets.remote import push as push_set

    store = _object_store(destination)
    class_folders(directory)  # missing, or fewer than two classes: said before torch's import (9 s here)
    from plantml.training.data import scan_image_folder

    show_warnings()
    # every image decoded first, as a training does: a set with an image that cannot be decoded would upload,
    # then fail every training from it
    scan_image_folder(directory, bad_image_hint="a pushed set must train: repair or remove it, then push again", record="use",
                      progress=scan_bar)
    with bytes_bar("push") as bar:
        result = push_set(store, directory, destination, workers=workers, progress=bar)
    m = result.manifest
    click.echo(f"{destination}: {len(m.files)} files ({result.uploaded} uploaded, {result.skipped} already there, "
               f"{result.uploaded_bytes / 1e6:.1f} MB sent), {len(m.classes)} classes, digest {m.digest}")


@data.command("ls")
@click.argument("location")
def ls(location: str) -> int:
    """List the data sets pushed under LOCATION (s3://BUCKET or s3://BUCKET/PREFIX) with their digests.

    A manifest that cannot be read is one warning line on stderr; the others are still listed, and the exit code is 1.
    """
    from plantml.datasets.listing import iter_manifest_lines, list_sets

    listing = list_sets(_object_store(location), location)
    if not listing.sets and not listing.broken:
        click.echo(f"{location}: no data sets")
    for line in iter_manifest_lines(listing.sets):
        click.echo(line)
    for problem in listing.broken:
        click.echo(f"plantml: warning: {problem}", err=True)
    return 1 if listing.broken else 0


@data.command("cache")
@click.option("--remove-unused-for", "unused_for", metavar="DURATION", default=None,
              help="Remove the sets no training used for DURATION (90s, 10m, 2h, 30d); sets in use are kept.")
@click.option("--dry-run", is_flag=True, help="With --remove-unused-for: list what would be removed, remove nothing.")
def cache(unused_for: str | None, dry_run: bool) -> None:
    """List the data sets pulled into the cache ($PLANTML_CACHE_DIR/datasets), or remove those unused for a while."""
    import time

    from plantml.datasets.cache import cached_sets, remove_unused
    from plantml.errors import UsageError
    from plantml.settings import cache_dir, parse_duration

    root = cache_dir()
    if unused_for is None:
        if dry_run:
            raise UsageError("--dry-run goes with --remove-unused-for")
        listed = cached_sets(root)
        for cached in listed:
            click.echo(_cached_line(cached, time.time()))
        total = sum(cached.size_bytes for cached in listed)
        click.echo(f"{len(listed)} set(s), {total / 1e6:.1f} MB in {root / 'datasets'}")
        return
    removed = remove_unused(root, parse_duration(unused_for), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for cached in removed:
        click.echo(f"{verb} {_cached_line(cached, time.time())}")
    click.echo(f"{verb} {len(removed)} set(s), {sum(c.size_bytes for c in removed) / 1e6:.1f} MB")


def _cached_line(cached: Any, now: float) -> str:
    from plantml.text import safe_text

    days = max(0.0, now - cached.last_used) / 86400
    return (f"{cached.digest[:12]}  {safe_text(cached.name)}  {cached.files} files  {cached.size_bytes / 1e6:.1f} MB  "
            f"last used {days:.1f} days ago{'  in use' if cached.in_use else ''}")


@data.command("inspect")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--skip-bad-images", is_flag=True, help="Count unreadable images instead of failing.")
def inspect(directory: Path, skip_bad_images: bool) -> None:
    """Check DIRECTORY as a data set: classes, image counts, unreadable files, content hash.

    Every image is read, decoded and hashed (a training reads only those changed since its last scan of the
    folder), and what was found is recorded for the next training.
    """
    from plantml.cli.warnings_output import show_warnings
    from plantml.text import shown_text
    from plantml.training.data import scan_image_folder, stratified_split

    show_warnings()  # the scan's warnings (files left out of the set) as train prints them
    # every byte read, whatever a training recorded (a disk's silent damage keeps a file's stat), and recorded anew
    scan = scan_image_folder(directory, skip_bad_images=skip_bad_images, record="renew", progress=scan_bar)
    # a class too small for train/val/test is the error train would give, not a table that says all is well
    stratified_split([label for _, label in scan.samples], class_names=scan.classes)
    for name, count in scan.class_counts().items():
        # one line per class: a name's tab or newline escaped, bytes that are not UTF-8 as %XX (as MLflow records it)
        shown = shown_text(name.replace("\\", "\\\\"))
        click.echo(f"{shown}\t{count}")
    click.echo(f"total\t{len(scan.samples)}")
    if scan.skipped:
        click.echo(f"skipped\t{len(scan.skipped)} unreadable (such as {shown_text(str(scan.skipped[0]))})")
    click.echo(f"hash\t{scan.content_hash}")
