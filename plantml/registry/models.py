"""What the registry returns: plain frozen records, no MLflow objects leak out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal


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
