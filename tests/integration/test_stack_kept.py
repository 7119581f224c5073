"""A stack kept in a data folder: stopped, started again on it, it serves the same runs, artifacts and models.

One stack of the session's backend lives twice on the same folder: the first life logs a
run and registers a model, then stops; the second starts on the folder and everything
is read back through plain MLflow and boto3.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from plantml.tracking.environ import forget_stale_s3_clients


def tiny_model():
    import torch

    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()


@pytest.fixture(scope="module")
def data_dir():
    # Not pytest's tmp_path: as root, PostgreSQL runs as another account, which must traverse the parents.
    path = Path(tempfile.mkdtemp(prefix="plantml-kept-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def first_life(mlflow_stack_factory, data_dir):
    """Log a run (params, metrics, an artifact) and register a model, then stop the stack."""
    import mlflow
    import mlflow.pytorch
    import torch

    stack = mlflow_stack_factory(data_dir=data_dir).start()
    name = f"kept_{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        for variable, value in stack.client_env().items():
            patch.setenv(variable, value)
        forget_stale_s3_clients()  # plain MLflow: its S3 clients cached with another stack's keys must go
        mlflow.set_tracking_uri(stack.tracking_uri)
        try:
            experiment_id = mlflow.create_experiment(name)
            with mlflow.start_run(experiment_id=experiment_id) as run:
                mlflow.log_params({"backbone": "tiny", "epochs": 3})
                for step in range(3):
                    mlflow.log_metric("val_loss", 1 / (step + 1), step=step)
                mlflow.log_text("healthy leaf", "notes/kept.txt")
                mlflow.pytorch.log_model(tiny_model(), name="model", registered_model_name=name,
                                         serialization_format="pickle", pip_requirements=["torch"])
        finally:
            mlflow.set_tracking_uri(None)
    stack.stop()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    return {"run_id": run.info.run_id, "model": name, "input": x, "output": tiny_model()(x).detach()}


@pytest.fixture(scope="module")
def second_life(mlflow_stack_factory, data_dir, first_life):
    """The same folder, started again."""
    with mlflow_stack_factory(data_dir=data_dir) as stack:
        yield stack


def test_the_data_folder_stays_after_stop_with_owner_only_credentials(first_life, data_dir):
    credentials = data_dir / "credentials.json"
    assert credentials.stat().st_mode & 0o777 == 0o600
    assert set(json.loads(credentials.read_text())) == {"postgres", "s3", "mlflow"}
    assert (data_dir / "postgres" / "data" / "PG_VERSION").is_file()
    assert any((data_dir / "s3" / "data").iterdir())


def test_a_second_start_serves_the_same_run_params_and_metrics(second_life, first_life):
    import mlflow

    client = mlflow.MlflowClient(second_life.tracking_uri)
    run = client.get_run(first_life["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params == {"backbone": "tiny", "epochs": "3"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")] == [(0, 1.0), (1, 0.5),
                                                                                                   (2, 1 / 3)]


def test_a_second_start_serves_the_same_artifacts(second_life, first_life, monkeypatch, tmp_path):
    import mlflow

    for variable, value in second_life.client_env().items():
        monkeypatch.setenv(variable, value)
    forget_stale_s3_clients()
    local = mlflow.artifacts.download_artifacts(run_id=first_life["run_id"], artifact_path="notes/kept.txt",
                                                dst_path=str(tmp_path), tracking_uri=second_life.tracking_uri)
    assert Path(local).read_text() == "healthy leaf"
    keys = [item["Key"] for item in second_life.s3_client().list_objects_v2(Bucket="mlflow")["Contents"]]
    assert any(key.endswith(f"{first_life['run_id']}/artifacts/notes/kept.txt") for key in keys)


def test_a_registered_model_is_intact_and_loadable_after_a_restart(second_life, first_life, monkeypatch):
    import mlflow
    import mlflow.pytorch
    import torch

    for variable, value in second_life.client_env().items():
        monkeypatch.setenv(variable, value)
    forget_stale_s3_clients()
    client = mlflow.MlflowClient(second_life.tracking_uri)
    version = client.get_model_version(first_life["model"], "1")
    assert version.run_id == first_life["run_id"] and version.status == "READY"
    mlflow.set_tracking_uri(second_life.tracking_uri)
    try:
        loaded = mlflow.pytorch.load_model(f"models:/{first_life['model']}/1")
    finally:
        mlflow.set_tracking_uri(None)
    assert torch.equal(loaded(first_life["input"]).detach(), first_life["output"])


def test_a_data_folder_in_use_by_a_running_stack_is_refused_in_one_line(second_life, data_dir, pytestconfig):
    result = subprocess.run([sys.executable, "-m", "plantml", "stack", "up", "--backend", pytestconfig.getoption("--stack"),
                             "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"plantml: error: stack: data folder {data_dir} is in use by a running stack " \
                                    f"(pid {os.getpid()})"
    assert second_life.services["mlflow"].running  # the running stack is untouched


def test_a_stack_killed_with_sigkill_starts_again_on_its_folder_at_once_then_on_new_ports_if_the_old_are_taken(
        mlflow_stack_factory, pytestconfig, tmp_path):
    """``kill -9`` of ``plantml stack up --data-dir DIR`` (no teardown at all), started again on DIR at once: the
    start waits for the killed stack's services (PostgreSQL refuses a folder whose postmaster still runs), cleans
    up what it left (its env file too) and serves the same run. Then, one of its ports taken, it picks another."""
    import mlflow
    from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

    folder = Path(tempfile.mkdtemp(prefix="plantml-killed-"))
    env_file = tmp_path / "stack.env"
    up = subprocess.Popen([sys.executable, "-m", "plantml", "stack", "up", "--backend", pytestconfig.getoption("--stack"),
                           "--data-dir", str(folder), "--env-file", str(env_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in up.stdout:  # type: ignore[union-attr]
            if line.startswith("Press Ctrl-C"):
                break
        uri = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if not line.startswith("#"))["MLFLOW_TRACKING_URI"]
        client = mlflow.MlflowClient(uri)
        run_id = client.create_run(client.create_experiment(f"killed_{uuid.uuid4().hex[:8]}")).info.run_id
        client.log_metric(run_id, "val_loss", 0.25, step=1)  # acknowledged, then the owner is killed
    finally:
        up.kill()
        up.wait()

    def same_run(stack) -> None:
        history = mlflow.MlflowClient(stack.tracking_uri).get_metric_history(run_id, "val_loss")
        assert [(m.step, m.value) for m in history] == [(1, 0.25)]

    try:
        with mlflow_stack_factory(data_dir=folder) as stack:  # at once: its services may still be ending
            assert not env_file.exists()  # the start pruned the killed stack's leftovers, its env file included
            same_run(stack)
            port = int(stack.tracking_uri.rsplit(":", 1)[1])

        @retry(retry=retry_if_exception_type(OSError), stop=stop_after_delay(60), wait=wait_fixed(0.2), reraise=True)
        def squat() -> socket.socket:
            squatter = socket.socket()
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past its closed connections' TIME_WAIT
            try:
                squatter.bind(("127.0.0.1", port))
            except OSError:
                squatter.close()
                raise
            squatter.listen()
            return squatter

        with squat(), mlflow_stack_factory(data_dir=folder) as stack:
            assert int(stack.tracking_uri.rsplit(":", 1)[1]) != port
            same_run(stack)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.local_session  # a container's PostgreSQL has a pid namespace of its own
def test_a_stack_whose_postgres_died_with_the_machine_starts_again_when_its_old_pid_is_another_process(
        mlflow_stack_factory):
    """A reboot (or a power cut) leaves PostgreSQL's postmaster.pid; after it, that pid is often another process
    of PostgreSQL's account, and PostgreSQL refused to start ("lock file postmaster.pid already exists"): the
    kept stack did not come back until someone deleted the file. The other process is left alone."""
    import mlflow

    from plantml.stack.service import service_account

    folder = Path(tempfile.mkdtemp(prefix="plantml-reboot-"))
    account = service_account(refuses_root=True)
    squatter = None
    try:
        with mlflow_stack_factory(data_dir=folder) as stack:
            client = mlflow.MlflowClient(stack.tracking_uri)
            run_id = client.create_run(client.create_experiment(f"reboot_{uuid.uuid4().hex[:8]}")).info.run_id
            client.log_metric(run_id, "val_loss", 0.25, step=1)
            pid = stack.services["postgres"].process.pid
            os.kill(pid, signal.SIGKILL)  # as a power cut ends it
            stack.stop("postgres")  # and not brought back by this stack
        postmaster = folder / "postgres" / "data" / "postmaster.pid"
        assert postmaster.read_text().split("\n", 1)[0] == str(pid)  # what the killed postmaster left
        squatter = subprocess.Popen(["sleep", "300"], user=account.uid, group=account.gid, cwd="/")
        lines = postmaster.read_text().split("\n")
        postmaster.write_text("\n".join([str(squatter.pid), *lines[1:]]))  # its pid, after the reboot

        with mlflow_stack_factory(data_dir=folder) as stack:
            history = mlflow.MlflowClient(stack.tracking_uri).get_metric_history(run_id, "val_loss")
            assert [(m.step, m.value) for m in history] == [(1, 0.25)]
        assert squatter.poll() is None
    finally:
        if squatter is not None:
            squatter.kill()
            squatter.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_first_stack_up_killed_during_initdb_leaves_a_folder_the_next_start_serves(mlflow_stack_factory, pytestconfig):
    """``kill -9`` of a first ``plantml stack up --data-dir DIR`` and of its initdb, half-way through making the
    cluster (a crash, the OOM killer): the next start on DIR makes the cluster again and serves, rather than
    finding a cluster that looks made (PG_VERSION written first) and crash-looping on it for good."""
    import psutil

    folder = Path(tempfile.mkdtemp(prefix="plantml-initdb-"))
    try:
        up = subprocess.Popen([sys.executable, "-m", "plantml", "stack", "up", "--backend", pytestconfig.getoption("--stack"),
                               "--data-dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            initdb = None
            while initdb is None and up.poll() is None:
                initdb = next((p for p in psutil.process_iter(["cmdline"])
                               if "initdb" in (p.info["cmdline"] or [""])[0] and str(folder) in " ".join(p.info["cmdline"])),
                              None)
            assert initdb is not None, f"stack up ended before its initdb was seen: {up.stderr.read()[-2000:]}"  # type: ignore[union-attr]
            up.kill()
            with contextlib.suppress(psutil.NoSuchProcess):
                initdb.kill()
        finally:
            up.kill()
            up.wait()
        assert not (folder / "postgres" / "data" / "PG_VERSION").exists()  # a half-made cluster is never where one is looked for
        with mlflow_stack_factory(data_dir=folder) as stack:
            import mlflow

            client = mlflow.MlflowClient(stack.tracking_uri)
            run = client.create_run(client.create_experiment(f"after_initdb_{uuid.uuid4().hex[:8]}"))
            assert client.get_run(run.info.run_id).info.status == "RUNNING"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_kept_folder_with_a_part_lost_another_postgresql_or_password_is_said_in_one_line(mlflow_stack_factory, caplog):
    """Was: a kept folder whose ``s3/`` was deleted started an empty store in silence, its runs' artifacts gone; one
    whose ``postgres/data/PG_VERSION`` was deleted ran initdb for seconds, then advised removing the database; one
    whose cluster another PostgreSQL major version made (a machine upgraded since) failed in a paragraph of log, and
    one whose credentials.json holds another password (edited, another stack's) after 30 s, in a paragraph too."""
    import logging
    import time

    import mlflow

    from plantml.errors import StackError

    folder = Path(tempfile.mkdtemp(prefix="plantml-lost-"))
    try:
        with mlflow_stack_factory(data_dir=folder) as stack:
            client = mlflow.MlflowClient(stack.tracking_uri)
            run_id = client.create_run(client.create_experiment(f"lost_{uuid.uuid4().hex[:8]}")).info.run_id
        shutil.rmtree(folder / "s3")

        with caplog.at_level(logging.WARNING, logger="plantml.stack"), mlflow_stack_factory(data_dir=folder) as stack:
            assert mlflow.MlflowClient(stack.tracking_uri).get_run(run_id).info.status == "RUNNING"  # the database kept
        assert (f"data folder {folder}: s3/ is missing while postgres/ holds data (deleted?): starting an empty s3; "
                "the artifacts of the runs its database records are gone") in caplog.messages

        data = folder / "postgres" / "data"
        major = (data / "PG_VERSION").read_text().strip()
        older = str(int(major) - 1)
        (data / "PG_VERSION").write_text(f"{older}\n")  # what PostgreSQL reads to tell which version made the cluster
        with pytest.raises(StackError) as refused:
            mlflow_stack_factory(data_dir=folder).start()
        assert str(refused.value) == (
            f"postgres: the database in {data} was made by PostgreSQL {older} and this server is PostgreSQL {major}: "
            f"start the stack with PostgreSQL {older}'s server (its binaries in PLANTML_PG_BINDIR; with --backend "
            f"containers, its image in PLANTML_POSTGRES_IMAGE), or move the folder to {major} with pg_upgrade after a copy")
        (data / "PG_VERSION").write_text(f"{major}\n")

        credentials = folder / "credentials.json"
        kept = credentials.read_text()
        credentials.write_text(json.dumps({**json.loads(kept), "postgres": {**json.loads(kept)["postgres"],
                                                                            "password": "another-stacks"}}))
        started = time.monotonic()
        with pytest.raises(StackError) as refused:
            mlflow_stack_factory(data_dir=folder).start()
        assert str(refused.value) == (f"postgres: the database in {data} refuses the password kept in {credentials} "
                                      "(edited, or another stack's file): put back this stack's own credentials.json")
        assert time.monotonic() - started < 20  # PostgreSQL's own start-up, not its 30 s wait to answer
        credentials.write_text(kept)

        (data / "PG_VERSION").unlink()
        kept = sorted(path.name for path in data.iterdir())
        with pytest.raises(StackError) as refused:
            mlflow_stack_factory(data_dir=folder).start()
        assert str(refused.value).startswith(f"postgres: {data}: holds files but no PG_VERSION (deleted?")
        assert sorted(path.name for path in data.iterdir()) == kept and not (folder / "postgres" / "data.init").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_kept_stack_after_an_mlflow_upgrade_is_refused_in_one_line_then_migrated_with_upgrade_db(
        mlflow_stack_factory, pytestconfig):
    """Was: ``stack up`` on a kept folder whose database an older MLflow wrote failed with a paragraph ("mlflow:
    exited while starting", then MLflow's advice to run ``mlflow db upgrade <database_uri>``, a URI the user does not
    have, of a database that runs only with the stack); or, when the new migration adds a table (as here), MLflow
    migrated the team's database on the spot without a word or a backup."""
    import mlflow
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config, _get_latest_schema_revision

    folder = Path(tempfile.mkdtemp(prefix="plantml-schema-"))

    def revision(database_uri: str) -> str:
        engine = sqlalchemy.create_engine(database_uri, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar_one()

    try:
        with mlflow_stack_factory(data_dir=folder) as stack:
            client = mlflow.MlflowClient(stack.tracking_uri)
            run_id = client.create_run(client.create_experiment(f"schema_{uuid.uuid4().hex[:8]}")).info.run_id
            client.log_metric(run_id, "val_loss", 0.25)
            # the MLflow before this one: its last migration taken back, by MLflow's own downgrade
            config = _get_alembic_config(stack.endpoints.database_uri)
            engine = sqlalchemy.create_engine(stack.endpoints.database_uri, poolclass=sqlalchemy.pool.NullPool)
            with engine.begin() as connection:
                config.attributes["connection"] = connection
                command.downgrade(config, "-1")
            older = revision(stack.endpoints.database_uri)

        refused = subprocess.run([sys.executable, "-m", "plantml", "stack", "up", "--backend", pytestconfig.getoption("--stack"),
                                  "--data-dir", str(folder)], capture_output=True, text=True, timeout=180)
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr == (
            f"plantml: error: mlflow: the database in {folder} has an older MLflow's schema ({older}; the server's "
            f"MLflow {mlflow.__version__} needs {_get_latest_schema_revision()}): copy the folder as a backup while "
            f"the stack is stopped (cp -a {folder} {folder}.bak), then start it with --upgrade-db (Python: "
            "upgrade_db=True), which migrates it\n")

        with mlflow_stack_factory(data_dir=folder, upgrade_db=True) as stack:
            assert revision(stack.endpoints.database_uri) == _get_latest_schema_revision()
            assert mlflow.MlflowClient(stack.tracking_uri).get_run(run_id).data.metrics == {"val_loss": 0.25}
            assert "upgrading the database's MLflow schema from" in stack.service_logs()["mlflow"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
