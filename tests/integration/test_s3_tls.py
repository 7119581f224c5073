"""The object store behind HTTPS on a private CA: plantml's own S3 clients take MLflow's settings for it.

A TLS terminator on 127.0.0.1, its certificate signed by a throwaway CA, in front of the session stack's S3 port.
MLflow's S3 client checks that certificate against ``AWS_CA_BUNDLE``, or not at all with ``MLFLOW_S3_IGNORE_TLS=true``;
``plantml data push`` (and every other S3 client of plantml's) must reach the store with either, and name them when
it cannot. The pushed manifest is read back with plain boto3 over the stack's own http endpoint.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from plantml.errors import ConfigError
from plantml.stack.tls import make_mutual_tls
from plantml.tracking import DeliveryPending, MLflowTracker
from plantml.training import synth

pytestmark = pytest.mark.local_session


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def https_s3(mlflow_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``https://127.0.0.1:PORT`` in front of the stack's S3 endpoint, and its CA's certificate file."""
    folder = tmp_path_factory.mktemp("https-s3")
    tls = make_mutual_tls("plantml-test-s3")
    (folder / "ca.pem").write_bytes(tls.ca_cert)
    (folder / "cert.pem").write_bytes(tls.cert)
    (folder / "key.pem").write_bytes(tls.key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    target = urlsplit(mlflow_stack.endpoints.s3_endpoint)
    loop = asyncio.new_event_loop()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    server = loop.run_until_complete(asyncio.start_server(relay, "127.0.0.1", 0, ssl=context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}", folder / "ca.pem"
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def leaves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=3, size=16, seed=3))


def push(mlflow_stack: Any, https_s3: tuple[str, Path], leaves: Path, destination: str, **tls: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **mlflow_stack.client_env(), "MLFLOW_S3_ENDPOINT_URL": https_s3[0], **tls}
    for name in ("AWS_CA_BUNDLE", "MLFLOW_S3_IGNORE_TLS", "REQUESTS_CA_BUNDLE"):
        if name not in tls:
            env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "plantml", "data", "push", str(leaves), destination],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("setting", ["AWS_CA_BUNDLE", "MLFLOW_S3_IGNORE_TLS"])
def test_data_push_reaches_an_https_store_on_a_private_ca_with_mlflows_setting(
        setting: str, mlflow_stack: Any, https_s3: tuple[str, Path], leaves: Path, s3_client: Any) -> None:
    prefix = f"tls-{uuid.uuid4().hex[:8]}"
    value = str(https_s3[1]) if setting == "AWS_CA_BUNDLE" else "true"
    pushed = push(mlflow_stack, https_s3, leaves, f"s3://data/{prefix}", **{setting: value})
    assert pushed.returncode == 0, pushed.stderr
    keys = {item["Key"] for item in s3_client.list_objects_v2(Bucket="data", Prefix=f"{prefix}/")["Contents"]}
    assert f"{prefix}/plantml-dataset.json" in keys and len(keys) == 7  # the manifest and 3 images of each class


def test_an_s3_certificate_not_trusted_is_one_line_naming_mlflows_settings(
        mlflow_stack: Any, https_s3: tuple[str, Path], leaves: Path) -> None:
    pushed = push(mlflow_stack, https_s3, leaves, f"s3://data/tls-{uuid.uuid4().hex[:8]}")
    assert pushed.returncode != 0
    lines = pushed.stderr.strip().splitlines()
    assert len(lines) == 1 and "CERTIFICATE_VERIFY_FAILED" in lines[0], pushed.stderr
    assert "AWS_CA_BUNDLE" in lines[0] and "MLFLOW_S3_IGNORE_TLS" in lines[0]


def test_a_training_whose_s3_certificate_is_not_trusted_is_refused_before_it_starts(
        mlflow_env: Any, https_s3: tuple[str, Path], experiment_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, ca = https_s3
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("PLANTML_JOURNAL_DIR", str(tmp_path / "journal"))
    for name in ("AWS_CA_BUNDLE", "MLFLOW_S3_IGNORE_TLS", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    tracker = MLflowTracker(experiment_name=experiment_name)
    with pytest.raises(ConfigError) as refused:  # what `plantml train` and `verify` ask before their work
        tracker.check_artifact_access()
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"object store {endpoint} (artifacts at s3://")
    assert "CERTIFICATE_VERIFY_FAILED" in message and "AWS_CA_BUNDLE" in message and "MLFLOW_S3_IGNORE_TLS" in message
    # A tracker used directly, without that question: its run's end says why the artifact is still pending, and how
    # to get past it (botocore's own text named neither setting).
    tracker.start_run()
    tracker.log_text("a note", "note.txt")
    with pytest.raises(DeliveryPending) as pending:
        tracker.end_run(timeout=3)
    assert "CERTIFICATE_VERIFY_FAILED" in str(pending.value) and "AWS_CA_BUNDLE" in str(pending.value), pending.value
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    tracker.check_artifact_access()  # trusted with MLflow's own setting
