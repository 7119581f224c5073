"""``plantml registry`` on a local sqlite store: aligned tables, one-line errors."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from plantml.cli.registry import QUICK_HTTP_ENV


@pytest.fixture(scope="module")
def store_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry_cli")


@pytest.fixture
def store(store_folder: Path) -> tuple[str, str]:
    """A fresh model of two versions in a module-wide sqlite store; returns (uri, model name)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store_folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = f"plants_{uuid.uuid4().hex[:6]}"
    experiment_id = client.create_experiment(name, artifact_location=str(store_folder / name))
    client.create_registered_model(name)
    for lr in ("0.1", "0.05"):
        run = client.create_run(experiment_id)
        client.log_param(run.info.run_id, "lr", lr)
        client.log_metric(run.info.run_id, "val_accuracy", 0.5 + float(lr))
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return uri, name


def registry_cli(uri: str, *args: str) -> Any:
    from plantml.cli import cli

    runner = CliRunner(env={name: os.environ.get(name) for name in QUICK_HTTP_ENV})
    return runner.invoke(cli, ["registry", "--tracking-uri", uri, *args])


def test_list_shows_every_version_with_its_stage_and_aliases(store: tuple[str, str]) -> None:
    uri, name = store
    registry_cli(uri, "promote", name, "2", "--alias", "Staging")
    result = registry_cli(uri, "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "STAGE", "ALIASES", "RUN", "CREATED"]
    rows = [line.split()[:4] for line in lines[1:] if line.startswith(name + " ")]
    assert rows == [[name, "1", "None", "-"], [name, "2", "Staging", "staging"]]


def test_list_of_every_model_reads_no_run(store: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The all-models table shows no run data: reading each version's run (one request each on a server) cost
    a model of 250 versions and one of 100 on the local stack 5 to 7.5 s of a 10 to 12.7 s listing."""
    from mlflow import MlflowClient

    uri, name = store
    reads: list[str] = []
    real_get_run = MlflowClient.get_run
    monkeypatch.setattr(MlflowClient, "get_run", lambda self, run_id: reads.append(run_id) or real_get_run(self, run_id))
    result = registry_cli(uri, "list")
    assert result.exit_code == 0, result.output
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith(name + " ")] == ["1", "2"]
    assert reads == []
    assert "val_accuracy=0.6" in registry_cli(uri, "list", name).stdout and len(reads) == 2  # a model's listing still reads them


def test_list_name_shows_versions_stages_runs_and_metrics(store: tuple[str, str]) -> None:
    uri, name = store
    registry_cli(uri, "promote", name, "1")
    lines = registry_cli(uri, "list", name).stdout.splitlines()
    assert lines[0].split() == ["VERSION", "STAGE", "ALIASES", "RUN", "STATUS", "CREATED", "METRICS"]
    assert lines[1].split()[:3] == ["1", "Production", "production"] and lines[1].endswith("val_accuracy=0.6")


def test_list_name_reads_the_runs_of_one_experiment_in_one_search(store_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One get_run per version cost a model of 250 versions 4.3 s of listing on the local stack (0.44 s searched):
    the runs its first run's experiment holds come by search, deleted ones too; a run elsewhere is still read."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store_folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = f"many_{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    main, other = (client.create_experiment(f"{name}_{e}", artifact_location=str(store_folder / name / e)) for e in "ab")
    for index, experiment in enumerate([main] * 5 + [other]):
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "val_accuracy", index / 10)
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        if index == 2:
            client.delete_run(run.info.run_id)  # a version outlives its run's deletion: its metrics still show
    reads: list[str] = []
    real_get_run = MlflowClient.get_run
    monkeypatch.setattr(MlflowClient, "get_run", lambda self, run_id: reads.append(run_id) or real_get_run(self, run_id))
    result = registry_cli(uri, "list", name)
    assert result.exit_code == 0, result.output
    metrics = [line.split()[-1] for line in result.stdout.splitlines()[1:]]
    assert metrics == [f"val_accuracy={index / 10:g}" for index in range(6)]
    assert len(reads) <= 2, reads  # the first run (its experiment) and the one in the other experiment


def test_promote_then_rollback_report_each_move(store: tuple[str, str]) -> None:
    uri, name = store
    assert registry_cli(uri, "promote", name, "1").stdout.strip() == f"{name}: alias 'production' -> version 1 (was unset)"
    assert registry_cli(uri, "promote", name, "2", "--alias", "Production").stdout.strip() == f"{name}: alias 'production' -> version 2 (was version 1)"
    result = registry_cli(uri, "rollback", name)
    assert result.stdout.strip() == f"{name}: alias 'production' rolled back to version 1 (was version 2)"


def test_compare_marks_the_keys_that_differ(store: tuple[str, str]) -> None:
    uri, name = store
    lines = registry_cli(uri, "compare", name, "1", "2").stdout.splitlines()
    assert lines[0] == "params:"
    assert lines[2].split() == ["*", "lr", "0.1", "0.05"]
    assert "metrics:" in lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("promote", "{name}", "1", "--alias", "latest"), "alias 'latest'"),
        (("promote", "{name}", "7"), "version 7: not found"),
        (("rollback", "{name}", "--alias", "canary"), "alias 'canary': not set"),
        (("list", "ghost_model"), "registered model 'ghost_model': not found"),
        # a name typed in a Latin-1 shell: was "'utf-8' codec can't encode character '\udcff'…", exit 1
        *((command, "registered model 'x%FFy': holds bytes that are not UTF-8 (shown as %XX)")
          for command in (("list", "x\udcffy"), ("promote", "x\udcffy", "1"), ("rollback", "x\udcffy"),
                          ("compare", "x\udcffy", "1", "2"), ("load-check", "models:/x\udcffy/1"),
                          ("load-check", "--no-pickle", "models:/x\udcffy@production"))),
        (("promote", "{name}", "1", "--alias", "a\udcff"), "alias 'a%FF': only letters"),
    ],
    ids=["reserved-alias", "unknown-version", "unknown-alias", "unknown-model", "latin1-list", "latin1-promote",
         "latin1-rollback", "latin1-compare", "latin1-load", "latin1-load-no-pickle", "latin1-alias"],
)
def test_errors_are_one_line_naming_the_culprit_with_exit_2(
    store: tuple[str, str], args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from plantml.cli import main

    uri, name = store
    with pytest.MonkeyPatch.context() as patch:
        for key in QUICK_HTTP_ENV:
            patch.delenv(key, raising=False)
        code = main(["registry", "--tracking-uri", uri, *(a.format(name=name) for a in args)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plantml: error: ") and message in err and "\n" not in err


def run_main(args: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``plantml ARGS`` in this process, with the environment left as it was; returns (code, stdout, stderr)."""
    from plantml.cli import main

    with pytest.MonkeyPatch.context() as patch:
        for key in (*QUICK_HTTP_ENV, "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            patch.delenv(key, raising=False)
        code = main(args)
    out, err = capfd.readouterr()
    return code, out, err


def test_list_shows_models_whose_names_hold_an_apostrophe_and_models_without_versions(
    store: tuple[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    uri, name = store
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    quoted, empty = f"o'brien_{name}", f"empty_{name}"
    source = client.get_model_version(name, "1")
    client.create_registered_model(quoted)
    client.create_model_version(quoted, source=source.source, run_id=source.run_id)
    client.create_registered_model(empty)
    code, out, err = run_main(["registry", "--tracking-uri", uri, "list"], capfd)
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines() if line.startswith(quoted + " ")] == [[quoted, "1"]]
    assert f"{empty}: no versions" in out.splitlines()
    code, out, err = run_main(["registry", "--tracking-uri", uri, "list", quoted], capfd)
    assert code == 0 and out.splitlines()[1].split()[0] == "1", (out, err)


def test_compare_takes_versions_written_as_promote_takes_them(store: tuple[str, str]) -> None:
    uri, name = store
    result = registry_cli(uri, "compare", name, "v1", "V2")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[2].split() == ["*", "lr", "0.1", "0.05"]


@pytest.mark.parametrize(
    "args",
    [["list"], ["list", "plants"], ["compare", "plants", "1", "2"], ["load-check", "models:/plants/1"],
     ["promote", "plants", "1"], ["rollback", "plants"]],
    ids=["list", "list-name", "compare", "load-check", "promote", "rollback"],
)
@pytest.mark.parametrize("uri", [None, "sqlite:///missing.db"], ids=["default", "argument"])
def test_registry_commands_on_a_missing_local_store_create_nothing_and_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], args: list[str], uri: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["registry", *(["--tracking-uri", uri] if uri else []), *args], capfd)
    database = tmp_path / ("missing.db" if uri else "mlflow.db")
    assert code == 2
    assert err.strip() == (f"plantml: error: tracking URI {uri or 'sqlite:///mlflow.db'!r} ({'from argument' if uri else 'the default'}): "
                           f"no MLflow store at {database} (train first, or give another tracking URI)")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_a_missing_store_named_by_the_environment_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from plantml.errors import ConfigError
    from plantml.registry import ModelRegistry

    with pytest.raises(ConfigError, match=r"\(from environment \(MLFLOW_TRACKING_URI\)\): no MLflow store at /proc/x/mlflow.db"):
        ModelRegistry("sqlite:////proc/x/mlflow.db", source="environment (MLFLOW_TRACKING_URI)")


def _postgres_driver_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("psycopg") is not None


@pytest.mark.parametrize(
    ("uri", "code", "message"),
    [
        ("file:///{tmp}/mlruns", 2, "tracking URI 'file:///{tmp}/mlruns' (from argument): The filesystem tracking backend"),
        ("sqlite:////etc/passwd/mlflow.db", 2, "(from argument): no MLflow store at /etc/passwd/mlflow.db"),
        ("sqlite:////proc/x/mlflow.db", 2, "(from argument): no MLflow store at /proc/x/mlflow.db"),
        ("sqlite:///{tmp}/garbage.db", 1, "(from argument): cannot open the store (DatabaseError:"),
        pytest.param("postgresql://u:p@127.0.0.1:1/db", 1,
                     "tracking URI 'postgresql://u:***@127.0.0.1:1/db' (from argument): needs the Python module psycopg",
                     marks=pytest.mark.skipif(_postgres_driver_installed(), reason="needs psycopg to be missing")),
    ],
    ids=["file", "sqlite-under-a-file", "sqlite-in-proc", "sqlite-not-a-database", "postgresql-without-driver"],
)
def test_unusable_tracking_uris_give_one_line_naming_them(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], uri: str, code: int, message: str
) -> None:
    (tmp_path / "garbage.db").write_bytes(b"not a database\n" * 100)
    uri, message = uri.format(tmp=tmp_path), message.format(tmp=tmp_path)
    got, _, err = run_main(["registry", "--tracking-uri", uri, "list"], capfd)
    assert got == code
    assert err.startswith("plantml: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("answer", ["refused", "silent"])
def test_a_database_that_is_down_or_silent_is_one_line_in_seconds_not_mlflows_ten_retries(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], answer: str
) -> None:
    """Was 100 s of MLflow's "SQLAlchemy engine could not be created … Operation will be retried in 51.1 seconds",
    ten times, for ``--tracking-uri postgresql+psycopg2://…`` with the database down (a wrong password too)."""
    import socket
    import time

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        if answer == "silent":
            listening.listen(1)  # accepts, never answers: psycopg2 waits for its connect_timeout
        uri = f"postgresql+psycopg2://mlflow:s3cret@127.0.0.1:{listening.getsockname()[1]}/mlflow"
        if answer == "refused":
            listening.close()
        started = time.monotonic()
        got, _, err = run_main(["registry", "--tracking-uri", uri, "list"], capfd)
        took = time.monotonic() - started
    assert got == 1 and took < 10, (took, err)
    shown = uri.replace("s3cret", "***")
    reason = {"refused": "Connection refused", "silent": "timeout expired"}[answer]
    assert err.startswith(f"plantml: error: tracking URI '{shown}' (from argument): the database does not answer or "
                          "refuses the connection ("), err
    assert reason in err and err.count("\n") == 1 and "s3cret" not in err, err


@pytest.mark.parametrize("command", [["registry", "list"], ["train"], ["verify"], ["ui"], ["tracking", "recover", "--stale", "10m"]],
                         ids=" ".join)
@pytest.mark.parametrize("uri", ["sqlite:///x\udcff.db", "http://127.0.0.1:9/x\udcff"])
def test_a_tracking_uri_typed_in_a_latin1_shell_is_refused_in_one_line(
    uri: str, command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Was "cannot open the store (UnicodeEncodeError: 'utf-8' codec can't encode character '\\udcff'…)", exit 1;
    ``tracking recover --stale`` retried it for its whole timeout."""
    monkeypatch.chdir(tmp_path)
    got, _, err = run_main([*command, "--tracking-uri", uri], capfd)
    assert got == 2
    assert err == (f"plantml: error: tracking URI '{uri.replace(chr(0xDCFF), '%FF')}' (from argument): holds bytes that "
                   "are not UTF-8 (shown as %XX); give it in UTF-8\n")


def test_a_server_gone_from_a_stale_env_file_says_where_its_uri_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # a stack stopped days ago: nothing listens there now
    (tmp_path / ".env").write_text(f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    got, _, err = run_main(["registry", "list"], capfd)
    assert got == 1 and err.count("\n") == 1, err
    assert f"http://127.0.0.1:{port}: tracking server not reachable; this URI came from" in err
    assert f".env in {tmp_path}" in err


def test_the_tracking_uri_is_taken_after_the_command_name_as_train_takes_it(store: tuple[str, str]) -> None:
    """Was: ``plantml registry list --tracking-uri URI``: "No such option"; only ``registry --tracking-uri URI list``."""
    from plantml.cli import cli

    uri, name = store
    runner = CliRunner(env={name: os.environ.get(name) for name in QUICK_HTTP_ENV})
    result = runner.invoke(cli, ["registry", "--tracking-uri", "sqlite:////nowhere/mlflow.db", "list", name, "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["1", "2"]


@pytest.mark.parametrize(("revision", "message"), [
    ("ffffffffffff", "the store was written by a newer MLflow than this one ({version}; its schema ffffffffffff is "
                     "unknown here): use that MLflow version or a later one"),
    ("{older}", "the store's schema is an older MLflow's ({older}; MLflow {version} needs {head}): back it up, then run "
                "`mlflow db upgrade {uri}`"),
], ids=["newer MLflow", "older MLflow"])
def test_a_store_of_another_mlflow_version_says_which_way_and_what_to_do(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], revision: str, message: str
) -> None:
    """Was MLflow's first sentence alone, "Detected out-of-date database schema (found version …)": its advice (mlflow
    db upgrade) cut off, and the same words for a store a newer MLflow wrote, which no upgrade here can read."""
    import sqlite3
    import subprocess
    import sys

    import mlflow
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    made = subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.MlflowClient({uri!r}).search_experiments()"],
                          capture_output=True, text=True, timeout=120)  # another process: this one keeps its stores open
    assert made.returncode == 0, made.stderr
    scripts = ScriptDirectory.from_config(_get_alembic_config(uri))
    head = scripts.get_current_head()
    older = scripts.get_revision(head).down_revision
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision.format(older=older),))

    got, _, err = run_main(["registry", "--tracking-uri", uri, "list"], capfd)

    assert got == 2
    shown = message.format(version=mlflow.__version__, older=older, head=head, uri=uri)
    assert err == f"plantml: error: tracking URI {uri!r} (from argument): {shown}\n"
