"""A tracking URI that names another program's web server (a wrong port, a proxy's error page): one line saying the
answer is not MLflow's, where MLflow's client quoted the page's first line, and the registry said "not found"."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from plantml.cli import main

NOT_MLFLOW = ("with a web page for {endpoint}: not the answer of an MLflow tracking server (another program on this "
              "port, a wrong path, a proxy in between?)")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - its signature
        pass  # its access log would go to this test's stderr


@pytest.fixture(scope="module")
def web_server() -> Iterator[str]:
    """Python's own file server on 127.0.0.1: a 404 page for every MLflow GET, 501 for every POST."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("args", "start", "code", "endpoint"), [
    (["registry", "list"], "registered models: {uri}: HTTP 404", 1, "/api/2.0/mlflow/registered-models/search"),
    (["registry", "promote", "m", "1"], "registered model 'm': {uri}: HTTP 404", 1, "/api/2.0/mlflow/registered-models/get"),
    (["ui"], "{uri}: cannot read runs (HTTP 501", 1, "/api/2.0/mlflow/experiments/search"),
    (["train", "--epochs", "1", "--weights", "none", "--data-dir", "{leaves}"],
     "{uri}: cannot open experiment 'plant_classification': HTTP 404", 1, "/api/2.0/mlflow/experiments/get-by-name"),
], ids=["registry list", "registry promote", "ui", "train"])
def test_a_web_server_that_is_not_mlflow_is_one_line_saying_so(web_server, args, start, code, endpoint, capsys,
                                                               tmp_path, monkeypatch):
    from plantml.training import synth

    monkeypatch.chdir(tmp_path)  # the file server serves its own folder: nothing of this one
    leaves = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=6, size=16, seed=0)) if "train" in args else ""

    assert main([*(arg.format(leaves=leaves) for arg in args), "--tracking-uri", web_server]) == code

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"plantml: error: {start.format(uri=web_server)} {NOT_MLFLOW.format(endpoint=endpoint)}"), line


def test_mlflows_own_json_errors_are_left_as_mlflow_says_them():
    from mlflow.exceptions import MlflowException

    from plantml.errors import foreign_answer, one_line

    said = MlflowException("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 403 != 200. "
                           "Response body: '{\"error_code\": \"PERMISSION_DENIED\"}'")
    assert foreign_answer(said) is None and one_line(said) == str(said)


NOT_S3 = ("the object store at {endpoint} answered HTTP 404 with a web page, which no S3 server sends (another program "
          "on this port, a proxy in between?): check MLFLOW_S3_ENDPOINT_URL")


@pytest.mark.parametrize(("args", "where"), [
    (["data", "ls", "s3://data"], "s3://data"),
    (["data", "push", "{leaves}", "s3://data/set"], "s3://data/set"),
    (["train", "--no-mlflow", "--epochs", "1", "--weights", "none", "--data-dir", "s3://data/set"], "s3://data/set"),
], ids=["data ls", "data push", "train from s3"])
def test_an_s3_endpoint_that_is_another_web_server_is_one_line_saying_so(web_server, args, where, capsys, tmp_path,
                                                                         monkeypatch):
    """Was "no data set there (… not found; push one with `plantml data push`)" for train, a bare "404: … Not Found"
    for ls and push: the file server's 404 page read as a missing set or bucket."""
    from plantml.training import synth

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", web_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "plantml")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    leaves = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=3, size=16, seed=0))

    assert main([arg.format(leaves=leaves) for arg in args]) == 1

    err = capsys.readouterr().err
    assert err == f"plantml: error: {where}: {NOT_S3.format(endpoint=web_server)}\n"


def test_a_tracked_training_whose_artifact_store_is_another_web_server_stops_before_training(web_server):
    """The check a tracked training makes of a direct stack's object store, before its epochs: was passed over, so the
    model's upload failed only at the run's end."""
    from plantml.errors import ConfigError
    from plantml.settings import resolve_tracking_settings
    from plantml.tracking.connection import check_object_store_keys

    settings = resolve_tracking_settings("http://127.0.0.1:9", None, web_server, "plantml", "not-a-secret")
    with pytest.raises(ConfigError) as refused:
        check_object_store_keys(settings, "s3://mlflow/1")
    assert str(refused.value) == f"artifacts at s3://mlflow/1: {NOT_S3.format(endpoint=web_server)}; every upload would fail"


def test_a_model_whose_object_store_is_another_web_server_is_one_line_saying_so(web_server, capsys, tmp_path,
                                                                                monkeypatch):
    """MLflow wraps the page's 404 as "Failed to list artifacts in s3://…: Not Found": was "model 'm' version 1: not
    found", a version that is there."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("in_s3", artifact_location="s3://mlflow/in_s3"))
    client.create_registered_model("m")
    client.create_model_version("m", f"s3://mlflow/in_s3/{run.info.run_id}/artifacts/model", run.info.run_id)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", web_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "plantml")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")

    assert main(["registry", "load-check", "models:/m/1", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 1

    assert capsys.readouterr().err == f"plantml: error: model 'm' version 1: {NOT_S3.format(endpoint=web_server)}\n"


def test_an_external_stack_whose_s3_endpoint_is_another_web_server_says_so_not_that_its_bucket_is_missing(web_server):
    from plantml.errors import StackError
    from plantml.stack.endpoints import StackEndpoints
    from plantml.stack.external import check_bucket

    endpoints = StackEndpoints("http://127.0.0.1:9", web_server, "plantml", "not-a-secret")
    with pytest.raises(StackError) as refused:
        check_bucket(endpoints)
    assert NOT_S3.format(endpoint=web_server) in str(refused.value) and "does not exist" not in str(refused.value)
