"""Where a training run's images come from, and what its dataset input records.

:func:`locate` turns ``--data-dir`` into a local folder: the built-in synthetic set, a
folder on disk, or a set in the object store (``s3://BUCKET/PREFIX``, pulled into the cache
keyed by its digest, see :mod:`plantml.datasets.remote`). :class:`DataSource` carries what
MLflow records as the run's dataset input: name, digest, source and split sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from plantml.datasets.cache import SetHold, hold
from plantml.datasets.manifest import Manifest, build_manifest
from plantml.errors import DataError
from plantml.text import safe_data, safe_text

SourceKind = Literal["synthetic", "local", "s3"]
#: Pulls of one set in a row whose cached copy a cache clean-up removed before the training held it.
PULL_TRIES = 3


@dataclass(frozen=True)
class DataSource:
    """A data set ready on local disk, with where it came from."""

    folder: Path
    name: str
    uri: str
    kind: SourceKind
    #: The pushed set's manifest digest (s3 sets); local sets are hashed when scanned.
    digest: str | None = None
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    #: The pushed set's manifest (s3 sets), which :meth:`check_digest` holds the cached files to.
    manifest: Manifest | None = field(default=None, repr=False, compare=False)
    #: The training's lock on the cached copy (s3 sets): ``plantml data cache --remove-unused-for`` leaves it alone.
    hold: SetHold | None = field(default=None, repr=False, compare=False)

    def check_digest(self, scanned: str, skipped: int) -> None:
        """Refuse a cached copy of a pushed set that no longer matches its manifest (changed on disk).

        ``scanned`` is the digest of the images the scan kept: it covers every file when none was
        ``skipped``. When some were, the scan's digest says nothing about them, so every file of the
        folder is hashed again and held to the manifest: a skipped file must still be the one pushed.
        """
        if self.digest is None:
            return
        if not skipped:
            problem = None if scanned == self.digest else f"digest {scanned[:12]}… instead of {self.digest[:12]}…"
        elif self.manifest is None:
            problem = "its manifest is unknown, so skipped images cannot be checked"
        else:
            problem = self.manifest.first_difference(build_manifest(self.folder))
        if problem:
            raise DataError(f"{self.folder}: the cached copy of {self.uri} changed since it was pulled "
                            f"({problem}); delete the folder to pull it again")

    def origin_of(self, path: Path) -> str:
        """Where an image of this set comes from, for messages: its ``s3://`` key for a pulled set
        (its cache path says nothing to the user), else the path itself."""
        if self.kind != "s3":
            return str(path)
        try:
            return f"{self.uri}/{path.relative_to(self.folder).as_posix()}"
        except ValueError:
            return str(path)


@dataclass(frozen=True)
class DatasetRecord:
    """A run's dataset input, as MLflow stores it (see :meth:`MLflowTracker.log_input`)."""

    name: str
    digest: str
    source: str
    source_type: str
    splits: dict[str, int]
    classes: tuple[str, ...]
    context: str = "training"

    def profile(self) -> str:
        """The JSON profile MLflow shows beside the data set: split sizes, classes and the whole
        content digest (MLflow's digest field keeps only its first 32 characters)."""
        return json.dumps(safe_data({**self.splits, "classes": self.classes, "content_sha256": self.digest}), sort_keys=True)

    def source_json(self) -> str:
        """MLflow's source field: a JSON object naming the location."""
        key = "uri" if self.source_type == "s3" else "path"
        return json.dumps({key: safe_text(self.source)})


def locate(data_dir: str | Path | None, synthetic_folder: Any, *, progress: Any = None) -> DataSource:
    """The data set ``data_dir`` names, on local disk. ``synthetic_folder`` makes the synthetic set when it is None."""
    from plantml.datasets.remote import is_s3_uri

    if data_dir is None:
        folder = Path(synthetic_folder())
        return DataSource(folder, folder.name, "synthetic", "synthetic")
    if is_s3_uri(str(data_dir)):
        return pull_for_training(str(data_dir), progress=progress)
    folder = Path(data_dir).expanduser()
    if not folder.exists():  # the scan says so, naming it as given
        return DataSource(folder, folder.name, str(folder), "local")
    # named after the folder itself: `--data-dir .` has no name of its own, and MLflow refuses an empty one
    resolved = folder.resolve()
    return DataSource(folder, resolved.name or str(resolved), str(resolved), "local")


def pull_for_training(uri: str, *, progress: Any = None) -> DataSource:
    """Pull the set at ``uri`` into plantml's cache (``PLANTML_CACHE_DIR``), with the object store of the settings."""
    from plantml.datasets.remote import S3Location, object_store_client, pull
    from plantml.settings import cache_dir, resolve_tracking_settings

    S3Location.parse(uri)  # a bad location is the error to show, before the settings are read
    client = object_store_client(resolve_tracking_settings())
    for _ in range(PULL_TRIES):
        result = pull(client, uri, cache_dir(), progress=progress)
        held = hold(result.folder)
        if held is not None:
            return DataSource(result.folder, result.manifest.name, result.source, "s3", result.manifest.digest,
                              result.downloaded, result.downloaded_bytes, result.manifest, held)
    raise DataError(f"{uri}: its cached copy {result.folder} was removed each time it was pulled ({PULL_TRIES} times): "
                    "is a `plantml data cache --remove-unused-for` running in a loop?")
