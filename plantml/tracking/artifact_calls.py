"""The tracker's artifact calls: each file is copied (or written) into the run's spool first, so the caller
may delete its own at once, then journalled for the run's sender like every other entry."""

from __future__ import annotations

import os
from typing import Any

from plantml.errors import ValidationError
from plantml.text import safe_data
from plantml.tracking import validation as check
from plantml.tracking.active_run import ActiveRun
from plantml.tracking.entries import Artifact, Entry
from plantml.tracking.spool import dict_text, figure_writer


class ArtifactCalls:
    """``log_artifact``, ``log_artifacts``, ``log_figure``, ``log_dict``, ``log_text`` of :class:`MLflowTracker
    <plantml.tracking.MLflowTracker>`, over its active run."""

    def _require_run(self) -> ActiveRun:
        raise NotImplementedError

    def _write(self, entries: list[Entry]) -> None:
        raise NotImplementedError

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload one existing file to the run's artifacts, under ``artifact_path`` if given."""
        active = self._require_run()
        local = check.existing_file(path)
        dst = check.check_artifact_subpath(artifact_path)
        self._write([Artifact(str(active.spool.copy_file(local)), dst, is_dir=False)])

    def log_artifacts(self, dir: str | os.PathLike[str], artifact_path: str | None = None) -> None:  # noqa: A002 - the design's name
        """Upload an existing folder's files to the run's artifacts, under ``artifact_path`` if given."""
        active = self._require_run()
        local = check.existing_dir(dir)
        dst = check.check_artifact_subpath(artifact_path)
        self._write([Artifact(str(active.spool.copy_tree(local)), dst, is_dir=True)])

    def log_figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib (or plotly) figure as the artifact ``name`` (e.g. ``confusion_matrix.png``)."""
        check.check_artifact_name(name, "figure")
        if not hasattr(fig, "savefig") and not hasattr(fig, "write_image"):
            raise ValidationError(f"figure {name!r}: expected a matplotlib or plotly figure, got {type(fig).__name__}")
        self._log_file(name, figure_writer(fig, name), "figure")

    def log_dict(self, d: Any, name: str) -> None:
        """Save a JSON-serialisable dict as the artifact ``name`` (JSON, or YAML for ``.yaml``)."""
        check.check_artifact_name(name, "dict")
        check.check_json_serialisable(d, name)
        text = dict_text(safe_data(d), name)
        self._log_file(name, lambda path: path.write_text(text, encoding="utf-8"), "dict")

    def log_text(self, text: str, name: str) -> None:
        """Save a string as the artifact ``name`` (e.g. ``model_summary.txt``)."""
        check.check_artifact_name(name, "text")
        if not isinstance(text, str):
            raise ValidationError(f"text {name!r}: expected a str, got {type(text).__name__}")
        self._log_file(name, lambda path: path.write_text(text, encoding="utf-8", errors="surrogateescape"), "text")

    def _log_file(self, name: str, writer: Any, kind: str) -> None:
        """Write artifact ``name`` (``a/b.png``) into the spool with ``writer``, then journal it for folder ``a``."""
        active = self._require_run()
        folder, _, base = check.check_artifact_subpath(name.replace("\\", "/")).rpartition("/")  # type: ignore[union-attr]
        spooled = active.spool.write(base, writer, kind)
        self._write([Artifact(str(spooled), folder or None, is_dir=False)])
