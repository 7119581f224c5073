"""What the registry returns: plain frozen records, no MLflow objects leak out.

The functions at the end build these records from MLflow's objects, and read aliases off them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version, with the run that produced it."""

    name: str
    version: int
    run_id: str | None
    status: str
    created_at: str
    #: MLflow's registry stage (``None``, ``Staging``, ``Production``, ``Archived``), kept in step with the
    #: ``staging``/``production`` aliases.
    stage: str = "None"
    aliases: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        """The ``models:/NAME/VERSION`` URI that loads exactly this version."""
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class ModelInfo:
    """One registered model: its newest version and where each alias points."""

    name: str
    latest_version: int | None
    aliases: Mapping[str, int] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class AliasMove:
    """An alias moved by :meth:`ModelRegistry.promote` or :meth:`ModelRegistry.rollback`."""

    name: str
    alias: str
    from_version: int | None
    to_version: int
    moved_at: str
    kind: Literal["promote", "rollback", "unchanged"]
    #: Versions a rollback passed over, newest first: deleted since they were promoted.
    skipped: tuple[int, ...] = ()


@dataclass(frozen=True)
class ComparisonRow:
    """One key (a param or a metric) of two versions side by side."""

    key: str
    first: str | float | None
    second: str | float | None

    @property
    def differs(self) -> bool:
        """True when the two versions disagree on this key (a missing value counts)."""
        return self.first != self.second


@dataclass(frozen=True)
class Comparison:
    """Two versions' params and metrics side by side, keys sorted."""

    first: VersionInfo
    second: VersionInfo
    params: tuple[ComparisonRow, ...]
    metrics: tuple[ComparisonRow, ...]


def model_info(registered: Any) -> ModelInfo:
    """A :class:`ModelInfo` from MLflow's ``RegisteredModel``."""
    numbers = [int(mv.version) for mv in (registered.latest_versions or [])]
    aliases = {alias: int(version) for alias, version in (registered.aliases or {}).items()}
    return ModelInfo(
        name=registered.name,
        latest_version=max(numbers) if numbers else None,
        aliases=dict(sorted(aliases.items())),
        description=registered.description or "",
    )


def version_info(mv: Any, aliases_by_version: Mapping[int, tuple[str, ...]], run: Any | None) -> VersionInfo:
    """A :class:`VersionInfo` from MLflow's ``ModelVersion`` and its run (None: no run, or deleted)."""
    metrics = dict(run.data.metrics) if run is not None else {}
    params = dict(run.data.params) if run is not None else {}
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


def comparison_rows(first: Mapping[str, Any], second: Mapping[str, Any]) -> tuple[ComparisonRow, ...]:
    """One row per key of either mapping, keys sorted; a key one side lacks is None there."""
    keys = sorted(set(first) | set(second))
    return tuple(ComparisonRow(key, first.get(key), second.get(key)) for key in keys)


def alias_of(registered: Any, alias: str) -> int | None:
    """The version ``alias`` points at on MLflow's ``RegisteredModel``, or None."""
    version = (registered.aliases or {}).get(alias)
    return None if version is None else int(version)


def aliases_by_version(registered: Any) -> dict[int, tuple[str, ...]]:
    """Each version of MLflow's ``RegisteredModel`` that holds aliases, with their names sorted."""
    by_version: dict[int, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        by_version.setdefault(int(version), []).append(alias)
    return {version: tuple(sorted(names)) for version, names in by_version.items()}


def _timestamp(millis: int | None) -> str:
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc).isoformat(timespec="seconds")
