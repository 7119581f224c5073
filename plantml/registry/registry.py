"""The model registry: list, promote, roll back, compare and load registered models.

Everything goes through one ``MlflowClient(tracking_uri=...)`` held by the
:class:`ModelRegistry`, models are downloaded from that registry too (see
:mod:`plantml.registry.loading`); nothing touches MLflow's global tracking URI or run
stack, nothing is written to the working folder. Moving the ``production`` or
``staging`` alias also moves MLflow's stage of the same name (see
:mod:`plantml.registry.stages`), so ``models:/NAME/Production`` and
``models:/NAME@production`` always name the same version.

Each alias's history is a list on the registered model (see
:mod:`plantml.registry.aliases`): a promotion pushes, :meth:`ModelRegistry.rollback`
pops, so successive rollbacks walk back through the promotions. Each move is also
recorded on the model version it lands on, as tags::

    plantml.alias.<alias>.moved_from         version the alias pointed at before ("none" if unset)
    plantml.alias.<alias>.moved_at           when (UTC, ISO 8601)
    plantml.alias.<alias>.rolled_back_from   (a rollback) the version it left, and rolled_back_at

An alias promoted only by plantml versions older than the history is rolled back by its
``moved_from`` tag until its next promotion starts the history.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from plantml.errors import RegistryError, TrackingError, one_line
from plantml.registry import loading
from plantml.registry.aliases import (
    NO_VERSION,
    PRODUCTION,
    alias_tag,
    encode_history,
    history_tag,
    moved_now,
    normalize_alias,
    pushed,
    read_history,
    rollback_target,
)
from plantml.registry.calls import RegistryCalls
from plantml.registry.loading import parse_model_uri
from plantml.registry.models import (
    AliasMove,
    Comparison,
    ModelInfo,
    VersionInfo,
    alias_of,
    aliases_by_version,
    comparison_rows,
    model_info,
    version_info,
)
from plantml.registry.stages import OTHER_STAGES, StageKeeper
from plantml.registry.store import (
    check_s3_access,
    is_insert_clash,
    name_filter,
    read_runs,
)
from plantml.tracking.stores import open_client
from plantml.tracking.validation import check_utf8

if TYPE_CHECKING:
    from mlflow import MlflowClient

T = TypeVar("T")

LATEST = "latest"

_VERSION_REF_RE = re.compile(r"^[vV]?\d+$")


class ModelRegistry:
    """Registered models of one tracking server, through its own ``MlflowClient``."""

    def __init__(self, tracking_uri: str, *, client: MlflowClient | None = None, source: str | None = None) -> None:
        """``tracking_uri`` also serves as the registry URI (MLflow's default).

        ``source`` says where the URI came from (``argument``, ``environment (MLFLOW_TRACKING_URI)``...)
        for error messages. A ``sqlite:///`` file that does not exist is refused, not created.
        """
        self.tracking_uri = tracking_uri
        self.source = source or "argument"
        self.client = client if client is not None else open_client(tracking_uri, source)
        self._calls = RegistryCalls(self.client, tracking_uri, self.source)
        self._stages = StageKeeper(self.client, self._calls.call, self._registered_model, self._search_versions)

    # -- reading ---------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        """Every registered model, sorted by name."""
        models = self._calls.paged(lambda token: self.client.search_registered_models(page_token=token), "registered models")
        return sorted((model_info(rm) for rm in models), key=lambda m: m.name)

    def get_model(self, name: str) -> ModelInfo:
        """One registered model, or :class:`RegistryError` naming it."""
        return model_info(self._registered_model(name))

    def list_versions(self, name: str, *, with_runs: bool = True) -> list[VersionInfo]:
        """Every version of ``name``, oldest first, with its run's metrics and params (``with_runs=False``:
        without them, and without reading the runs, one request each on a server)."""
        registered = self._registered_model(name)
        by_version = aliases_by_version(registered)
        versions = self._search_versions(name)
        runs = self._runs([mv.run_id for mv in versions]) if with_runs else {}
        infos = [version_info(mv, by_version, runs.get(mv.run_id)) for mv in versions]
        return sorted(infos, key=lambda v: v.version)

    def get_version(self, name: str, version: int | str) -> VersionInfo:
        """One version of ``name`` by number, or :class:`RegistryError` naming it."""
        number = _version_number(name, version)
        registered = self._registered_model(name)
        mv = self._calls.call(lambda: self.client.get_model_version(name, str(number)), f"model {name!r} version {number}")
        return self._version_info(mv, aliases_by_version(registered))

    def resolve(self, name: str, reference: int | str = LATEST) -> VersionInfo:
        """The version a reference means: a number (``2`` or ``v2``, as :meth:`promote` takes), ``latest``, an alias or ``@alias``."""
        ref = str(reference).strip()
        if _VERSION_REF_RE.match(ref):  # MLflow reserves v<digits> as alias names, so v2 can only mean version 2
            return self.get_version(name, ref)
        if ref.lower() == LATEST:
            model = self.get_model(name)
            if model.latest_version is None:
                raise RegistryError(f"model {name!r}: has no versions")
            return self.get_version(name, model.latest_version)
        if ref.lower() in OTHER_STAGES:  # models:/NAME/Archived: MLflow's newest version in that stage
            stage = OTHER_STAGES[ref.lower()]
            self._registered_model(name)
            with warnings.catch_warnings():  # stages are deprecated; MLflow still reads these URIs so
                warnings.simplefilter("ignore", FutureWarning)
                found = self._calls.call(lambda: self.client.get_latest_versions(name, stages=[stage]), f"model {name!r}")
            if not found:
                raise RegistryError(f"model {name!r}: no version in stage {stage!r}")
            return self.get_version(name, max(int(mv.version) for mv in found))
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
        previous = alias_of(self._registered_model(name), alias)
        target = self._existing_version(name, version)
        moved_at = moved_now()
        if previous == target:  # a promotion interrupted after the alias moved may have left the stage behind
            self._stages.catch_up(name, alias, target)
            return AliasMove(name, alias, previous, target, moved_at, "unchanged")
        number = str(target)
        self._tag_version(name, number, alias_tag(alias, "moved_from"), str(previous or NO_VERSION))
        self._tag_version(name, number, alias_tag(alias, "moved_at"), moved_at)
        self._move_alias(name, alias, number)
        # Pushed after the move: a move that failed must not leave a history a rollback would follow forwards.
        self._record_promotion(name, alias, previous, target)
        return AliasMove(name, alias, previous, target, moved_at, "promote")

    def rollback(self, name: str, alias: str = PRODUCTION) -> AliasMove:
        """Point ``alias`` back at the version it pointed at before its last promotion.

        Successive rollbacks walk back through the promotions, passing over versions deleted
        since (the move's ``skipped`` names them); past the first recorded one,
        :class:`RegistryError` says there is nothing earlier.
        """
        alias = normalize_alias(alias)
        registered = self._registered_model(name)
        current = alias_of(registered, alias)
        if current is None:
            raise RegistryError(f"model {name!r} alias {alias!r}: not set")
        history = read_history(registered.tags or {}, alias)
        if history is None:
            left, target = None, self._recorded_on_version(name, alias, current)
        else:
            left, target = rollback_target(history, current)
        skipped: list[int] = []  # deleted since they were promoted: passed over, as an operator in an incident wants
        while target is not None and not self._exists(name, target):
            skipped.append(target)
            left, target = rollback_target(left, target) if left is not None else (None, None)
        if target is None:
            gone = f" (deleted since: version {', '.join(map(str, skipped))})" if skipped else ""
            raise RegistryError(f"model {name!r} alias {alias!r}: no earlier version recorded before version {current} "
                                f"to roll back to{gone}")
        number = str(target)
        moved_at = moved_now()
        self._tag_version(name, number, alias_tag(alias, "rolled_back_from"), str(current))
        self._tag_version(name, number, alias_tag(alias, "rolled_back_at"), moved_at)
        if left is not None:  # popped before the move: a move that fails is then simply tried again by the next rollback
            self._set_history(name, alias, left)
        self._move_alias(name, alias, number)
        return AliasMove(name, alias, current, target, moved_at, "rollback", tuple(skipped))

    def _existing_version(self, name: str, version: int | str) -> int:
        """The number of ``name``'s version ``version`` once MLflow confirms it exists (no run read, unlike get_version)."""
        number = _version_number(name, version)
        self._calls.call(lambda: self.client.get_model_version(name, str(number)), f"model {name!r} version {number}")
        return number

    def _exists(self, name: str, version: int) -> bool:
        """Whether ``name``'s version ``version`` still exists (it may have been deleted since it was promoted)."""
        try:
            self._existing_version(name, version)
        except RegistryError:
            return False
        return True

    def _recorded_on_version(self, name: str, alias: str, current: int) -> int | None:
        """Where the alias came from by ``current``'s ``moved_from`` tag (aliases promoted before the history existed)."""
        recorded = self.get_version(name, current).tags.get(alias_tag(alias, "moved_from"), NO_VERSION)
        return int(recorded) if recorded.isdigit() else None

    def _record_promotion(self, name: str, alias: str, previous: int | None, version: int) -> None:
        """Push ``version`` on the alias's history, and the version another promotion moved it to since, if any."""
        registered = self._registered_model(name)  # read again: a promotion at the same time may have pushed meanwhile
        history = read_history(registered.tags or {}, alias)
        if history is None:  # the first promotion by this plantml: start from where the alias was
            history = [previous] if previous is not None else []
        history = pushed(history, version)
        now_at = alias_of(registered, alias)
        if now_at is not None:  # another promotion moved it after this one: it is the newest
            history = pushed(history, now_at)
        self._set_history(name, alias, history)

    def _set_history(self, name: str, alias: str, history: list[int]) -> None:
        self._upsert(lambda: self.client.set_registered_model_tag(name, history_tag(alias), encode_history(history)),
                     f"registered model {name!r}")

    def _upsert(self, action: Callable[[], Any], what: str) -> None:
        """Set a value the server stores as a row it inserts when absent (an alias, a model tag).

        Two promotions at once can both insert it: the store refuses the second with a
        unique-key error. The value then exists, so writing again simply overwrites it.
        """
        try:
            self._calls.call(action, what)
        except TrackingError as exc:
            if not is_insert_clash(exc):
                raise
            self._calls.call(action, what)

    def _tag_version(self, name: str, number: str, key: str, value: str) -> None:
        # Two promotions (or rollbacks) onto one version at once both insert its first tag of that key.
        self._upsert(lambda: self.client.set_model_version_tag(name, number, key, value), f"model {name!r} version {number}")

    def _move_alias(self, name: str, alias: str, number: str) -> None:
        """Point ``alias`` at version ``number``; for production/staging, move MLflow's stage with it."""
        self._upsert(lambda: self.client.set_registered_model_alias(name, alias, number), f"model {name!r} alias {alias!r}")
        self._stages.follow(name, alias, number)

    # -- comparing and loading -------------------------------------------------------

    def compare(self, name: str, first: int | str, second: int | str) -> Comparison:
        """Two versions' params and metrics side by side (versions, ``latest`` or aliases)."""
        a, b = self.resolve(name, first), self.resolve(name, second)
        return Comparison(a, b, comparison_rows(a.params, b.params), comparison_rows(a.metrics, b.metrics))

    def download(self, name: str, reference: int | str, dst_path: str) -> str:
        """Download a version's model folder (MLmodel and data) into ``dst_path``; return its path."""
        version = self.resolve(name, reference)
        what = f"model {name!r} version {version.version}"
        location = self._calls.call(lambda: self.client.get_model_version_download_uri(name, str(version.version)), what)
        check_s3_access(location, what)
        destination = Path(dst_path)
        return str(self._calls.call(lambda: loading.download(location, destination, self.tracking_uri, what,
                                                             "download folder", destination), what))

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
        run = self._calls.run(version.run_id) if version.run_id else None
        root = run.info.artifact_uri if run is not None else None
        return self._calls.call(lambda: loading.load_checkpoint_model(self.tracking_uri, root, what), what)

    def _load(self, name_or_uri: str, reference: int | str | None, load: Callable[[Any], T]) -> T:
        name, ref = self._split(name_or_uri, reference)
        version = self.resolve(name, ref)
        what = f"model {name!r} version {version.version}"

        def download_and_load() -> T:
            with loading.downloaded_version(self.client, self.tracking_uri, name, version.version) as folder:
                try:
                    return load(folder)
                except Exception as exc:  # an unpicklable class, a missing module, a torch version clash
                    raise RegistryError(f"{what}: downloaded but cannot be loaded here ({type(exc).__name__}: {one_line(exc)})") from exc

        return self._calls.call(download_and_load, what)

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    def _split(name_or_uri: str, reference: int | str | None) -> tuple[str, int | str]:
        if name_or_uri.startswith("models:"):
            if reference is not None:
                raise RegistryError(f"model URI {name_or_uri!r}: give a URI or a name and a version, not both")
            return parse_model_uri(name_or_uri)
        return name_or_uri, LATEST if reference is None else reference

    def _search_versions(self, name: str) -> list[Any]:
        """Every version of ``name`` (MLflow's filter may match more names: they are dropped here)."""
        query = name_filter(name)
        found = self._calls.paged(lambda token: self.client.search_model_versions(query, page_token=token), f"versions of {name!r}")
        return [mv for mv in found if mv.name == name]

    def _registered_model(self, name: str) -> Any:
        if not name:
            raise RegistryError("registered model '': a name is required")
        check_utf8(name, "registered model")  # the store cannot encode it: one line, not a codec's error
        return self._calls.call(lambda: self.client.get_registered_model(name), f"registered model {name!r}")

    def _version_info(self, mv: Any, by_version: dict[int, tuple[str, ...]]) -> VersionInfo:
        return version_info(mv, by_version, self._calls.run(mv.run_id) if mv.run_id else None)

    def _runs(self, run_ids: list[str]) -> dict[str, Any]:
        """The runs of ``run_ids`` that still exist, by id (see :func:`~plantml.registry.store.read_runs`)."""
        return read_runs(self.client, run_ids, self._calls.run, self._calls.call, over_http=self.tracking_uri.startswith(("http://", "https://")))


def _version_number(name: str, version: int | str) -> int:
    text = str(version).strip().removeprefix("v").removeprefix("V")
    if not text.isdigit() or int(text) < 1:
        raise RegistryError(f"model {name!r} version {str(version)!r}: a version is a positive whole number")
    return int(text)
