"""Loading registered models from the registry the caller named, leaving no file behind.

MLflow's own ``models:/`` resolution asks the process's *global* registry URI (a
``mlflow.db`` in the working folder when nothing is set), whatever URI the caller gave:
a folder holding another store silently yields that store's model. Here every step goes
through the caller's client instead: the version's storage location comes from
``get_model_version_download_uri``, the files are downloaded from it with the caller's
tracking URI (which ``mlflow-artifacts:`` locations of a proxied server need), loaded,
and the temporary copy is removed before returning.

Two ways in:

- :func:`load_pytorch` / :func:`load_pyfunc`: MLflow's pytorch flavor. plantml saves models
  pickled (a ``torch.nn.Module`` with ``eval()``, ``train()``, any batch and image size), so
  loading one runs the pickle: load only models from a registry you trust.
- :func:`load_checkpoint_model`: no pickle at all. The run of a version trained by
  ``plantml train`` also stores ``models/best_model.pth`` (weights plus backbone name and
  class count); the torchvision backbone is rebuilt and the weights loaded with
  ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from plantml.errors import RegistryError, TrackingError, one_line
from plantml.registry.store import check_s3_access
from plantml.staging import folder_error, scratch_folder
from plantml.text import mask_passwords
from plantml.tracking.connection import serves_no_artifacts
from plantml.tracking.models import quiet_pickle_warning

#: Where ``plantml train`` keeps the best weights in each run's artifacts.
CHECKPOINT_ARTIFACT = "models/best_model.pth"

#: The weights file of MLflow's pytorch flavor: pickled, or exported by ``torch.export`` (MLflow 3's default).
TORCH_MODEL_FILES = ("model.pth", "model.pt2")

#: Failures only a write gets (full, over quota, read-only): the local folder's error, not the store's, wherever
#: they name no file.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
#: A file's section in MLflow's message for a failed download (the message shows nothing past its first line).
_FAILED_FILE = re.compile(r"^##### File (?P<file>.+) #####\n(?P<reason>.*)$", re.M)
_ERRNO = re.compile(r"^\[Errno (\d+)\]")

_MODEL_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")


def parse_model_uri(uri: str) -> tuple[str, str]:
    """Split ``models:/NAME/VERSION``, ``models:/NAME/latest`` or ``models:/NAME@ALIAS``.

    Returns ``(name, reference)`` where the reference is a version number, ``latest``
    or ``@alias``.
    """
    match = _MODEL_URI_RE.match(uri.strip())
    if not match:
        raise RegistryError(f"model URI {uri!r}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
    if match["alias"]:
        return match["name"], "@" + match["alias"]
    return match["name"], match["version"]


def download(location: str, destination: Path, tracking_uri: str, what: str, role: str, folder: Path) -> Path:
    """MLflow's download of ``location`` into ``destination``; its failure in one line.

    MLflow gathers the failures of a download into one message, a section per file, whose first line says only that
    some failed: the first file's reason is named instead. A local folder that refuses the files (``folder``, named
    as ``role``: full, read-only, forbidden) is its one-line error (:func:`~plantml.staging.folder_error`), not the store's; a
    file of a local store that cannot be read (a link to nothing) is the store's, not a "tracking server unreachable".
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(destination),
                                                        tracking_uri=tracking_uri))
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS or _names_a_file_under(exc, destination):
            raise folder_error(role, folder, exc) from None
        if exc.filename is None:  # a connection's (requests', boto3's): the caller names the server
            raise
        raise TrackingError(f"{what}: its files at {mask_passwords(location)} cannot be read ({one_line(exc)})") from None
    except MlflowException as exc:
        failed = _FAILED_FILE.search(str(exc))
        if failed is None:
            raise
        code = _ERRNO.match(failed["reason"])
        number = int(code[1]) if code else None
    if number in _WRITE_ERRNOS:
        raise folder_error(role, folder, OSError(number, os.strerror(number))) from None
    raise TrackingError(f"{what}: {failed['file']} could not be downloaded from {mask_passwords(location)} "
                        f"({failed['reason'][:300]})") from None


def _names_a_file_under(exc: OSError, destination: Path) -> bool:
    """Whether ``exc`` is about ``destination`` or a file under it (where the download writes), not the store's."""
    mine = os.path.abspath(destination)
    return any(name is not None and os.path.commonpath([mine, os.path.abspath(os.fsdecode(name))]) == mine
               for name in (exc.filename, exc.filename2))


@contextlib.contextmanager
def scratch_download(location: str, tracking_uri: str, what: str, name: str) -> Iterator[Path]:
    """:func:`download` into a :func:`~plantml.staging.scratch_folder` named ``name``; the files go with it."""
    with scratch_folder(name) as folder:
        yield download(location, folder, tracking_uri, what, f"{what}: its download to the temporary folder (TMPDIR)",
                       folder.parent)


@contextlib.contextmanager
def downloaded_version(client: Any, tracking_uri: str, name: str, version: int) -> Iterator[Path]:
    """The folder of version ``version`` of ``name``, downloaded from the client's registry; removed after."""
    location = client.get_model_version_download_uri(name, str(version))
    what = f"model {name!r} version {version}"
    check_s3_access(location, what)
    if location.startswith("mlflow-artifacts:") and serves_no_artifacts(tracking_uri):
        raise RegistryError(f"{what}: its files are kept through the tracking server ({location}), and "
                            f"{mask_passwords(tracking_uri)} serves no artifacts (started with --no-serve-artifacts: a plantml "
                            "stack started --artifacts direct on a data folder first started proxied); start it with "
                            "--artifacts proxied to load it")
    with scratch_download(location, tracking_uri, what, "plantml-model") as downloaded:
        check_model_files(downloaded, location, what)
        yield downloaded


def check_model_files(folder: Path, location: str, what: str) -> None:
    """A one-line :class:`RegistryError` when a downloaded model lacks its ``MLmodel`` or its PyTorch weights.

    The store lists only what it holds, so files deleted from it are simply not downloaded:
    MLflow would then fail on the missing ``MLmodel``, or, without the pickled weights, try
    the exported format instead and print torch's traceback for a file that never existed.
    """
    from mlflow.models import Model

    if not (folder / "MLmodel").is_file():
        raise RegistryError(f"{what}: no MLmodel at {location}: its files are missing from the artifact store")
    try:
        flavor = Model.load(str(folder / "MLmodel")).flavors.get("pytorch")
    except Exception:  # noqa: BLE001 - an unreadable MLmodel: the loader says what is wrong with it
        return
    if flavor is None:
        return
    data = folder / str(flavor.get("model_data", "data"))
    if not any((data / weights).is_file() for weights in TORCH_MODEL_FILES):
        raise RegistryError(f"{what}: no {' or '.join(TORCH_MODEL_FILES)} under {location}/{data.name}: "
                            "its weights are missing from the artifact store")


def load_pytorch(folder: Path) -> Any:
    """The ``torch.nn.Module`` saved in an MLflow model folder (pickle: trusted registries only).

    On a machine without CUDA, a model pickled with its weights on a GPU (logged by an older
    plantml, or by MLflow itself) loads on the CPU, where torch alone would refuse it.
    """
    import mlflow.pytorch
    import torch

    options = {} if torch.cuda.is_available() else {"map_location": "cpu"}
    with quiet_pickle_warning():
        return mlflow.pytorch.load_model(str(folder), **options)


def load_pyfunc(folder: Path) -> Any:
    """The MLflow pyfunc saved in a model folder (a signature-checked ``predict``)."""
    import mlflow.pyfunc

    with quiet_pickle_warning():
        return mlflow.pyfunc.load_model(str(folder))


def load_checkpoint_model(tracking_uri: str, artifact_root: str | None, what: str) -> Any:
    """Rebuild a ``plantml train`` model from the checkpoint under its run's ``artifact_root``, without unpickling anything.

    ``what`` names the version in errors (``model 'x' version 2``). Only a checkpoint the
    store does not list is "missing": a store that fails is the caller's error to report.
    """
    import mlflow.artifacts
    import torch

    from plantml.training.models import WeightsChoice, build_model

    if not artifact_root:
        raise RegistryError(f"{what}: has no run, so no {CHECKPOINT_ARTIFACT} to rebuild it from")
    check_s3_access(artifact_root, what)
    folder, _, file_name = f"{artifact_root.rstrip('/')}/{CHECKPOINT_ARTIFACT}".rpartition("/")
    stored = mlflow.artifacts.list_artifacts(artifact_uri=folder, tracking_uri=tracking_uri)
    if not any(info.path.rpartition("/")[2] == file_name for info in stored):
        raise RegistryError(f"{what}: its run's artifacts ({artifact_root}) hold no {CHECKPOINT_ARTIFACT} (only `plantml train` "
                            "stores one; load such a model with load_model)")
    with scratch_download(f"{folder}/{file_name}", tracking_uri, what, "plantml-checkpoint") as path:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated or altered in the store: torch's zip reader, its weights-only unpickler
            raise RegistryError(f"{what}: {CHECKPOINT_ARTIFACT} in its run's artifacts cannot be read, damaged or not a "
                                f"checkpoint ({type(exc).__name__}: {one_line(exc).split('. ')[0]})") from None
    try:
        model = build_model(checkpoint["backbone"], int(checkpoint["num_classes"]), WeightsChoice("none"))
        model.load_state_dict(checkpoint["model_state_dict"])
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError) as exc:
        raise RegistryError(f"{what}: {CHECKPOINT_ARTIFACT} is not a plantml checkpoint ({type(exc).__name__}: {one_line(exc)})") from None
    return model.eval()
