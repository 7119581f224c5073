"""The image sets under a location of the object store (``plantml data ls``): found by their manifests.

The folders are listed one level at a time, and a set's class folders (its images, many of them) are not:
listing every object cost 4-6 s per 20,000 images stored, so listing grew with every image ever pushed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from plantml.datasets.manifest import MANIFEST_NAME, Manifest
from plantml.datasets.remote import S3Location, list_pages, read_manifest
from plantml.errors import DataError


@dataclass(frozen=True)
class SetListing:
    """What :func:`list_sets` found: the sets, and one line for each manifest that could not be read."""

    sets: list[tuple[S3Location, Manifest]]
    broken: list[str]


def list_sets(client: Any, uri: str) -> SetListing:
    """Every pushed set (one with a manifest) under ``uri``, sorted by location; a broken manifest
    is reported in :attr:`SetListing.broken` and hides none of the others.

    The folders are listed one level at a time, and a set's class folders are not: listing every
    object cost 4-6 s per 20,000 images stored, so `data ls` grew with every image ever pushed."""
    where = S3Location.parse(uri)
    listing = SetListing([], [])
    folders = [f"{where.prefix}/" if where.prefix else ""]
    found: list[tuple[str, S3Location, Manifest | str]] = []
    while folders:
        folder = folders.pop()
        keys, below = _folder_level(client, where, folder)
        skip: set[str] = set()
        if folder + MANIFEST_NAME in keys:
            location = S3Location(where.bucket, folder.rstrip("/"))
            try:
                manifest = read_manifest(client, location)
                skip = {f"{folder}{label}/" for label in manifest.classes}  # images only, many of them
                found.append((folder + MANIFEST_NAME, location, manifest))
            except DataError as exc:
                found.append((folder + MANIFEST_NAME, location, str(exc)))
        folders += [sub for sub in below if sub not in skip]
    for _, location, manifest in sorted(found, key=lambda item: item[0]):
        if isinstance(manifest, str):
            listing.broken.append(manifest)
        else:
            listing.sets.append((location, manifest))
    return listing


def _folder_level(client: Any, where: S3Location, folder: str) -> tuple[set[str], list[str]]:
    """The keys of the objects right in ``folder`` (a key prefix ending in ``/``, or the bucket's root), and its sub-folders."""
    keys: set[str] = set()
    below: list[str] = []
    for page in list_pages(client, where, folder, Delimiter="/"):
        keys.update(item["Key"] for item in page.get("Contents", []))
        below += [common["Prefix"] for common in page.get("CommonPrefixes", [])]
    return keys, below


def iter_manifest_lines(sets: list[tuple[S3Location, Manifest]]) -> Iterator[str]:
    """``plantml data ls`` lines: location, files, classes, size, digest."""
    for location, manifest in sets:
        mb = manifest.total_bytes / 1e6
        yield (f"{location}  {len(manifest.files)} files  {len(manifest.classes)} classes ({', '.join(manifest.classes)})  "
               f"{mb:.1f} MB  digest {manifest.digest}")
