"""``plantml ui`` and the links plantml prints: the model-training view, no store created by mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from plantml.errors import UsageError
from plantml.ui import LocalUI, how_to_see, run_url


def test_run_links_open_the_model_training_view() -> None:
    assert run_url("http://127.0.0.1:5001/", "3", "abc") == (
        "http://127.0.0.1:5001/#/experiments/3/runs/abc?workflowType=machine_learning")


def test_train_points_at_the_run_on_a_server_and_at_plantml_ui_on_a_local_store() -> None:
    assert how_to_see("http://h:1", "2", "r", default_uri=False) == (
        "see the run: http://h:1/#/experiments/2/runs/r?workflowType=machine_learning")
    assert "`plantml ui`" in how_to_see("sqlite:///mlflow.db", "1", "r", default_uri=True)
    assert "`plantml ui --tracking-uri sqlite:////x/m.db`" in how_to_see("sqlite:////x/m.db", "1", "r", default_uri=False)


def test_a_missing_local_store_is_refused_without_creating_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from plantml.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["ui"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plantml: error: tracking URI 'sqlite:///mlflow.db' (the default): no MLflow store at") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_server_uri_is_not_served_again() -> None:
    with pytest.raises(UsageError, match="is a tracking server"):
        LocalUI("http://127.0.0.1:5001")


@pytest.mark.parametrize("store", ["tilde", "empty file"])
def test_a_store_ui_would_create_or_fill_is_refused_and_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str], store: str) -> None:
    from plantml.cli import main

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "real.db").write_bytes(b"")  # an empty file: serving it would fill it with MLflow's tables
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    # SQLite reads '~' as a folder name: MLflow would create ./~/real.db here and serve that empty store
    uri = "sqlite:///~/real.db" if store == "tilde" else f"sqlite:///{home / 'real.db'}"

    assert main(["ui", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"plantml: error: tracking URI '{uri}' (from argument): no MLflow store at") and "\n" not in err
    assert ("write the full path" in err) == (store == "tilde")
    assert list(work.iterdir()) == [] and (home / "real.db").stat().st_size == 0


def test_the_ui_hint_can_be_pasted_into_a_shell_whatever_the_store_path() -> None:
    hint = how_to_see("sqlite:////tmp/my runs/store.db", "1", "r", default_uri=False)
    assert "`plantml ui --tracking-uri 'sqlite:////tmp/my runs/store.db'`" in hint


def test_the_ui_server_gets_a_database_store_through_its_environment_not_its_command_line() -> None:
    ui = LocalUI("postgresql+psycopg2://mlflow:s3cret-pw@127.0.0.1:5432/mlflow", port=5999)
    assert not any("s3cret-pw" in part for part in ui.command())  # ps shows command lines to every local user
    assert ui.environment()["MLFLOW_BACKEND_STORE_URI"] == ui.tracking_uri


def test_the_newest_run_is_found_behind_a_hundred_newer_experiments(tmp_path: Path) -> None:
    import mlflow

    from plantml.ui import Landing, newest_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    first = client.create_experiment("plant_classification")
    for i in range(101):  # a sweep a day: a new run does not make its experiment "recently updated"
        client.create_experiment(f"sweep_{i}")
    run = client.create_run(first)
    assert newest_run(uri) == Landing(first, run.info.run_id)


def test_a_server_gone_from_a_stale_env_file_is_one_line_saying_where_the_uri_came_from(tmp_path: Path, monkeypatch,
                                                                                       capsys) -> None:
    from plantml.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / ".env").write_text("MLFLOW_TRACKING_URI=http://127.0.0.1:9\n")  # a stack stopped since

    assert main(["ui"]) == 1

    assert capsys.readouterr().err.splitlines() == [
        "plantml: error: http://127.0.0.1:9: tracking server not reachable (ConnectionError); "
        f"this URI came from MLFLOW_TRACKING_URI in .env in {tmp_path}"]



def test_the_ui_takes_mlflows_usual_port_5000_when_free_else_another_free_one() -> None:
    import socket

    store = "postgresql+psycopg2://mlflow:pw@127.0.0.1:1/mlflow"  # a store that is not checked for existence
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 5000))
        taken.listen()
        other = LocalUI(store).port
        assert other != 5000
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", other))  # one that was free
    assert LocalUI(store).port == 5000  # free again


def test_plantml_ui_run_from_python_and_stopped_by_ctrl_c_gives_the_caller_its_signal_handlers_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: ``main(["ui"])`` left SIGINT, SIGTERM and SIGHUP ignored in its caller once it returned."""
    import os
    import signal
    import threading
    import time

    import mlflow
    import port_for
    import requests

    from plantml.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("plant_classification")
    port = port_for.select_random()
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def ctrl_c_once_it_answers() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)  # reaches the main thread, as a Ctrl-C would

    threading.Thread(target=ctrl_c_once_it_answers, daemon=True).start()
    assert main(["ui", "--tracking-uri", uri, "--port", str(port)]) == 0

    assert "plantml ui: stopped" in capsys.readouterr().err
    assert {signum: signal.getsignal(signum) for signum in before} == before
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C works in the caller again
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.01)
