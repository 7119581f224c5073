"""A throwaway MLflow store for the recovery tests: what a process killed mid-run leaves behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def sqlite_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, experiment: str) -> tuple[Any, str, str, str, Path]:
    """A sqlite store in ``tmp_path`` with a run left RUNNING, and an empty journal folder (``PLANTML_JOURNAL_DIR``);
    the client settings of the caller's environment cleared. Returns the client, URI, experiment id, run id, folder."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLANTML_JOURNAL_DIR", str(tmp_path / "journal"))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(experiment)
    run_id = client.create_run(experiment_id).info.run_id
    (tmp_path / "journal").mkdir(mode=0o700)
    return client, uri, experiment_id, run_id, tmp_path / "journal"
