"""What a run asks to record, as typed values: the only shapes the write path moves.

An *entry* is one thing the tracker accepted: a metric point, a param, a tag, an
artifact or a model spooled on local disk, a data set the run used, or the run's requested end. A
:class:`Record` is an entry with its place in the run's journal (its sequence number),
which is how the sender, recovery and the journal speak of it. Entries become JSON only
in :mod:`plantml.tracking.journal`; everything else handles these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class MetricPoint:
    """One metric value, with the timestamp (ms since the epoch) and step it was logged at."""

    key: str
    value: float
    timestamp: int
    step: int


@dataclass(frozen=True)
class Param:
    """One param (a run's params never change once set)."""

    key: str
    value: str


@dataclass(frozen=True)
class Tag:
    """One tag (the last value set wins)."""

    key: str
    value: str


@dataclass(frozen=True)
class Artifact:
    """A file or folder copied into the spool, to upload under ``dst`` of the run's artifacts."""

    src: str
    dst: str | None
    is_dir: bool


@dataclass(frozen=True)
class ModelProgress:
    """How far a model's delivery got: each step is done once, and a retry resumes after it.

    ``register_tried`` says a registry version may exist already (the answer to its
    creation was lost), so it is looked for before another is made.
    """

    model_id: str | None = None
    linked: bool = False
    uploaded: bool = False
    version: int | None = None
    register_tried: bool = False


@dataclass(frozen=True)
class Model:
    """An MLflow model folder saved in the spool: logged, stored, then (optionally) registered."""

    src: str
    name: str
    registered_model_name: str | None = None
    progress: ModelProgress = ModelProgress()


@dataclass(frozen=True)
class DatasetInput:
    """A data set the run used, as MLflow records a run's input (``log_inputs``); sending it twice is harmless."""

    name: str
    digest: str
    source_type: str
    source: str
    profile: str | None = None
    context: str = "training"


@dataclass(frozen=True)
class End:
    """The run's requested end: its status and when it was asked for (ms since the epoch)."""

    status: str
    at: int


Entry = Union[MetricPoint, Param, Tag, Artifact, Model, DatasetInput, End]

#: Entries that travel together in one ``log_batch`` request.
LOG_KINDS = (MetricPoint, Param, Tag)


@dataclass(frozen=True)
class Record:
    """An entry and its sequence number in the run's journal (1, 2, 3, ... in logging order)."""

    seq: int
    entry: Entry

    @property
    def is_log(self) -> bool:
        """True for a metric point, a param or a tag (what ``log_batch`` carries)."""
        return isinstance(self.entry, LOG_KINDS)


@dataclass(frozen=True)
class SetAside:
    """A record the server refused for good, and why: kept in the journal, counted on the run."""

    record: Record
    reason: str
