"""Signals sent to a real ``plantml train`` after its second epoch, against the real stack.

SIGTERM (CI timeouts, Kubernetes, Slurm), SIGHUP (a closed terminal), SIGINT (Ctrl-C, once,
or twice while the server hangs) and SIGKILL (the OOM killer). Each time the run must end
KILLED, with every epoch the process printed before the signal stored exactly once: at
once for the first three (one line on stderr, the exit status naming the signal, no
traceback); through the next ``plantml train`` or ``plantml tracking recover`` for the
last two, which leave work in the journal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from plantml.testing.faults import FaultProxy
from plantml.training import synth

EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate")


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=20, size=24, seed=0))


@pytest.fixture
def proxy(mlflow_stack):
    with FaultProxy(mlflow_stack.tracking_uri) as proxy:
        yield proxy


def train_command(leaves, experiment_name: str, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "plantml", "train", "--epochs", str(epochs), "--batch-size", "8", "--image-size", "16",
            "--weights", "none", "--num-workers", "0", "--no-register", "--early-stopping-patience", "100",
            "--data-dir", str(leaves), "--experiment-name", experiment_name, *extra]


@pytest.fixture
def training(leaves, mlflow_stack, experiment_name, tmp_path, request):
    """Start ``plantml train`` for many epochs; return it once it printed its second epoch.

    Indirectly parametrizable with environment variables; ``"proxy"`` as the tracking URI
    means the fault proxy's (the stack's by default).
    """
    env = {**os.environ, **mlflow_stack.client_env(), "PLANTML_JOURNAL_DIR": str(tmp_path / "journal"),
           "PLANTML_CACHE_DIR": str(tmp_path / "cache"), **getattr(request, "param", {})}
    if env["MLFLOW_TRACKING_URI"] == "proxy":
        env["MLFLOW_TRACKING_URI"] = request.getfixturevalue("proxy").url
    command = train_command(leaves, experiment_name, 40)
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed: list[int] = []
    deadline = time.monotonic() + 180
    while len(printed) < 2 and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("epoch "):
            printed.append(int(line.split()[1].split("/")[0]))
    assert printed == [1, 2], f"plantml train did not reach epoch 2: {process.stderr.read() if process.poll() is not None else ''}"
    yield process, printed, env
    if process.poll() is None:
        process.kill()
        process.wait()


def finish(process, printed: list[int]) -> tuple[int, str]:
    out, err = process.communicate(timeout=120)
    printed += [int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith("epoch ")]
    return process.returncode, err


def only_run(client, experiment_name):
    """The run of the training under test (the first one, when a second training follows)."""
    runs = client.search_runs([client.get_experiment_by_name(experiment_name).experiment_id], order_by=["attributes.start_time ASC"])
    return runs[0]


def assert_printed_epochs_stored_once(client, run_id: str, printed: list[int]) -> None:
    for key in EPOCH_KEYS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: a step stored twice: {sorted(steps)}"
        assert set(printed) <= set(steps), f"{key}: printed {printed}, stored {sorted(steps)}"
        assert set(steps) - set(printed) <= {max(printed) + 1}  # logged, the signal came before its line


def recover(env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plantml", "tracking", "recover"], env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_ends_the_run_killed_with_every_printed_epoch(signum, training, mlflow_client, experiment_name):
    process, printed, _ = training
    process.send_signal(signum)
    code, err = finish(process, printed)

    run = only_run(mlflow_client, experiment_name)
    lines = [line for line in err.splitlines() if not line.startswith("data: ")]
    assert code == 128 + signum, err
    assert lines == [f"plantml: interrupted by {signal.Signals(signum).name}; run {run.info.run_id} ended KILLED, "
                     "everything delivered"], err
    assert run.info.status == "KILLED"
    assert run.data.tags["plantml.error.type"] == "Interrupted"
    assert_printed_epochs_stored_once(mlflow_client, run.info.run_id, printed)


@pytest.mark.parametrize("training, signals, bound", [
    ({"MLFLOW_TRACKING_URI": "proxy"}, 2, 8),  # Ctrl-C twice: the second cuts the wait short
    ({"MLFLOW_TRACKING_URI": "proxy", "PLANTML_SIGNAL_TIMEOUT": "2"}, 1, 12),  # once: the wait has its bound
], indirect=["training"], ids=["twice", "once"])
def test_ctrl_c_while_the_server_hangs_ends_in_bounded_time_and_the_next_training_recovers_the_run(
        training, signals, bound, proxy, leaves, mlflow_client, experiment_name, tmp_path):
    process, printed, env = training
    proxy.inject("hang", times=None, hold_s=30)  # from now on the server never answers
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    if signals == 2:
        time.sleep(1.5)  # the run's end is waiting on the hung server
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
    code, err = finish(process, printed)
    assert time.monotonic() - started < bound, "the wait for the hung server was not cut short"
    assert code == 130 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if not line.startswith("data: ")]
    assert line.startswith("plantml: interrupted by SIGINT; run ") and "the rest is kept in" in line, err
    assert proxy.mangled["hang"] >= 1
    run = only_run(mlflow_client, experiment_name)
    assert run.info.status == "RUNNING" and list((tmp_path / "journal").glob("*.jsonl"))
    if signals == 2:
        return  # the journal left is the same either way: one of the two is recovered below

    proxy.clear()  # the server is back; the next training delivers the journal first
    following = subprocess.run(train_command(leaves, experiment_name, 1), env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)

    assert following.returncode == 0, following.stderr
    assert f"plantml: warning: recovered 1 journal(s) left by processes that died: {run.info.run_id} ended KILLED" in following.stderr
    assert mlflow_client.get_run(run.info.run_id).info.status == "KILLED"
    assert_printed_epochs_stored_once(mlflow_client, run.info.run_id, printed)
    assert not list((tmp_path / "journal").glob("*.jsonl"))


def test_sigkill_leaves_a_journal_that_recover_delivers_exactly_once(training, mlflow_client, experiment_name, tmp_path):
    process, printed, env = training
    process.kill()
    finish(process, printed)
    run = only_run(mlflow_client, experiment_name)
    assert run.info.status == "RUNNING"  # what the OOM killer leaves: no process to end it
    [journal] = (tmp_path / "journal").glob("*.jsonl")

    dry = subprocess.run([sys.executable, "-m", "plantml", "tracking", "recover", "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=180)
    assert f"would recover {journal}: run {run.info.run_id}" in dry.stdout and journal.exists()
    recovered = recover(env)

    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert recovered.stdout.startswith(f"run {run.info.run_id}: delivered ") and "ended KILLED" in recovered.stdout
    stored = mlflow_client.get_run(run.info.run_id)
    assert stored.info.status == "KILLED" and "journal of pid" in stored.data.tags["plantml.recovered"]
    assert_printed_epochs_stored_once(mlflow_client, run.info.run_id, printed)
    assert not journal.exists()


def test_sigterm_while_a_pushed_set_downloads_is_one_line_and_leaves_no_staging_folder(mlflow_stack, tmp_path):
    """The object store answers slowly (each image request held 2 s): SIGTERM lands mid-download, before any run."""
    from plantml.datasets.remote import push

    folder = synth.generate(tmp_path / "set", synth.SynthSpec(per_class=6, size=16, seed=1))
    uri = f"s3://data/sigterm-{tmp_path.name}"
    push(mlflow_stack.s3_client(), folder, uri)
    cache = tmp_path / "cache"
    with FaultProxy(mlflow_stack.s3_endpoint) as proxy:
        proxy.inject("hang", times=None, hold_s=2, when=lambda r: r.method == "GET" and r.path.endswith(".png"))
        env = {**os.environ, **mlflow_stack.client_env(), "MLFLOW_S3_ENDPOINT_URL": proxy.url, "PLANTML_CACHE_DIR": str(cache)}
        command = [sys.executable, "-m", "plantml", "train", "--no-mlflow", "--epochs", "1", "--image-size", "16",
                   "--weights", "none", "--data-dir", uri]
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not proxy.mangled["hang"]:  # a held image request means the download has begun
            assert process.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.01)
        staged = [path.name for path in (cache / "datasets").iterdir() if path.name.startswith(".")]
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)

    assert staged, "no staging folder while the set downloaded"
    assert process.returncode == 128 + signal.SIGTERM, err
    assert [line for line in err.splitlines() if line.strip()] == ["plantml: interrupted by SIGTERM"], err
    assert "epoch" not in out
    assert not [path.name for path in (cache / "datasets").iterdir() if path.name.startswith(".")]
