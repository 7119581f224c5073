"""The stack's service descriptions and endpoints, without starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from plantml.errors import ConfigError
from plantml.stack import MLflowServerSpec, PostgresSpec, S3Spec, StackEndpoints, StackSpec
from plantml.stack.mlflow_server import mlflow_service
from plantml.stack.postgres import postgres_service
from plantml.stack.s3 import SEAWEED_PORTS, s3_service
from plantml.stack.service import Network

ROOT = Path("/srv/plantml-stack")


def describe(spec: StackSpec) -> list:
    """The three descriptions of ``spec`` on fixed ports, on loopback."""
    network = Network()
    ports = {role: 20000 + i for i, role in enumerate(spec.s3.port_roles)}
    return [
        postgres_service(spec.postgres, ROOT / "postgres", 15432, network),
        s3_service(spec.s3, ROOT / "s3", ports, network),
        mlflow_service(spec.mlflow, ROOT / "mlflow", 15000, network, spec.postgres, 15432, spec.s3, ports["s3.port"]),
    ]


def test_the_backend_uri_names_psycopg2_explicitly():
    uri = PostgresSpec(password="pw").sqlalchemy_uri("127.0.0.1", 5432)
    assert uri == "postgresql+psycopg2://mlflow:pw@127.0.0.1:5432/mlflow"


def test_direct_mode_is_the_designs_default_artifact_root():
    args = MLflowServerSpec("direct").server_args("mlflow", "127.0.0.1", 5001)
    assert args[args.index("--default-artifact-root") + 1] == "s3://mlflow/"
    assert "--artifacts-destination" not in args


def test_proxied_mode_serves_artifacts_through_the_server():
    args = MLflowServerSpec("proxied").server_args("mlflow", "127.0.0.1", 5001)
    assert args[args.index("--artifacts-destination") + 1] == "s3://mlflow"
    assert "--default-artifact-root" not in args


def test_the_server_runs_one_worker_with_the_job_runner_off():
    spec = MLflowServerSpec()
    args = spec.server_args("b", "h", 1)
    assert args[args.index("--workers") + 1] == "1"
    assert spec.server_env("db", "http://s3", S3Spec())["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_an_unknown_artifact_mode_is_refused_naming_it():
    with pytest.raises(ConfigError, match="'mirror'"):
        MLflowServerSpec("mirror")  # type: ignore[arg-type]


def test_an_empty_s3_secret_is_refused():
    with pytest.raises(ConfigError, match="s3"):
        S3Spec(secret_key="")


def test_every_stack_gets_fresh_credentials():
    assert S3Spec().secret_key != S3Spec().secret_key
    assert PostgresSpec().password != PostgresSpec().password


def test_endpoints_mask_the_s3_secret_and_the_database_password():
    endpoints = StackEndpoints("http://127.0.0.1:1", "http://127.0.0.1:2", "key", "s3-secret-xyz",
                               database_uri="postgresql+psycopg2://mlflow:db-pass-xyz@127.0.0.1:3/mlflow")
    shown = repr(endpoints)
    assert "s3-secret-xyz" not in shown and "db-pass-xyz" not in shown
    assert "mlflow:***@" in shown


def test_client_env_holds_exactly_the_client_variables_and_no_token_of_other_keys():
    endpoints = StackEndpoints("http://127.0.0.1:1", "http://127.0.0.1:2", "key", "secret")
    assert endpoints.client_env() == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:1",
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:2",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "",  # a shell's token (an AWS SSO login) would be sent with the stack's keys
        "AWS_SECURITY_TOKEN": "",
    }


# -- no secret on a command line (ps shows them to every local user) ----------------------------


@pytest.mark.parametrize("flavour", ["seaweedfs", "minio"])
def test_no_description_puts_a_secret_on_a_command_line(flavour):
    spec = StackSpec(s3=S3Spec(flavour=flavour), mlflow=MLflowServerSpec(auth=True))
    command_lines = " ".join(" ".join([*service.command, *(service.init or ())]) for service in describe(spec))
    assert "mlflow" in command_lines and "postgres" in command_lines  # the scan read real commands
    leaks = [name for name, value in spec.secrets().items() if value in command_lines]
    assert leaks == []


def test_the_database_password_reaches_mlflow_only_through_its_environment():
    spec = StackSpec()
    mlflow = describe(spec)[2]
    assert "--backend-store-uri" not in mlflow.command
    assert mlflow.env["MLFLOW_BACKEND_STORE_URI"] == spec.postgres.sqlalchemy_uri("127.0.0.1", 15432)


def test_mlflow_runs_the_launcher_written_into_its_folder_which_needs_only_mlflow():
    """The containers' image has MLflow but not plantml: the launcher the service runs imports nothing of plantml's."""
    import ast

    mlflow = describe(StackSpec())[2]
    assert mlflow.command[:4] == ("python", str(ROOT / "mlflow" / "mlflow_launch.py"), "--plantml-schema=check", "server")
    source = mlflow.files["mlflow_launch.py"]
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported == {"__future__", "json", "os", "sys", "typing", "mlflow", "uvicorn", "alembic"}


def test_no_description_shows_a_secret_in_its_repr():
    spec = StackSpec(mlflow=MLflowServerSpec(auth=True))
    shown = " ".join(repr(service) for service in describe(spec)) + repr(spec)
    assert [name for name, value in spec.secrets().items() if value in shown] == []


# -- durability --------------------------------------------------------------------------------------


def test_postgres_is_durable_by_default():
    postgres = describe(StackSpec())[0]
    assert {"fsync=on", "synchronous_commit=on", "full_page_writes=on"} <= set(postgres.command)
    assert "--no-sync" not in postgres.init


def test_the_fast_mode_turns_durability_off_only_when_asked():
    postgres = describe(StackSpec(postgres=PostgresSpec(durable=False)))[0]
    assert {"fsync=off", "synchronous_commit=off", "full_page_writes=off"} <= set(postgres.command)
    assert "--no-sync" in postgres.init


def test_postgres_listens_on_loopback_only_with_no_unix_socket_and_password_logins():
    postgres = describe(StackSpec())[0]
    assert "listen_addresses=127.0.0.1" in postgres.command
    assert "unix_socket_directories=" in postgres.command
    assert postgres.files["pg_hba.conf"] == "host all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n"
    assert postgres.refuses_root and postgres.ports == {"postgres": 15432}


# -- SeaweedFS: no side door ----------------------------------------------------------------------


def test_weed_opens_only_chosen_ports_with_its_http_apis_off():
    weed = describe(StackSpec(s3=S3Spec(flavour="seaweedfs")))[1]
    assert set(weed.ports) == set(SEAWEED_PORTS)
    assert {f"-{role}={port}" for role, port in weed.ports.items()} <= set(weed.command)
    assert {"-disableHttp", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false"} <= set(weed.command)


def test_weed_signs_volume_and_filer_access_with_four_distinct_jwt_keys():
    weed = describe(StackSpec(s3=S3Spec(flavour="seaweedfs")))[1]
    keys = [value for name, value in weed.env.items() if name.startswith("WEED_JWT_")]
    assert len(keys) == 4 and len(set(keys)) == 4 and all(len(key) == 64 for key in keys)


def test_weed_grpc_needs_a_certificate_signed_by_the_stacks_own_ca():
    from cryptography import x509

    weed = describe(StackSpec(s3=S3Spec(flavour="seaweedfs")))[1]
    assert weed.env["WEED_GRPC_CA"] == str(ROOT / "s3" / "tls" / "ca.crt")
    assert weed.env["WEED_GRPC_FILER_CERT"] == weed.env["WEED_GRPC_CLIENT_CERT"] == str(ROOT / "s3" / "tls" / "weed.crt")
    ca = x509.load_pem_x509_certificate(weed.files["tls/ca.crt"])
    cert = x509.load_pem_x509_certificate(weed.files["tls/weed.crt"])
    cert.verify_directly_issued_by(ca)  # raises when another CA signed it
    assert b"PRIVATE KEY" in weed.files["tls/weed.key"] and b"PRIVATE KEY" not in weed.files["tls/ca.crt"]
    # the CA's key signs and is gone: no file the service keeps could sign another certificate
    assert sorted(weed.files) == ["tls/ca.crt", "tls/weed.crt", "tls/weed.key"]


# -- buckets --------------------------------------------------------------------------------------------


def test_every_stack_creates_the_designs_four_buckets_by_default(monkeypatch):
    monkeypatch.delenv("PLANTML_S3_BUCKETS", raising=False)
    spec = S3Spec()
    assert spec.bucket == "mlflow"
    assert spec.buckets == ("mlflow", "models", "plants-images", "data")


def test_the_bucket_list_comes_from_one_setting_and_keeps_the_artifact_bucket(monkeypatch):
    monkeypatch.setenv("PLANTML_S3_BUCKETS", "images, data")
    assert S3Spec().buckets == ("mlflow", "images", "data")


def test_a_bad_bucket_name_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("PLANTML_S3_BUCKETS", "mlflow,Plant_Images")
    with pytest.raises(ConfigError, match="'Plant_Images'"):
        S3Spec()


# -- persistence --------------------------------------------------------------------------------------


def test_a_second_start_reuses_the_saved_credentials_and_keeps_its_own_options():
    first = StackSpec(mlflow=MLflowServerSpec(auth=True))
    second = StackSpec(postgres=PostgresSpec(durable=False), mlflow=MLflowServerSpec("proxied"))
    restored = second.with_credentials(first.credentials())
    assert restored.secrets() == first.secrets()
    assert restored.postgres.durable is False and restored.mlflow.artifact_mode == "proxied"


def test_a_failing_service_s_log_tail_reads_only_the_end_of_a_huge_log(tmp_path: Path) -> None:
    import tracemalloc

    from plantml.stack.host import HostProcess

    log = tmp_path / "s3.log"
    with open(log, "wb") as out:
        out.truncate(300 * 2**20)  # months of a service's log (sparse: no disk used)
        out.seek(0, 2)
        out.write(b"".join(b"line %d\n" % i for i in range(40)))
    process = HostProcess(s3_service(S3Spec(), tmp_path, dict.fromkeys(SEAWEED_PORTS, 1), Network()), log)
    tracemalloc.start()
    try:
        tail = process.log_tail(3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tail == "line 37\nline 38\nline 39"
    assert peak < 10 * 2**20, f"{peak / 2**20:.0f} MiB read to show 3 lines"


def test_a_log_past_its_limit_is_set_aside_and_the_service_writing_it_goes_on_from_its_start(tmp_path: Path) -> None:
    """A stack kept for months: SeaweedFS alone writes a few MB a day, and nothing rotated the logs."""
    import os
    import stat
    import subprocess
    import time

    from plantml.stack.host import HostProcess

    log = tmp_path / "s3.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as HostProcess.start opens it
    writer = subprocess.Popen(["sh", "-c", "while :; do echo 0123456789abcdef; done"], stdout=fd)
    os.close(fd)
    process = HostProcess(s3_service(S3Spec(), tmp_path, dict.fromkeys(SEAWEED_PORTS, 1), Network()), log)
    try:
        while log.stat().st_size <= 64 * 1024:
            time.sleep(0.01)
        process.trim_log(limit=64 * 1024)
        deadline = time.monotonic() + 30  # the service writes on into the file it holds (late, on a loaded machine)
        while log.stat().st_size < 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait()

    kept = log.with_name("s3.log.1")
    assert kept.stat().st_size > 64 * 1024 and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_bytes().startswith(b"0123456789abcdef\n")
    written = log.read_bytes()
    assert written.startswith(b"0123456789abcdef\n"), written[:40]  # from the start: no hole of zero bytes
    assert 0 < len(written) < kept.stat().st_size + 64 * 1024 * 50  # emptied, then written again
    process.trim_log(limit=10**9)  # under the limit: left as it is
    assert log.read_bytes() == written



def test_a_service_that_exits_0_while_starting_fails_its_start_at_once(tmp_path: Path) -> None:
    """``mlflow server`` ends with 0 when its port is taken: the start waited out its 90 s for it."""
    import time

    from plantml.errors import StackError
    from plantml.stack.host import HostProcess
    from plantml.stack.service import ServiceSpec

    spec = ServiceSpec(name="mlflow", command=("sh", "-c", "echo 'Address already in use'; exit 0"), folder=tmp_path,
                       port=1, ready=lambda: False, start_timeout=60)
    started = time.monotonic()
    with pytest.raises(StackError, match=r"^mlflow: exited while starting") as failed:
        HostProcess(spec, tmp_path / "mlflow.log").start()
    assert time.monotonic() - started < 10
    assert "Address already in use" in str(failed.value)
