"""The real stack: runs land in PostgreSQL, artifacts in the S3 bucket, failures are clear and clean."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from _processes import stop
from botocore.exceptions import ClientError
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from plantml.errors import StackError
from plantml.stack import ExternalStack, LocalStack, Stack
from plantml.stack.endpoints import make_s3_client


def _log_a_run(client, experiment_name: str, artifact: Path) -> tuple[str, str]:
    from mlflow.entities import Metric, Param

    experiment_id = client.create_experiment(experiment_name)
    run = client.create_run(experiment_id, run_name="stack-check")
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, params=[Param("backbone", "resnet18")],
                     metrics=[Metric("val_accuracy", 0.5 + step / 10, now, step) for step in range(3)])
    client.log_artifact(run_id, str(artifact), artifact_path="checks")
    client.set_terminated(run_id)
    return experiment_id, run_id


def _bucket_keys(stack: Stack) -> list[str]:
    listing = stack.s3_client().list_objects_v2(Bucket=stack.bucket)
    return [item["Key"] for item in listing.get("Contents", [])]


def _children() -> set[int]:
    """Our live descendants (the session's own stacks included: compare before and after)."""
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def test_a_run_is_stored_in_postgres_and_its_artifact_in_the_bucket(mlflow_stack_any_mode, experiment_name, tmp_path, monkeypatch):
    import mlflow
    import psycopg2

    stack = mlflow_stack_any_mode
    for name, value in stack.client_env().items():
        monkeypatch.setenv(name, value)
    if stack.artifact_mode == "proxied":  # proxied clients need no S3 credentials at all
        for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name, raising=False)
    artifact = tmp_path / f"note-{uuid.uuid4().hex[:6]}.txt"
    artifact.write_text("leaf")
    client = mlflow.MlflowClient(stack.tracking_uri)

    _, run_id = _log_a_run(client, experiment_name, artifact)

    run = client.get_run(run_id)
    assert run.data.params == {"backbone": "resnet18"}
    assert [m.value for m in client.get_metric_history(run_id, "val_accuracy")] == [0.5, 0.6, 0.7]
    assert run.info.status == "FINISHED"
    assert any(key.endswith(f"{run_id}/artifacts/checks/{artifact.name}") for key in _bucket_keys(stack))
    if stack.endpoints.database_uri:  # the metadata really is in PostgreSQL
        dsn = stack.endpoints.database_uri.replace("postgresql+psycopg2://", "postgresql://")
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
            assert cur.fetchone() == ("FINISHED",)


def test_postgres_runs_durable_unless_the_session_asked_for_fast_stacks(mlflow_stack, pytestconfig):
    expected = "off" if pytestconfig.getoption("--stack-fast") else "on"
    assert postgres_durability(mlflow_stack) == dict.fromkeys(("fsync", "synchronous_commit", "full_page_writes"), expected)


def postgres_durability(stack) -> dict[str, str]:
    import psycopg2

    dsn = stack.endpoints.database_uri.replace("postgresql+psycopg2://", "postgresql://")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        settings = {}
        for name in ("fsync", "synchronous_commit", "full_page_writes"):
            cur.execute(f"SHOW {name}")
            settings[name] = cur.fetchone()[0]
    return settings


def test_a_fast_stack_on_fixed_ports_gets_them_on_the_sessions_backend(mlflow_stack_factory):
    """``--fast`` and ``--mlflow-port``/``--s3-port``/``--postgres-port``, as ``stack up`` passes them."""
    ports = {}
    for service in ("mlflow", "s3", "postgres"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports[f"{service}_port"] = probe.getsockname()[1]
    with mlflow_stack_factory(durable=False, **ports) as stack:
        assert stack.tracking_uri == f"http://127.0.0.1:{ports['mlflow_port']}"
        assert stack.s3_endpoint == f"http://127.0.0.1:{ports['s3_port']}"
        assert f"@127.0.0.1:{ports['postgres_port']}/" in stack.endpoints.database_uri
        assert postgres_durability(stack) == dict.fromkeys(("fsync", "synchronous_commit", "full_page_writes"), "off")
        assert requests.get(f"{stack.tracking_uri}/health", timeout=10).status_code == 200


@pytest.mark.local_session  # the same launcher runs in the containers' image (the whole containers session uses it)
def test_the_mlflow_server_is_one_process_that_serves_the_port(mlflow_stack):
    """MLflow's own ``mlflow server`` runs uvicorn as a second Python that imports MLflow again: 4 CPU-seconds and
    4 s more at every stack start here. plantml's launcher runs the same server in the first."""
    import json

    pid = json.loads((mlflow_stack.folder.path / "state.json").read_text())["processes"]["mlflow"]["pid"]
    server = psutil.Process(pid)
    assert server.children() == [] and "mlflow_launch.py" in " ".join(server.cmdline())
    port = int(mlflow_stack.tracking_uri.rsplit(":", 1)[1])
    assert any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in server.net_connections(kind="inet"))


def test_every_stack_has_the_designs_four_buckets(mlflow_stack):
    names = {bucket["Name"] for bucket in mlflow_stack.s3_client().list_buckets()["Buckets"]}
    assert {"mlflow", "models", "plants-images", "data"} <= names
    assert mlflow_stack.buckets == ("mlflow", "models", "plants-images", "data")


def test_a_wrong_s3_secret_is_refused(mlflow_stack):
    client = make_s3_client(mlflow_stack.s3_endpoint, mlflow_stack.aws_access_key, "not-the-secret")
    with pytest.raises(ClientError) as refused:
        client.list_objects_v2(Bucket=mlflow_stack.bucket)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_the_stack_repr_masks_every_secret(mlflow_stack):
    shown = repr(mlflow_stack) + repr(mlflow_stack.endpoints)
    assert mlflow_stack.aws_secret_key not in shown
    if mlflow_stack.endpoints.database_uri:
        password = re.search(r"://[^:]+:([^@]+)@", mlflow_stack.endpoints.database_uri).group(1)
        assert password not in shown


def test_an_external_stack_with_a_wrong_secret_names_s3(mlflow_stack, monkeypatch):
    for name, value in mlflow_stack.client_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StackError, match=r"^s3: bucket 'mlflow' .*access denied"):
        ExternalStack().start()


def test_an_external_stack_is_usable_when_its_variables_are_right(mlflow_stack, monkeypatch):
    for name, value in mlflow_stack.client_env().items():
        monkeypatch.setenv(name, value)
    external = ExternalStack().start()
    assert external.tracking_uri == mlflow_stack.tracking_uri
    assert external.artifact_mode == "direct"


# -- failures at start leave nothing behind ---------------------------------------------------


def test_missing_postgres_binaries_name_postgres_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANTML_PG_BINDIR", str(tmp_path / "no-such-bin"))
    before = _children()
    stack = LocalStack()
    with pytest.raises(StackError, match=r"^postgres: PLANTML_PG_BINDIR=.* holds no initdb"):
        stack.start()
    assert _children() <= before
    assert stack.folder_path is not None and not stack.folder_path.exists()


def test_a_taken_port_names_the_service_and_port_and_leaves_nothing():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        before = _children()
        stack = LocalStack(mlflow_port=port)
        with pytest.raises(StackError, match=rf"^mlflow: port {port} on 127.0.0.1 is already in use"):
            stack.start()
    assert _children() <= before
    assert not stack.folder_path.exists()



@pytest.mark.local_session
def test_a_port_taken_between_its_choice_and_the_bind_costs_one_more_start_not_the_stack(monkeypatch, caplog):
    """Two stacks starting at once (two pytest workers) can choose the same free port: the second to bind failed
    its whole start (CI, twice). The squatter takes MLflow's port after the check that it is free."""
    from plantml.stack.stack import ManagedStack

    squatters: list[socket.socket] = []
    start_all = ManagedStack._start_all

    def squat_then_start(self, abandon):
        if not squatters:
            squatter = socket.socket()
            squatter.bind(("127.0.0.1", self.services["mlflow"].spec.port))
            squatter.listen()
            squatters.append(squatter)
        start_all(self, abandon)

    monkeypatch.setattr(ManagedStack, "_start_all", squat_then_start)
    stack = LocalStack()
    try:
        started = time.monotonic()
        stack.start()
        elapsed = time.monotonic() - started
        taken = squatters[0].getsockname()[1]
        assert stack.endpoints.tracking_uri != f"http://127.0.0.1:{taken}"
        assert requests.get(f"{stack.endpoints.tracking_uri}/health", timeout=10).status_code == 200
        assert f"port {taken}, chosen free, was taken by another program" in caplog.text
        print(f"started in {elapsed:.1f} s with one more start")
    finally:
        stack.stop()
        for squatter in squatters:
            squatter.close()

@pytest.mark.local_session
def test_ports_taken_at_every_start_fail_the_stack_after_three_starts_and_leave_nothing(monkeypatch):
    """The README's "up to three": a program that takes each new choice of port (here PostgreSQL's) before its
    service binds it makes the stack fail after the third start, with the service named, not retry for ever."""
    from plantml.stack.stack import PORT_TRIES, ManagedStack

    squatters: list[socket.socket] = []
    start_all = ManagedStack._start_all

    def squat_then_start(self, abandon):
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", self.services["postgres"].spec.port))
        squatter.listen()
        squatters.append(squatter)
        ports.append(squatter.getsockname()[1])
        start_all(self, abandon)

    ports: list[int] = []
    monkeypatch.setattr(ManagedStack, "_start_all", squat_then_start)
    before = _children()
    stack = LocalStack()
    try:
        with pytest.raises(StackError) as failure:
            stack.start()
    finally:
        for squatter in squatters:
            squatter.close()
    assert PORT_TRIES == 3
    assert len(squatters) == 3
    assert failure.value.service == "postgres"
    assert len(set(ports)) == 3  # a new port at each start
    assert f"port {ports[-1]}" in str(failure.value)
    print(failure.value)
    assert _children() <= before
    assert not stack.folder_path.exists()


@pytest.mark.local_session
def test_the_readmes_python_example_runs_as_written_and_leaves_nothing(tmp_path):
    """The "From Python" block of docs/stack.md, run as written in a fresh Python: the printed endpoints answer
    inside the ``with``, ``client_env()`` has the client's variables, and the end of the block stops everything."""
    readme = (Path(__file__).parents[2] / "docs" / "stack.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(from plantml\.stack import start_local_stack\n.*?)```", readme, re.DOTALL)
    assert len(blocks) == 1, "the start_local_stack example of docs/stack.md moved: update this test"
    # The block ends inside its ``with``: indented lines go on inside it, the others run after it.
    checks = textwrap.dedent("""\
        import json, requests
        tracking = stack.tracking_uri
        answered = [requests.get(tracking + "/health", timeout=10).status_code,
                    requests.get(stack.s3_endpoint, timeout=10).status_code]
    try:
        requests.get(tracking + "/health", timeout=5)
        stopped = False
    except requests.ConnectionError:
        stopped = True
    print(json.dumps({"env": sorted(env), "answered": answered, "stopped": stopped, "folder": str(stack.folder_path)}))
    """)
    script = tmp_path / "example.py"
    script.write_text(blocks[0] + checks, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    printed, report = result.stdout.strip().splitlines()[-2:]
    tracking, s3 = printed.split()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", tracking) and re.fullmatch(r"http://127\.0\.0\.1:\d+", s3)
    facts = json.loads(report)
    assert facts["env"] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN",
                            "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI"]  # the tokens empty: no shell's token goes
    assert facts["answered"][0] == 200  # MLflow's /health; the object store answers too (403 without a signature)
    assert facts["stopped"], "the stack still answered after its with block"
    assert not Path(facts["folder"]).exists()


def test_a_crashing_service_shows_its_log_tail_and_leaves_nothing(tmp_path, monkeypatch):
    # An S3 binary that dies at once stands for any service failing during start.
    fake = tmp_path / "bin" / "weed"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'weed: cannot open volume: disk on fire' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr("plantml.stack.host.find_weed", lambda: fake)
    before = _children()
    stack = LocalStack()
    with pytest.raises(StackError) as failed:
        stack.start()
    assert str(failed.value).startswith("s3: exited while starting")
    assert "disk on fire" in str(failed.value)
    assert _children() <= before
    assert not stack.folder_path.exists()


# -- plantml stack up ----------------------------------------------------------------------------

ANOTHER_SHELL = textwrap.dedent("""
    import mlflow, os, sys
    client = mlflow.MlflowClient()
    exp = client.create_experiment(sys.argv[1])
    run = client.create_run(exp)
    client.log_text(run.info.run_id, "from another shell", "hello.txt")
    client.set_terminated(run.info.run_id)
    print(run.info.run_id)
""")


@retry(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(90), wait=wait_fixed(0.2), reraise=True)
def _wait_for_file(path: Path) -> bool:
    return path.exists()


def test_stack_up_env_file_works_from_another_shell_and_ctrl_c_leaves_nothing(tmp_path):
    """Started as a script's background job would start it (``stack up &``: SIGINT ignored), Ctrl-C still stops it."""
    env_file = tmp_path / "stack.env"
    up = subprocess.Popen([sys.executable, "-m", "plantml", "stack", "up", "--env-file", str(env_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        _wait_for_file(env_file)
        shell = f'set -a; . "{env_file}"; set +a; exec "{sys.executable}" -c "$0" "$1"'
        bare_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
        other = subprocess.run(["bash", "-c", shell, ANOTHER_SHELL, f"from_shell_{uuid.uuid4().hex[:6]}"],
                               env=bare_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert other.returncode == 0, other.stderr[-2000:]
        run_id = other.stdout.strip().splitlines()[-1]
        stack_processes = psutil.Process(up.pid).children(recursive=True)
        assert len(stack_processes) >= 3
    finally:
        output = stop(up)
    workdir = Path(re.search(r"logs:\s+(\S+)/logs", output).group(1))
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:" in output
    assert len(run_id) == 32
    assert not workdir.exists()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stack_processes)
    assert not env_file.exists()  # a stale env file would point plantml at a dead server
    assert "its data (runs, artifacts, models) went with it" in output


def test_stack_up_on_a_taken_port_fails_in_one_paragraph_with_exit_1(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "plantml", "stack", "up", "--mlflow-port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"plantml: error: mlflow: port {port} on 127.0.0.1 is already in use by another process"
    assert "Traceback" not in result.stderr


SESSION_THAT_HANGS = textwrap.dedent("""
    import json, os, time, psutil

    def test_hangs(mlflow_stack):
        pids = [p.pid for p in psutil.Process().children(recursive=True)]
        with open(os.environ["REPORT"] + ".tmp", "w") as handle:
            json.dump({"pids": pids, "workdir": str(mlflow_stack.folder.path)}, handle)
        os.rename(os.environ["REPORT"] + ".tmp", os.environ["REPORT"])
        time.sleep(300)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.local_session)],
                         ids=["SIGTERM", "SIGHUP"])
def test_a_pytest_session_killed_with_sigterm_or_sighup_tears_its_stack_down(tmp_path, signum):
    import json

    (tmp_path / "test_hangs.py").write_text(SESSION_THAT_HANGS)
    report = tmp_path / "report.json"
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_hangs.py")],
                               cwd=tmp_path, env={**os.environ, "REPORT": str(report), "PYTHONFAULTHANDLER": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_file(report)
    finally:
        # The teardown's own bound: each of the three services is killed 15 s after its stop signal (STOP_TIMEOUT);
        # 60 s was passed once on a machine whose disk made the whole suite 60% slower (its stacks were not dumped)
        stop(session, signum, timeout=120)
    started = json.loads(report.read_text())
    assert len(started["pids"]) >= 3
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in started["pids"])
    assert not Path(started["workdir"]).exists()


DOWNSTREAM_TESTS = textwrap.dedent("""
    def test_logs_to_the_stack(mlflow_stack, mlflow_client, experiment_name):
        assert mlflow_stack.backend == "external"
        experiment_id = mlflow_client.create_experiment(experiment_name)
        run = mlflow_client.create_run(experiment_id, run_name="from_an_external_session")
        mlflow_client.log_metric(run.info.run_id, "val_accuracy", 0.5)
        mlflow_client.set_terminated(run.info.run_id)

    def test_needs_a_stack_of_its_own(mlflow_stack_factory):
        pass
""")


@pytest.mark.local_session
def test_a_pytest_session_on_an_external_stack_uses_it_and_starts_nothing(mlflow_stack, mlflow_client, tmp_path):
    """``pytest --stack external``: the fixtures describe the stack of the environment (here, the session's)."""
    (tmp_path / "test_downstream.py").write_text(DOWNSTREAM_TESTS)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}, **mlflow_stack.client_env()}
    session = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--stack", "external",
                              str(tmp_path / "test_downstream.py")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "1 passed" in session.stdout and "1 error" in session.stdout, session.stdout[-3000:]
    assert "stacks of their own need a backend plantml starts (local, containers), not 'external'" in session.stdout
    runs = mlflow_client.search_runs([e.experiment_id for e in mlflow_client.search_experiments()],
                                     "attributes.run_name = 'from_an_external_session'")
    assert len(runs) == 1 and runs[0].data.metrics == {"val_accuracy": 0.5}


@pytest.mark.local_session
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["plantml stack down", "SIGHUP"])
def test_stack_up_stops_on_sigterm_or_sighup_like_on_ctrl_c(tmp_path, signum):
    """What ``plantml stack down``, a service manager or ``docker stop`` sends (SIGTERM), or a closed terminal:
    everything stops, the temporary data and the env file go, exit status 0."""
    env_file = tmp_path / "stack.env"
    up = subprocess.Popen([sys.executable, "-m", "plantml", "stack", "up", "--env-file", str(env_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in up.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        stack_processes = psutil.Process(up.pid).children(recursive=True)
        assert env_file.is_file()
        if signum == signal.SIGTERM:  # from another shell, by the env file it wrote
            listed = subprocess.run([sys.executable, "-m", "plantml", "stack", "list"], capture_output=True, text=True, timeout=60)
            url = re.search(r"MLflow UI:\s+(\S+)", "".join(lines)).group(1)
            assert re.search(rf"^{up.pid}\s+{re.escape(url)}\s+\S+ \(temporary\)\s+{re.escape(str(env_file))}$",
                             listed.stdout, re.MULTILINE), listed.stdout + listed.stderr
            down = subprocess.run([sys.executable, "-m", "plantml", "stack", "down", "--env-file", str(env_file)],
                                  capture_output=True, text=True, timeout=120)
            assert down.returncode == 0 and down.stdout.startswith(f"stopped the stack of pid {up.pid}"), down.stderr
            again = subprocess.run([sys.executable, "-m", "plantml", "stack", "down", "--env-file", str(env_file)],
                                   capture_output=True, text=True, timeout=60)
            assert again.returncode == 0 and "nothing to stop" in again.stdout  # down already: no error
    finally:
        rest = stop(up, signum)
    output = "".join(lines) + rest
    assert up.returncode == 0, output[-2000:]
    assert not env_file.exists()
    workdir = Path(re.search(r"data:\s+(\S+)", output).group(1))
    assert len(stack_processes) >= 3
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stack_processes)
    assert not workdir.exists() and "its data (runs, artifacts, models) went with it" in output


@pytest.mark.local_session
def test_a_run_a_failed_test_left_open_is_ended_before_the_sessions_stack_stops(tmp_path):
    """Was: the stack stopped first; at exit the run retried the stopped server for 60 s (pytest exited 80 s after
    "1 failed in 18 s"), then stayed RUNNING with its journal left behind."""
    (tmp_path / "test_downstream.py").write_text(textwrap.dedent("""
        from plantml.tracking import MLflowTracker

        def test_fails_mid_run(mlflow_env, experiment_name):
            tracker = MLflowTracker(experiment_name=experiment_name)
            tracker.start_run()
            tracker.log_metric("loss", 1.0, step=0)
            assert 1 == 2
    """))
    started = time.monotonic()
    session = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--stack", "local", "--stack-fast",
                              "-p", "no:xdist", "test_downstream.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")})
    took = time.monotonic() - started
    output = session.stdout + session.stderr
    assert session.returncode == 1 and "1 failed" in output, output[-3000:]
    assert "was never ended: ending it KILLED" in output, output[-3000:]  # at the stack's teardown, while it answers
    assert "could not end it" not in output and "Connection refused" not in output, output[-3000:]
    assert took < 50, f"{took:.0f} s: {output[-2000:]}"  # its stack's start and stop, no minute of retries
