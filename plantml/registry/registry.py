"""The model registry: list, promote, roll back, compare and load registered models.

Everything goes through one ``MlflowClient(tracking_uri=...)`` held by the
:class:`ModelRegistry`, models are downloaded from that registry too (see
:mod:`plantml.registry.loading`); nothing touches MLflow's global tracking URI or run
stack, nothing is written to the working folder. Moving the ``production`` or
``staging`` alias also moves MLflow's stage of the same name (older holders of that
stage are archived), so ``models:/NAME/Production`` and ``models:/NAME@production``
always name the same version.
Each alias move is recorded on the model version it lands on, as tags::

    plantml.alias.<alias>.moved_from    version the alias pointed at before ("none" if unset)
    plantml.alias.<alias>.moved_at      when (UTC, ISO 8601)

so :meth:`ModelRegistry.rollback` can walk the alias back one promotion at a time.
A rollback is recorded on the version it returns to as ``rolled_back_from`` and
``rolled_back_at``; it leaves ``moved_from`` alone, so a second rollback keeps going
back instead of flipping between two versions.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from plantml.errors import RegistryError, TrackingError
from plantml.registry import loading
from plantml.registry.aliases import ALIAS_STAGES, PRODUCTION, normalize_alias
from plantml.registry.models import AliasMove, Comparison, ComparisonRow, ModelInfo, VersionInfo
from plantml.tracking.environ import forget_stale_s3_clients

if TYPE_CHECKING:
    from mlflow import MlflowClient

T = TypeVar("T")

TAG_PREFIX = "plantml.alias"
NO_VERSION = "none"
LATEST = "latest"

_MODEL_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")


def alias_tag(alias: str, what: str) -> str:
    """The model-version tag key recording ``what`` (``moved_from``...) for ``alias``."""
    return f"{TAG_PREFIX}.{alias}.{what}"


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _timestamp(millis: int | None) -> str:
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc).isoformat(timespec="seconds")


class ModelRegistry:
    """Registered models of one tracking server, through its own ``MlflowClient``."""

    def __init__(self, tracking_uri: str, *, client: MlflowClient | None = None) -> None:
        """``tracking_uri`` also serves as the registry URI (MLflow's default)."""
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.client = client

    # -- reading ---------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        """Every registered model, sorted by name."""
        models = self._paged(lambda token: self.client.search_registered_models(page_token=token), "registered models")
        return sorted((self._model_info(rm) for rm in models), key=lambda m: m.name)

    def get_model(self, name: str) -> ModelInfo:
        """One registered model, or :class:`RegistryError` naming it."""
        return self._model_info(self._registered_model(name))

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, oldest first, with its run's metrics and params."""
        registered = self._registered_model(name)
        by_version = _aliases_by_version(registered)
        query = f"name='{_quote(name)}'"
        versions = self._paged(lambda token: self.client.search_model_versions(query, page_token=token), f"versions of {name!r}")
        infos = [self._version_info(mv, by_version) for mv in versions]
        return sorted(infos, key=lambda v: v.version)

    def get_version(self, name: str, version: int | str) -> VersionInfo:
        """One version of ``name`` by number, or :class:`RegistryError` naming it."""
        number = _version_number(name, version)
        registered = self._registered_model(name)
        mv = self._call(lambda: self.client.get_model_version(name, str(number)), f"model {name!r} version {number}")
        return self._version_info(mv, _aliases_by_version(registered))

    def resolve(self, name: str, reference: int | str = LATEST) -> VersionInfo:
        """The version a reference means: a number, ``latest``, an alias or ``@alias``."""
        ref = str(reference).strip()
        if ref.isdigit():
            return self.get_version(name, ref)
        if ref.lower() == LATEST:
            model = self.get_model(name)
            if model.latest_version is None:
                raise RegistryError(f"model {name!r}: has no versions")
            return self.get_version(name, model.latest_version)
        return self.get_version(name, self.alias_version(name, ref.removeprefix("@")))

    def alias_version(self, name: str, alias: str) -> int:
        """The version ``alias`` points at, or :class:`RegistryError` naming the alias."""
        alias = normalize_alias(alias)
        model = self.get_model(name)
        if alias not in model.aliases:
            raise RegistryError(f"model {name!r} alias {alias!r}: not set")
        return model.aliases[alias]

    # -- moving aliases --------------------------------------------------------------

    def promote(self, name: str, version: int | str, alias: str = PRODUCTION) -> AliasMove:
        """Point ``alias`` (default ``production``) at ``version``, recording the move.

        Promoting the version the alias already points at changes nothing.
        """
        alias = normalize_alias(alias)
        target = self.get_version(name, version)
        previous = self.get_model(name).aliases.get(alias)
        moved_at = _now()
        if previous == target.version:
            return AliasMove(name, alias, previous, target.version, moved_at, "unchanged")
        number = str(target.version)
        # Record first, then move: a move that fails half-way leaves a harmless tag,
        # never an alias whose history is missing.
        self._call(lambda: self.client.set_model_version_tag(name, number, alias_tag(alias, "moved_from"), str(previous or NO_VERSION)), f"model {name!r} version {number}")
        self._call(lambda: self.client.set_model_version_tag(name, number, alias_tag(alias, "moved_at"), moved_at), f"model {name!r} version {number}")
        self._move_alias(name, alias, number)
        return AliasMove(name, alias, previous, target.version, moved_at, "promote")

    def rollback(self, name: str, alias: str = PRODUCTION) -> AliasMove:
        """Point ``alias`` back at the version it pointed at before its last promotion."""
        alias = normalize_alias(alias)
        current = self.get_version(name, self.alias_version(name, alias))
        recorded = current.tags.get(alias_tag(alias, "moved_from"), NO_VERSION)
        if not recorded.isdigit():
            raise RegistryError(f"model {name!r} alias {alias!r}: no earlier version recorded on version {current.version} to roll back to")
        try:
            target = self.get_version(name, recorded)
        except RegistryError as exc:
            raise RegistryError(f"model {name!r} alias {alias!r}: cannot roll back to version {recorded}, it no longer exists") from exc
        number = str(target.version)
        moved_at = _now()
        self._call(lambda: self.client.set_model_version_tag(name, number, alias_tag(alias, "rolled_back_from"), str(current.version)), f"model {name!r} version {number}")
        self._call(lambda: self.client.set_model_version_tag(name, number, alias_tag(alias, "rolled_back_at"), moved_at), f"model {name!r} version {number}")
        self._move_alias(name, alias, number)
        return AliasMove(name, alias, current.version, target.version, moved_at, "rollback")

    def _move_alias(self, name: str, alias: str, number: str) -> None:
        """Point ``alias`` at version ``number``; for production/staging, move MLflow's stage with it."""
        self._call(lambda: self.client.set_registered_model_alias(name, alias, number), f"model {name!r} alias {alias!r}")
        stage = ALIAS_STAGES.get(alias)
        if stage is None:
            return
        with warnings.catch_warnings():  # stages are deprecated; plantml keeps them only for the design's URIs
            warnings.simplefilter("ignore", FutureWarning)
            self._call(lambda: self.client.transition_model_version_stage(name, number, stage, archive_existing_versions=True),
                       f"model {name!r} version {number} stage {stage}")

    # -- comparing and loading -------------------------------------------------------

    def compare(self, name: str, first: int | str, second: int | str) -> Comparison:
        """Two versions' params and metrics side by side (versions, ``latest`` or aliases)."""
        a, b = self.resolve(name, first), self.resolve(name, second)
        return Comparison(a, b, _rows(a.params, b.params), _rows(a.metrics, b.metrics))

    def download(self, name: str, reference: int | str, dst_path: str) -> str:
        """Download a version's model folder (MLmodel and data) into ``dst_path``; return its path."""
        import mlflow.artifacts

        version = self.resolve(name, reference)
        what = f"model {name!r} version {version.version}"
        location = self._call(lambda: self.client.get_model_version_download_uri(name, str(version.version)), what)
        return self._call(lambda: mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=dst_path,
                                                                      tracking_uri=self.tracking_uri), what)

    def load_model(self, name_or_uri: str, reference: int | str | None = None) -> Any:
        """Load a registered PyTorch model as a ``torch.nn.Module``, from this registry only.

        Accepts ``("name", 1)``, ``("name", "production")``, ``("name", "latest")`` or a
        URI: ``models:/name/1``, ``models:/name/latest``, ``models:/name/Production``,
        ``models:/name@production``. The model is unpickled: load only from a registry
        you trust, or use :meth:`load_checkpoint` (no pickle) for ``plantml train`` models.
        """
        return self._load(name_or_uri, reference, loading.load_pytorch)

    def load_pyfunc(self, name_or_uri: str, reference: int | str | None = None) -> Any:
        """Load a registered model as an MLflow pyfunc (signature-checked ``predict``)."""
        return self._load(name_or_uri, reference, loading.load_pyfunc)

    def load_checkpoint(self, name_or_uri: str, reference: int | str | None = None) -> Any:
        """A ``plantml train`` model rebuilt from its run's weights, with no pickle executed.

        The torchvision backbone named in the run's ``models/best_model.pth`` is built
        afresh and the weights are read with ``torch.load(..., weights_only=True)``; the
        module is returned in ``eval()`` mode.
        """
        name, ref = self._split(name_or_uri, reference)
        version = self.resolve(name, ref)
        what = f"model {name!r} version {version.version}"
        return self._call(lambda: loading.load_checkpoint_model(self.tracking_uri, version.run_id, what), what)

    def _load(self, name_or_uri: str, reference: int | str | None, load: Callable[[Any], T]) -> T:
        name, ref = self._split(name_or_uri, reference)
        version = self.resolve(name, ref)
        what = f"model {name!r} version {version.version}"

        def download_and_load() -> T:
            with loading.downloaded_version(self.client, self.tracking_uri, name, version.version) as folder:
                try:
                    return load(folder)
                except Exception as exc:  # an unpicklable class, a missing module, a torch version clash
                    raise RegistryError(f"{what}: downloaded but cannot be loaded here ({type(exc).__name__}: {_first_line(exc)})") from exc

        return self._call(download_and_load, what)

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    def _split(name_or_uri: str, reference: int | str | None) -> tuple[str, int | str]:
        if name_or_uri.startswith("models:"):
            if reference is not None:
                raise RegistryError(f"model URI {name_or_uri!r}: give a URI or a name and a version, not both")
            return parse_model_uri(name_or_uri)
        return name_or_uri, LATEST if reference is None else reference

    def _registered_model(self, name: str) -> Any:
        if not name:
            raise RegistryError("registered model '': a name is required")
        return self._call(lambda: self.client.get_registered_model(name), f"registered model {name!r}")

    def _model_info(self, registered: Any) -> ModelInfo:
        numbers = [int(mv.version) for mv in (registered.latest_versions or [])]
        aliases = {alias: int(version) for alias, version in (registered.aliases or {}).items()}
        return ModelInfo(
            name=registered.name,
            latest_version=max(numbers) if numbers else None,
            aliases=dict(sorted(aliases.items())),
            description=registered.description or "",
        )

    def _version_info(self, mv: Any, aliases_by_version: dict[int, tuple[str, ...]]) -> VersionInfo:
        metrics: dict[str, float] = {}
        params: dict[str, str] = {}
        if mv.run_id:
            run = self._run(mv.run_id)
            if run is not None:
                metrics, params = dict(run.data.metrics), dict(run.data.params)
        number = int(mv.version)
        return VersionInfo(
            name=mv.name,
            version=number,
            run_id=mv.run_id or None,
            status=str(mv.status or ""),
            created_at=_timestamp(mv.creation_timestamp),
            stage=str(getattr(mv, "current_stage", None) or "None"),
            aliases=aliases_by_version.get(number, ()),
            metrics=dict(sorted(metrics.items())),
            params=dict(sorted(params.items())),
            tags=dict(mv.tags or {}),
        )

    def _run(self, run_id: str) -> Any | None:
        """The run, or None when it was deleted (a version outlives its run)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise TrackingError(f"run {run_id}: {_first_line(exc)}") from exc

    def _paged(self, fetch: Callable[[str | None], Any], what: str) -> Iterator[Any]:
        token: str | None = None
        while True:
            page = self._call(lambda: fetch(token), what)  # noqa: B023 - called at once
            yield from page
            token = getattr(page, "token", None)
            if not token:
                return

    def _call(self, action: Callable[[], T], what: str) -> T:
        """Run one MLflow call; "not found" becomes a :class:`RegistryError` naming ``what``."""
        from mlflow.exceptions import MlflowException

        forget_stale_s3_clients()  # the S3 settings may have changed since the last call (another stack's keys)
        try:
            return action()
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
                raise RegistryError(f"{what}: not found") from exc
            if exc.error_code == "INVALID_PARAMETER_VALUE":  # the caller's name or version is malformed
                raise RegistryError(f"{what}: {_first_line(exc).removeprefix('INVALID_PARAMETER_VALUE: ')}") from exc
            raise TrackingError(f"{what}: {_first_line(exc)}") from exc
        except OSError as exc:  # connection refused, DNS, timeouts (requests' errors are OSErrors)
            raise TrackingError(f"{what}: tracking server {self.tracking_uri} unreachable ({_first_line(exc)})") from exc


def _aliases_by_version(registered: Any) -> dict[int, tuple[str, ...]]:
    by_version: dict[int, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        by_version.setdefault(int(version), []).append(alias)
    return {version: tuple(sorted(names)) for version, names in by_version.items()}


def _version_number(name: str, version: int | str) -> int:
    text = str(version).strip().removeprefix("v").removeprefix("V")
    if not text.isdigit() or int(text) < 1:
        raise RegistryError(f"model {name!r} version {str(version)!r}: a version is a positive whole number")
    return int(text)


def _rows(first: dict[str, Any] | Any, second: dict[str, Any] | Any) -> tuple[ComparisonRow, ...]:
    keys = sorted(set(first) | set(second))
    return tuple(ComparisonRow(key, first.get(key), second.get(key)) for key in keys)


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
