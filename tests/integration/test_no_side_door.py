"""No side door: tried as another local user would, against a stack with auth on (the session's backend).

``ps`` shows every process's command line to every user: no secret of the stack may be
there. Every port the stack's processes listen on is found (not taken from a list) and
must be one the stack declares, on 127.0.0.1, and refuse to read or write data without
the stack's credentials: MLflow, PostgreSQL and S3 ask for them; SeaweedFS's master and
filer HTTP APIs are off, its volume server wants a signed JWT, its gRPC ports a client
certificate of the stack's own CA.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess

import psutil
import pytest
import requests

#: The first bytes a plain-text HTTP/2 (gRPC) client sends; a gRPC server without TLS answers with a SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


@pytest.fixture(scope="module")
def model_key(auth_stack) -> str:
    """A finished run of the auth stack with a model file among its artifacts (something to steal or replace): its key."""
    import mlflow

    client = mlflow.MlflowClient(auth_stack.tracking_uri)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in auth_stack.client_env().items():  # the admin user of the basic-auth app
            patch.setenv(name, value)
        run = client.create_run(client.create_experiment("side_doors"))
        client.log_param(run.info.run_id, "backbone", "resnet18")
        client.set_terminated(run.info.run_id)
    key = f"{artifact_prefix(run)}/models/best_model.pth"
    # Written with the stack's own S3 client: MLflow's caches the first credentials of the process.
    auth_stack.s3_client().put_object(Bucket=auth_stack.bucket, Key=key, Body=b"weights")
    return key


def artifact_prefix(run) -> str:
    """The run's artifact folder as an object-key prefix (``s3://mlflow/<exp>/<run>/artifacts`` -> ``<exp>/<run>/artifacts``)."""
    return run.info.artifact_uri.split("://", 1)[1].split("/", 1)[1]


def stack_pids(stack) -> set[int]:
    """Every process of the stack: each service's main process and its descendants."""
    pids = set()
    for service in stack.services.values():
        main = psutil.Process(service.process.pid)
        pids |= {main.pid} | {child.pid for child in main.children(recursive=True)}
    return pids


def listening(pids: set[int]) -> set[tuple[str, int]]:
    """Every TCP address the processes listen on."""
    found = set()
    for pid in pids:
        for conn in psutil.Process(pid).net_connections("inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.add((conn.laddr.ip, conn.laddr.port))
    return found


def test_no_command_line_on_the_machine_holds_a_secret_of_the_stack(auth_stack):
    secrets = auth_stack.secrets()
    command_lines = []
    for process in psutil.process_iter(["cmdline"]):
        command_lines.append(" ".join(process.info["cmdline"] or ()))
    assert any("mlflow" in line and "server" in line for line in command_lines)  # the scan saw the stack's processes
    assert [name for name, value in secrets.items() if any(value in line for line in command_lines)] == []


def test_plantml_ui_on_a_database_store_puts_its_password_on_no_command_line(auth_stack, tmp_path, monkeypatch):
    """``plantml ui`` serves a ``postgresql://user:password@…`` store (from the environment or ``.env``, never typed)."""
    from plantml.ui import LocalUI

    uri = auth_stack.endpoints.database_uri
    password = re.search(r"://[^:]+:([^@]+)@", uri).group(1)
    monkeypatch.chdir(tmp_path)
    with LocalUI(uri) as server:
        lines = [" ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"])]
        assert requests.get(f"{server.base_url}/health", timeout=10).status_code == 200  # it serves that store
    assert any(f"--port {server.port}" in line for line in lines)  # the scan saw the UI's server
    assert [line for line in lines if password in line] == []
    assert not (tmp_path / "mlflow.db").exists()  # it served the database, not a default store of its own


def test_another_user_cannot_read_the_environment_of_the_stacks_processes(auth_stack):
    if os.geteuid() != 0:
        pytest.fail("this check plays another local user through runuser, which needs root")
    for name, service in auth_stack.services.items():
        peek = subprocess.run(["runuser", "-u", "nobody", "--", "cat", f"/proc/{service.process.pid}/environ"],
                              capture_output=True, text=True, timeout=30)
        assert peek.returncode != 0 and "Permission denied" in peek.stderr, name


def test_another_local_user_can_read_no_file_of_the_stack(auth_stack):
    """Credentials, TLS keys, the database, the objects, the logs: ``nobody`` opens every path and reads none."""
    if os.geteuid() != 0:
        pytest.fail("this check plays another local user through runuser, which needs root")
    files = [str(path) for path in auth_stack.folder.path.rglob("*") if path.is_file()]
    assert len(files) > 20 and any(path.endswith("credentials.json") for path in files)
    peek = subprocess.run(["runuser", "-u", "nobody", "--", "sh", "-c",
                           'for f; do head -c1 "$f" >/dev/null 2>&1 && echo "$f"; done; true', "sh", *files],
                          capture_output=True, text=True, timeout=120)
    assert peek.returncode == 0 and peek.stdout == "", peek.stdout[:2000]


@pytest.mark.local_session  # a container's processes write into the container's own file system
def test_the_stacks_processes_write_no_file_outside_its_folder(auth_stack):
    """Logs included: SeaweedFS's glog wrote each line again into world-readable ``weed.*`` files in $TMPDIR, which
    no rotation bounded and no stop removed (its access key, folders and ports, for any local user to read)."""
    inside = f"{auth_stack.folder.path}{os.sep}"
    written = {(psutil.Process(pid).name(), file.path) for pid in stack_pids(auth_stack)
               for file in psutil.Process(pid).open_files() if file.mode != "r"}
    assert ("weed", f"{inside}logs/s3.log") in written  # the scan sees what the object store writes
    assert sorted(entry for entry in written if not entry[1].startswith(inside)) == []

def test_every_listening_port_is_declared_and_on_loopback(auth_stack):
    declared = {port for service in auth_stack.services.values() for port in service.spec.ports.values()}
    found = listening(stack_pids(auth_stack))
    assert {ip for ip, _ in found} == {"127.0.0.1"}
    assert {port for _, port in found} == declared


def test_mlflow_postgres_and_s3_refuse_requests_without_the_stacks_credentials(auth_stack, model_key):
    import psycopg2

    stack = auth_stack
    for method, path in (("GET", "/api/2.0/mlflow/experiments/search?max_results=5"),
                         ("POST", "/api/2.0/mlflow/experiments/create")):
        assert requests.request(method, stack.tracking_uri + path, json={"name": "intruder"}, timeout=10).status_code == 401
    for user in ("mlflow", "postgres"):
        with pytest.raises(psycopg2.OperationalError, match="password"):
            psycopg2.connect(host="127.0.0.1", port=stack.services["postgres"].spec.port, user=user, dbname="mlflow",
                             connect_timeout=5)
    for method, key in (("GET", ""), ("GET", model_key), ("PUT", model_key), ("PUT", "intruder.txt")):
        answer = requests.request(method, f"{stack.s3_endpoint}/{stack.bucket}/{key}", data=b"x", timeout=10)
        assert answer.status_code == 403, (method, key, answer.status_code)


def test_the_object_stores_other_http_ports_read_and_write_nothing_without_credentials(auth_stack, model_key):
    ports = auth_stack.services["s3"].spec.ports
    if auth_stack.spec.s3.flavour != "seaweedfs":
        pytest.fail("this scan knows SeaweedFS's ports; add the MinIO console's before running it on MinIO")
    run_folder = f"/buckets/{auth_stack.bucket}/{model_key.rsplit('/', 2)[0]}/"
    tries = {
        "master.port": [("GET", "/dir/assign"), ("GET", "/dir/lookup?volumeId=1"), ("GET", "/col/delete?collection=mlflow"),
                        ("GET", "/vol/status"), ("POST", "/submit")],
        "filer.port": [("GET", run_folder), ("GET", run_folder + "?metadata=true"), ("POST", run_folder + "intruder.txt"),
                       ("DELETE", run_folder)],
        "volume.port": [("GET", "/1,0100000000"), ("POST", "/1,0100000000"), ("DELETE", "/1,0100000000")],
        "admin.port": [("GET", "/api/cluster/volumes"), ("GET", "/")],
    }
    for role, requests_to_try in tries.items():
        for method, path in requests_to_try:
            answer = requests.request(method, f"http://127.0.0.1:{ports[role]}{path}", files={"file": ("x", b"evil")},
                                      timeout=10, allow_redirects=True)
            assert answer.status_code in (401, 403, 404, 405), (role, method, path, answer.status_code, answer.text[:200])
    s3 = auth_stack.s3_client()
    listing = s3.list_objects_v2(Bucket=auth_stack.bucket, Prefix=model_key.rsplit("/", 2)[0])
    assert [item["Key"] for item in listing["Contents"]] == [model_key]  # nothing slipped in
    assert s3.get_object(Bucket=auth_stack.bucket, Key=model_key)["Body"].read() == b"weights"  # nor replaced


@pytest.mark.parametrize("role", ["master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc",
                                  "admin.port.grpc"])
def test_every_grpc_port_wants_a_client_certificate_of_the_stacks_own_ca(auth_stack, role):
    port = auth_stack.services["s3"].spec.ports[role]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        plain.sendall(H2_PREFACE)
        try:
            answer = plain.recv(64)
        except OSError:
            answer = b""
    assert not answer.startswith(b"\x00\x00"), "a plain-text gRPC client got an HTTP/2 SETTINGS frame"
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|certificate required"):
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as tls:
            tls.sendall(H2_PREFACE)
            tls.recv(64)
