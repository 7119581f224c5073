"""``mlflow models serve -m models:/NAME@production`` answers /invocations with the model's predictions.

Request format (pickled PyTorch model with a tensor signature ``float32 (-1, 3, -1, -1)``)::

    POST /invocations   Content-Type: application/json
    {"inputs": [[[[r, ...], ...], [[g, ...]], [[b, ...]]], ...]}   # N x 3 x H x W floats

answered by ``{"predictions": [[logit_0, logit_1], ...]}`` (one row per image).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from _models import CODE_PATHS, TinyNet
from _processes import stop_group

from plantml.registry import ModelRegistry
from plantml.training.models import image_batch_signature

SERVE_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def production_model(mlflow_stack: Any) -> tuple[str, TinyNet]:
    """A tiny model registered and promoted to the production alias."""
    from plantml.tracking import MLflowTracker

    name = f"served_plants_{uuid.uuid4().hex[:8]}"
    torch.manual_seed(7)
    model = TinyNet().eval()
    signature = image_batch_signature(2)
    tracker = MLflowTracker(
        tracking_uri=mlflow_stack.tracking_uri,
        experiment_name=f"test_serving_{uuid.uuid4().hex[:8]}",
        s3_endpoint=mlflow_stack.s3_endpoint,
        aws_access_key=mlflow_stack.aws_access_key,
        aws_secret_key=mlflow_stack.aws_secret_key,
    )
    with tracker.start_run(run_name="served"):
        info = tracker.log_model(model, registered_model_name=name, input_example=torch.rand(2, 3, 32, 32).numpy(), signature=signature,
                                 code_paths=CODE_PATHS)
    ModelRegistry(mlflow_stack.tracking_uri).promote(name, info.registered_model_version, "Production")
    return name, model


def serve_command(mlflow_stack: Any, name: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The design's ``mlflow models serve`` of ``name``'s production alias on ``port``, and its environment."""
    bin_dir = str(Path(sys.executable).parent)  # the server execs `uvicorn`, which lives beside python
    env = {**os.environ, **mlflow_stack.client_env(), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    return ([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@production",
             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"], env)


@pytest.fixture(scope="module")
def serving(mlflow_stack: Any, production_model: tuple[str, TinyNet],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mlflow models serve`` on the production alias; yields its base URL and its process."""
    name, _ = production_model
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    command, env = serve_command(mlflow_stack, name, port)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {process.returncode}: {Path(log.name).read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve not ready after {SERVE_TIMEOUT_S} s: {Path(log.name).read_text()[-2000:]}")
            time.sleep(1)
        yield url, process
    finally:
        if process.poll() is None:  # the last test stops it itself
            stop_group(process)
        log.close()


@pytest.fixture(scope="module")
def served(serving: tuple[str, subprocess.Popen]) -> str:
    """The base URL of :func:`serving`'s server."""
    return serving[0]


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (3, 3, 40, 36)], ids=["example-size", "other-size"])
def test_invocations_answer_the_production_models_predictions(served: str, production_model: tuple[str, TinyNet], shape: tuple[int, ...]) -> None:
    _, model = production_model
    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    response = requests.post(f"{served}/invocations", json={"inputs": batch.tolist()}, timeout=60)
    assert response.status_code == 200, response.text
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(np.array(response.json()["predictions"], dtype=np.float32), expected, atol=1e-5)


def test_a_running_server_keeps_the_version_it_started_with_when_the_alias_moves(
    served: str, production_model: tuple[str, TinyNet], mlflow_stack: Any
) -> None:
    """What the README says: the alias is read once, at the server's start; a promotion needs a restart."""
    from plantml.tracking import MLflowTracker

    name, model = production_model
    tracker = MLflowTracker(tracking_uri=mlflow_stack.tracking_uri, experiment_name=f"test_serving_{uuid.uuid4().hex[:8]}",
                            s3_endpoint=mlflow_stack.s3_endpoint, aws_access_key=mlflow_stack.aws_access_key,
                            aws_secret_key=mlflow_stack.aws_secret_key)
    torch.manual_seed(8)
    with tracker.start_run(run_name="next"):
        info = tracker.log_model(TinyNet().eval(), registered_model_name=name, signature=image_batch_signature(2),
                                 code_paths=CODE_PATHS)
    registry = ModelRegistry(mlflow_stack.tracking_uri)
    registry.promote(name, info.registered_model_version, "Production")
    try:
        batch = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
        response = requests.post(f"{served}/invocations", json={"inputs": batch.tolist()}, timeout=60)
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(np.array(response.json()["predictions"], dtype=np.float32), expected, atol=1e-5)
    finally:
        registry.rollback(name)


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (b'{"inputs": [[[[0.1', "application/json", 400),
    (b'{"inputs": "\xff\xfe"}', "application/json", 400),
    (b'{"inputs": [[[0.1, 0.2]]]}', "application/json", 400),
    (b'{"inputs": [[[[0.1]], [[0.2]]]]}', "application/json", 400),
    (b'{"inputs": []}', "application/json", 400),
    (b'{"inputs": [[[["leaf"]]]]}', "application/json", 400),
    (b'{"inputs": [[[[0.1]]]]}', "text/plain", 415),
], ids=["cut-json", "not-utf8", "rank-3", "two-channels", "empty-batch", "strings", "text-plain"])
def test_a_bad_request_is_a_4xx_with_its_reason_and_the_server_answers_the_next(served: str, body: bytes, content_type: str,
                                                                              status: int) -> None:
    refused = requests.post(f"{served}/invocations", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert refused.status_code == status, refused.text
    if status == 400:  # MLflow's reason, in JSON
        assert refused.json()["message"], refused.text
    else:  # a line of text naming the types it takes
        assert "application/json" in refused.text and "'text/plain'" in refused.text
    good = np.zeros((1, 3, 32, 32), dtype=np.float32)
    assert requests.post(f"{served}/invocations", json={"inputs": good.tolist()}, timeout=60).status_code == 200


@pytest.mark.local_session  # the server's own behaviour: the same on either backend
def test_nan_or_inf_pixels_are_answered_with_nan_logits_written_as_nan(served: str) -> None:
    batch = np.zeros((2, 3, 32, 32), dtype=np.float32)
    batch[0, 0, 0, 0], batch[1, 2, 5, 5] = np.nan, np.inf
    body = "{\"inputs\": " + json.dumps(batch.tolist()) + "}"  # Python's json writes NaN and Infinity, as numpy clients do
    answered = requests.post(f"{served}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert answered.status_code == 200, answered.text
    predictions = np.array(json.loads(answered.text)["predictions"], dtype=np.float64)
    assert "NaN" in answered.text and np.isnan(predictions[0]).all() and not np.isfinite(predictions[1]).any(), answered.text


@pytest.mark.local_session  # the server's own behaviour: the same on either backend
def test_a_taken_port_is_exit_1_and_sigterm_answers_the_request_in_flight_then_stops(
        serving: tuple[str, subprocess.Popen], production_model: tuple[str, TinyNet], mlflow_stack: Any) -> None:
    """The README's two last words on the server (last in this file: it stops the module's server)."""
    import http.client

    url, process = serving
    command, env = serve_command(mlflow_stack, production_model[0], int(url.rsplit(":", 1)[1]))
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=SERVE_TIMEOUT_S)
    assert second.returncode == 1 and "address already in use" in (second.stdout + second.stderr).lower()

    batch = np.random.default_rng(2).random((400, 3, 32, 32), dtype=np.float32)  # about 12 MB of JSON: seconds to read
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
    connection.request("POST", "/invocations", body=json.dumps({"inputs": batch.tolist()}),
                       headers={"Content-Type": "application/json"})  # returns once the whole body is sent
    os.killpg(process.pid, signal.SIGTERM)
    response = connection.getresponse()
    assert response.status == 200 and len(json.loads(response.read())["predictions"]) == 400
    connection.close()
    process.wait(timeout=60)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/ping", timeout=5)
