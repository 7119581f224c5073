"""A model's way to the server: saved into the spool, then logged model, files and (only then) a registry version.

Each step is done once: :class:`~plantml.tracking.entries.ModelProgress` says which are
done, and every step that succeeds is reported through ``on_progress`` (the sender
journals it), so a retry, a recovery or a replay resumes after the last step done. No
registry version ever points at files that are not stored yet.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plantml.tracking.entries import Model, ModelProgress
from plantml.tracking.environ import scoped_environ, scoped_tracking_uri

if TYPE_CHECKING:
    from plantml.tracking.transport import Transport

#: Seconds a new registry version may stay PENDING_REGISTRATION (MLflow's own default wait).
AWAIT_VERSION_S = 300.0

#: MLflow client settings for the model and artifact steps: fail fast, print nothing.
MODEL_STEPS_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class _PickleChoiceFilter(logging.Filter):
    """Drops MLflow's warning that a PyTorch model is pickled: plantml chose it (docs/registry.md says why, once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


@contextlib.contextmanager
def quiet_pickle_warning() -> Iterator[None]:
    """Hide MLflow's per-call warning about pickled PyTorch models, and only that one, while saving or loading."""
    flavor_log, dropped = logging.getLogger("mlflow.pytorch"), _PickleChoiceFilter()
    flavor_log.addFilter(dropped)
    try:
        yield
    finally:
        flavor_log.removeFilter(dropped)


def save_model(folder: Path, model: Any, run_id: str, serialization_format: str, pip_requirements: list[str] | None = None,
               **options: Any) -> None:
    """Save ``model`` with MLflow's pytorch flavor into ``folder`` (in the run's spool).

    Pip requirements default to the running torch/torchvision versions: inferring them
    costs seconds.
    """
    import mlflow.pytorch
    from mlflow.models import Model as MlflowModel

    with quiet_pickle_warning():
        mlflow.pytorch.save_model(on_cpu(model), str(folder), mlflow_model=MlflowModel(run_id=run_id),
                                  pip_requirements=pip_requirements or torch_requirements(),
                                  serialization_format=serialization_format, **options)


def on_cpu(model: Any) -> Any:
    """``model``, or a copy of it on the CPU when some of its weights are on a GPU.

    torch pickles each tensor with its device, and refuses to load a CUDA one where there is
    no CUDA: a model trained on a GPU must load on a CPU-only machine (``mlflow models serve``
    and ``mlflow.pytorch.load_model`` pass no ``map_location``). The caller's model stays where it is.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        return model
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if all(tensor.device.type == "cpu" for tensor in tensors):
        return model
    # each tensor copied straight to the CPU: a deepcopy on the GPU first would need the model's size free there
    memo: dict[int, Any] = {id(t): t.detach().to("cpu", copy=True) for t in tensors}
    for parameter in model.parameters():
        memo[id(parameter)] = torch.nn.Parameter(memo[id(parameter)], requires_grad=parameter.requires_grad)
    return copy.deepcopy(model, memo)


def torch_requirements() -> list[str]:
    """``torch==X`` and ``torchvision==Y`` of this environment (without local version suffixes)."""
    import torch

    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        import torchvision
    except ImportError:
        return requirements
    return [*requirements, f"torchvision=={torchvision.__version__.split('+')[0]}"]


def deliver_model(transport: Transport, run_id: str, model: Model, progress: ModelProgress, maybe_sent: bool,
                  on_progress: Callable[[ModelProgress], None]) -> Any:
    """Create the logged model, store its files, register it; return MLflow's ``ModelInfo``."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client = transport.client

    def done(**step: Any) -> ModelProgress:
        nonlocal progress
        progress = replace(progress, **step)
        on_progress(progress)
        return progress

    with scoped_environ(transport.client_env()):
        if not progress.model_id and maybe_sent:  # the last try may have created it: resume that one
            found = _pending_logged_model(client, transport.experiment_id, run_id, model.name)
            if found is not None:
                done(model_id=found)
        if not progress.model_id:
            logged = client.create_logged_model(transport.experiment_id, name=model.name, source_run_id=run_id)
            _stamp_mlmodel(Path(model.src), logged.model_id, logged.artifact_location, run_id)
            done(model_id=logged.model_id)
        model_id = progress.model_id
        if not progress.linked:
            client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
            done(linked=True)
        if not progress.uploaded:
            if _stamped_id(Path(model.src)) != model_id:  # resumed on a logged model made by an earlier try
                logged = client.get_logged_model(model_id)
                _stamp_mlmodel(Path(model.src), model_id, logged.artifact_location, run_id)
            client.log_model_artifacts(model_id, model.src)
            client.finalize_logged_model(model_id, LoggedModelStatus.READY)
            done(uploaded=True)
        name = model.registered_model_name
        if name and progress.version is None:
            tried = progress.register_tried or maybe_sent
            done(register_tried=True)
            # a database store's registry looks the logged model up in the global tracking URI's store: this one's here
            in_store = contextlib.nullcontext() if transport.is_http else scoped_tracking_uri(transport.settings.tracking_uri)
            with in_store:
                done(version=_register(client, name, model_id, run_id, tried))
        logged = client.get_logged_model(model_id)
    return _model_info(Path(model.src), logged, progress.version)


def _pending_logged_model(client: Any, experiment_id: str, run_id: str, name: str) -> str | None:
    """The id of a logged model an earlier try made for this run and name and never finished."""
    try:
        found = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
    except Exception:  # an older server without the search: start afresh
        return None
    pending = [m for m in found if str(getattr(m, "status", "")).endswith("PENDING")]
    return pending[-1].model_id if pending else None


def _register(client: Any, name: str, model_id: str, run_id: str, tried_before: bool) -> int:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    if tried_before:  # the last try may have created it before its answer was lost
        for version in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            if version.source == f"models:/{model_id}" or getattr(version, "model_id", None) == model_id:
                return int(version.version)
    # MLflow's own wait logs an INFO line ("Waiting up to 300 seconds…") into every training's output: wait here
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                          await_creation_for=0)
    deadline = time.monotonic() + AWAIT_VERSION_S
    while version.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(1.0)
        version = client.get_model_version(name, version.version)
    if version.status != "READY":
        raise MlflowException(f"version {version.version} of {name} is {version.status}, not READY "
                              f"({version.status_message or 'no message'})")
    return int(version.version)


def _stamped_id(folder: Path) -> str | None:
    from mlflow.models import Model as MlflowModel

    try:
        return MlflowModel.load(str(folder / "MLmodel")).model_id
    except Exception:
        return None


def _stamp_mlmodel(folder: Path, model_id: str, artifact_location: str, run_id: str) -> None:
    """Write the logged model's id and location into the spooled MLmodel file, as MLflow's log_model does."""
    from mlflow.models import Model as MlflowModel

    mlmodel = folder / "MLmodel"
    model = MlflowModel.load(str(mlmodel))
    model.model_id = model_id
    model.model_uuid = model_id
    model.artifact_path = artifact_location
    model.run_id = run_id
    model.save(str(mlmodel))


def _model_info(folder: Path, logged: Any, version: int | None) -> Any:
    from mlflow.models import Model as MlflowModel

    info = MlflowModel.load(str(folder / "MLmodel")).get_model_info(logged)
    if version is not None:
        info.registered_model_version = version
    return info
