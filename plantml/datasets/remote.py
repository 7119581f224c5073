"""Image sets in the object store: push a folder, list the sets, pull one into a local cache.

Layout of a pushed set ``s3://BUCKET/PREFIX``: the files under their class folders
(``PREFIX/healthy/leaf_0001.png``) and the manifest ``PREFIX/plantml-dataset.json``
(see :mod:`plantml.datasets.manifest`), written last, so a set without a manifest is
an unfinished push.

- :func:`push` uploads in parallel and skips every file already stored with the same
  bytes (the stored ETag of a single-part upload is the MD5 of its bytes; a file sent in
  parts is compared by its SHA-256, stored as object metadata), so running it
  again after an interruption resumes where it stopped. When it replaces files of a set already
  there, it first deletes that set's manifest, so a cut push never leaves a manifest that its
  files no longer match.
- :mod:`plantml.datasets.listing` finds the sets under a location (``plantml data ls``).
- :func:`pull` downloads into ``<cache>/datasets/<digest>/``, checking every file against
  the manifest's SHA-256, and only then makes the folder visible (a rename): a set whose
  folder exists is complete, and a second pull downloads nothing. A missing, corrupt or
  tampered file is a :class:`~plantml.errors.DataError` naming it, and nothing is kept.
  The staging folder is named after its process (:mod:`plantml.staging`), so one left by a
  process that was killed is removed by the next pull.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from plantml.datasets.manifest import MANIFEST_NAME, FileEntry, Manifest, build_manifest, image_files
from plantml.errors import ConfigError, DataError, TrackingError, UsageError
from plantml.staging import CACHE_FOLDER, local_writes, staging_folder, sweep
from plantml.text import NOT_UTF8, file_name, is_utf8, quoted, safe_text

#: Parallel transfers (S3 requests wait on the network, not on the CPU).
DEFAULT_WORKERS = 16
#: Files larger than this go up in parts (their ETag is then not an MD5, so they are compared by size and SHA-256 metadata).
SINGLE_PART_LIMIT = 64 * 1024 * 1024
SHA256_METADATA = "sha256"


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` split in two; the prefix has no leading or trailing slash."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """Split an ``s3://`` URI, or a :class:`UsageError` naming it."""
        if not is_utf8(uri):  # typed in a Latin-1 shell: S3 names are UTF-8, boto3 would fail with a traceback
            raise UsageError(f"{quoted(uri)}: {NOT_UTF8}")
        if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
            raise UsageError(f"{uri!r}: expected s3://BUCKET/PREFIX")
        if "\\" in uri:  # S3 stores (SeaweedFS) read it as '/': what was pushed would never be found again
            raise UsageError(f"{uri!r}: a backslash is not allowed in an S3 location")
        bucket, _, prefix = uri[5:].partition("/")
        prefix = prefix.removesuffix("/")
        for segment in prefix.split("/") if prefix else ():
            if segment in ("", ".", ".."):  # stores refuse or collapse them, so keys would not match
                shown = "an empty path segment (//)" if not segment else f"the path segment {segment!r}"
                raise UsageError(f"{uri!r}: {shown} is not allowed in an S3 location")
        return cls(bucket, prefix)

    def key(self, relative: str) -> str:
        """The object key of ``relative`` inside this location."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` did."""

    manifest: Manifest
    uploaded: int
    skipped: int
    uploaded_bytes: int


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` did: where the set is, and how much it had to download (0 on a cache hit)."""

    manifest: Manifest
    folder: Path
    downloaded: int
    downloaded_bytes: int
    source: str


class Progress(Protocol):
    """What transfers report to: tqdm's bar fits (``total`` is set once known, ``update`` adds bytes)."""

    total: float | None

    def update(self, n: float = 1) -> bool | None:
        """``n`` more bytes transferred."""


def object_store_client(settings: Any, workers: int = DEFAULT_WORKERS) -> Any:
    """A boto3 client on the object store of ``settings`` (a :class:`~plantml.settings.TrackingSettings`):
    ``MLFLOW_S3_ENDPOINT_URL`` and the ``AWS_*`` keys, from the environment or ``.env``.

    Without keys that boto3 finds in its files or profiles (``~/.aws``; no cloud metadata service is asked) it is a :class:`ConfigError` saying which
    variables are unset, rather than boto3's bare ``NoCredentialsError`` at the first request.
    """
    from plantml.stack.endpoints import make_s3_client
    from plantml.tracking.connection import aws_keys_in_files

    if not (settings.aws_access_key and settings.aws_secret_key) and not aws_keys_in_files():
        unset = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are" if settings.s3_endpoint else \
            "MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are"
        raise ConfigError(f"no object store to use: {unset} unset (environment or .env in {Path.cwd()}); "
                          "`plantml stack up` writes them to .env")
    try:
        return make_s3_client(settings.s3_endpoint, settings.aws_access_key, settings.aws_secret_key,
                              session_token=settings.aws_session_token, max_pool_connections=workers * 2, retries={"max_attempts": 3})
    except ValueError as exc:  # botocore's "Invalid endpoint" for settings made without resolve_tracking_settings
        raise ConfigError(f"S3 endpoint {settings.s3_endpoint!r}: {exc}") from None


def is_s3_uri(text: str | os.PathLike[str] | None) -> bool:
    """True for an ``s3://`` location (a data set in the object store), False for a local path."""
    return isinstance(text, str) and text.startswith("s3://")


def _client_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _failure(exc: BaseException) -> str:
    """A boto3 failure in one line: its code, its text, and what gets past a refused certificate."""
    from plantml.stack.endpoints import s3_tls_hint

    return f"{_error_code(exc)}: {exc}{s3_tls_hint(exc)}"


def _foreign(client: Any, exc: BaseException) -> str | None:
    """:func:`~plantml.stack.endpoints.s3_foreign_answer` for this client's endpoint."""
    from plantml.stack.endpoints import s3_foreign_answer

    return s3_foreign_answer(exc, getattr(getattr(client, "meta", None), "endpoint_url", None))


def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__))


def stored_objects(client: Any, where: S3Location) -> dict[str, tuple[int, str]]:
    """Every object under ``where``: key → (size, ETag without quotes)."""
    found: dict[str, tuple[int, str]] = {}
    for page in list_pages(client, where, f"{where.prefix}/" if where.prefix else ""):
        for item in page.get("Contents", []):
            found[item["Key"]] = (int(item["Size"]), item.get("ETag", "").strip('"'))
    return found


def list_pages(client: Any, where: S3Location, prefix: str, **options: str) -> Iterator[dict[str, Any]]:
    """The pages of ``list_objects_v2`` under ``prefix``; a missing bucket or a failure is one line naming ``where``."""
    try:
        yield from client.get_paginator("list_objects_v2").paginate(Bucket=where.bucket, Prefix=prefix, **options)
    except _client_errors() as exc:
        if _error_code(exc) == "NoSuchBucket":  # a name the user typed, as read_manifest treats it
            raise UsageError(f"{where}: no bucket {where.bucket!r} in the object store") from None
        raise TrackingError(f"{where}: {_foreign(client, exc) or f'cannot list the bucket ({_failure(exc)})'}") from None


def push(client: Any, folder: str | os.PathLike[str], uri: str, *, workers: int = DEFAULT_WORKERS,
         progress: Progress | None = None) -> PushResult:
    """Upload the image set ``folder`` to ``uri`` with its manifest; files already there and unchanged are skipped."""
    where = S3Location.parse(uri)
    root = Path(folder).expanduser()
    _check_key_names(root)
    manifest = build_manifest(root, workers=workers)
    stored = stored_objects(client, where)
    todo = [e for e in manifest.files if not _unchanged(client, where, stored.get(where.key(e.path)), e)]
    if where.key(MANIFEST_NAME) in stored and any(where.key(e.path) in stored for e in todo):
        _withdraw_manifest(client, where)
    if progress is not None:
        progress.total = sum(e.size for e in todo)

    def upload(entry: Any) -> int:
        key = where.key(entry.path)
        try:
            if entry.size <= SINGLE_PART_LIMIT:
                with open(root / file_name(entry.path), "rb") as body:
                    client.put_object(Bucket=where.bucket, Key=key, Body=body,
                                      ContentMD5=_b64(entry.md5), Metadata={SHA256_METADATA: entry.sha256})
            else:  # no Content-MD5 for the whole file here: hash what is sent, as it is read
                with open(root / file_name(entry.path), "rb") as handle:
                    sent = _HashingReader(handle)
                    client.upload_fileobj(sent, where.bucket, key, ExtraArgs={"Metadata": {SHA256_METADATA: entry.sha256}})
                if sent.sha256.hexdigest() != entry.sha256:  # saved again since it was hashed: its metadata would lie
                    client.delete_object(Bucket=where.bucket, Key=key)
                    raise _changed_while_pushed(root / entry.path)
        except FileNotFoundError:
            raise _changed_while_pushed(root / entry.path) from None
        except _client_errors() as exc:
            if entry.size <= SINGLE_PART_LIMIT and _error_code(exc) == "BadDigest":  # not the bytes that were hashed
                raise _changed_while_pushed(root / entry.path) from None
            raise TrackingError(f"{where}: upload of {entry.path} failed ({_failure(exc)})") from None
        if progress is not None:
            progress.update(entry.size)
        return entry.size

    with ThreadPoolExecutor(max_workers=workers) as pool:
        sent = sum(pool.map(upload, todo))
    try:
        client.put_object(Bucket=where.bucket, Key=where.key(MANIFEST_NAME), Body=manifest.to_json().encode(),
                          ContentType="application/json")
    except _client_errors() as exc:
        raise TrackingError(f"{where}: the manifest could not be stored ({_failure(exc)})") from None
    _check_stored_set(client, where, manifest)
    return PushResult(manifest, len(todo), len(manifest.files) - len(todo), sent)


def _changed_while_pushed(image: Path) -> DataError:
    """An image saved again or removed between its hashing and its upload: the store kept none of it (its
    Content-MD5 or its hash as read did not match), so the set must be pushed again."""
    return DataError(f"image {image}: changed or removed while it was pushed; nothing of it was kept, push again")


def _check_stored_set(client: Any, where: S3Location, manifest: Manifest) -> None:
    """Read back what the location holds once the manifest is written: another push to it at the same
    time may have replaced some of the files, or the manifest, with its own. The last push to end then
    sees the final state, and either it matches its manifest or its manifest goes and the push says so.
    A manifest that is not this push's is left to the push that wrote it, which checks its own."""
    ours = manifest.to_json().encode()
    problem = None if _stored_manifest(client, where) == ours else f"{MANIFEST_NAME} is not the one this push wrote"
    stored = stored_objects(client, where)
    for entry in manifest.files if problem is None else ():
        if not _unchanged(client, where, stored.get(where.key(entry.path)), entry):
            problem = f"{entry.path} is not the file this push sent"
            break
    if problem:
        if _stored_manifest(client, where) == ours:  # read again just before: another push's may be there by now
            _withdraw_manifest(client, where, "after a push that did not end with its files in place")
        raise DataError(f"{where}: {problem} (another push to the same location at the same time?); "
                        "this push's set is not there: push again")


def _stored_manifest(client: Any, where: S3Location) -> bytes:
    """The bytes of the manifest at ``where``, or none."""
    try:
        return client.get_object(Bucket=where.bucket, Key=where.key(MANIFEST_NAME))["Body"].read()
    except _client_errors() as exc:
        if _error_code(exc) not in ("NoSuchKey", "404"):
            raise TrackingError(f"{where}: cannot read back {MANIFEST_NAME} ({_failure(exc)})") from None
        return b""


def _withdraw_manifest(client: Any, where: S3Location, when: str = "before its files are replaced") -> None:
    """Delete the manifest of the set stored at ``where`` before its files are replaced: until the new
    manifest is written the location holds no set, rather than one whose files no longer match it
    (listed as fine by ``data ls``, refused as tampered by every training, for good if the push is cut)."""
    try:
        client.delete_object(Bucket=where.bucket, Key=where.key(MANIFEST_NAME))
    except _client_errors() as exc:
        raise TrackingError(f"{where}: the manifest of the set there could not be removed {when} "
                            f"({_failure(exc)})") from None


class _HashingReader:
    """A file read once, front to back, hashing the bytes it hands out (boto3 uploads a stream without seek in order)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        """The next ``size`` bytes, hashed."""
        data = self.handle.read(size)
        self.sha256.update(data)
        return data


def _check_key_names(root: Path) -> None:
    """Refuse, before hashing anything, an image whose path cannot be an S3 key as it is."""
    for relative, path in image_files(root):
        try:
            relative.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"image {safe_text(str(path))}: its name is not valid UTF-8 (shown as %XX), "
                            "which S3 keys must be; rename it") from None
        if "\\" in relative:  # SeaweedFS stores it as '/', so a second push would never find it
            culprit = next(part for part in relative.split("/") if "\\" in part)
            raise DataError(f"image {path}: {culprit!r} holds a backslash, which S3 stores read as '/'; rename it")


def _unchanged(client: Any, where: S3Location, stored: tuple[int, str] | None, entry: FileEntry) -> bool:
    """True when the object stored for ``entry`` has its bytes: the same MD5 ETag, or for a file sent in
    parts (whose ETag is not an MD5) the same size and SHA-256 metadata."""
    if stored is None or stored[0] != entry.size:
        return False
    if entry.size <= SINGLE_PART_LIMIT:
        return stored[1] == entry.md5
    try:
        head = client.head_object(Bucket=where.bucket, Key=where.key(entry.path))
    except _client_errors():
        return False  # unreadable: send it again
    return bool(head.get("Metadata", {}).get(SHA256_METADATA) == entry.sha256)


def _b64(md5_hex: str) -> str:
    import base64

    return base64.b64encode(bytes.fromhex(md5_hex)).decode()


def read_manifest(client: Any, where: S3Location) -> Manifest:
    """The manifest of the set at ``where``, checked; a missing one names the location."""
    name = f"{where}/{MANIFEST_NAME}"
    try:
        body = client.get_object(Bucket=where.bucket, Key=where.key(MANIFEST_NAME))["Body"].read()
    except _client_errors() as exc:
        code = _error_code(exc)
        foreign = _foreign(client, exc)
        if foreign:  # another program's "Not Found" page: not a set missing from a store
            raise TrackingError(f"{where}: {foreign}") from None
        if code == "NoSuchBucket":  # a push there would fail too: say what is missing
            raise DataError(f"{where}: no bucket {where.bucket!r} in the object store, so no data set there") from None
        if code in ("NoSuchKey", "404"):
            raise DataError(f"{where}: no data set there ({name} not found): push one with `plantml data push`, or "
                            f"list the sets under it with `plantml data ls {where}`") from None
        raise TrackingError(f"{where}: cannot read {MANIFEST_NAME} ({code}: {exc})") from None
    return Manifest.from_json(body, name)


def cache_folder(cache_root: Path, digest: str) -> Path:
    """Where a set with this digest lives once pulled."""
    return cache_root / "datasets" / digest


def pull(client: Any, uri: str, cache_root: Path, *, workers: int = DEFAULT_WORKERS,
         progress: Progress | None = None) -> PullResult:
    """Make the set at ``uri`` available locally (see the module docstring); returns where and what it cost."""
    where = S3Location.parse(uri)
    manifest = read_manifest(client, where)
    target = cache_folder(cache_root, manifest.digest)
    if target.is_dir():
        sweep(target.parent)  # what a killed pull of another set left
        return PullResult(manifest, target, 0, 0, str(where))
    if progress is not None:
        progress.total = manifest.total_bytes
    with local_writes(CACHE_FOLDER, cache_root):
        target.parent.mkdir(parents=True, exist_ok=True)
        received = _download_into(client, where, manifest, target, workers, progress)
    return PullResult(manifest, target, len(manifest.files), received, str(where))


def _download_into(client: Any, where: S3Location, manifest: Manifest, target: Path, workers: int,
                   progress: Progress | None) -> int:
    """Download every file of ``manifest`` into a staging folder beside ``target``, check it, rename it to ``target``."""
    with staging_folder(target.parent, target.name[:16]) as staging:

        def download(entry: Any) -> int:
            local = staging / file_name(entry.path)
            local.parent.mkdir(parents=True, exist_ok=True)
            name = f"{where}/{entry.path}"
            try:
                obj = client.get_object(Bucket=where.bucket, Key=where.key(entry.path))
                sha256 = hashlib.sha256()
                with open(local, "wb") as out:
                    for chunk in obj["Body"].iter_chunks(1 << 20):
                        sha256.update(chunk)
                        out.write(chunk)
            except _client_errors() as exc:
                code = _error_code(exc)
                if code in ("NoSuchKey", "404"):
                    raise DataError(f"{name}: missing from the data set (listed in its manifest)") from None
                raise TrackingError(f"{name}: download failed ({code}: {exc})") from None
            if sha256.hexdigest() != entry.sha256:
                raise DataError(f"{name}: content does not match the manifest (corrupt or tampered); nothing was kept")
            if progress is not None:
                progress.update(entry.size)
            return entry.size

        with ThreadPoolExecutor(max_workers=workers) as pool:
            received = sum(pool.map(download, manifest.files))
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # another process that pulled the same digest at once got there first
                raise
    return received
