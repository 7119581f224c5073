"""``plantml train`` under torchrun against the real stack: one run for the whole job, sent by rank 0 alone.

Real torchrun processes (gloo on the CPU), read back with plain MLflow. Collected only in
the local-backend session (``conftest.LOCAL_SESSION_ONLY``): what is tested is the client
side, which is the same whichever backend runs the stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from plantml.cli import main
from plantml.training import synth

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
EPOCH_METRICS = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate"]
EPOCHS = 8
TRAIN = ["train", "--epochs", str(EPOCHS), "--image-size", "32", "--weights", "none", "--num-workers", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    """40 healthy and 33 diseased leaves: 51/11/11 train/val/test. Odd sizes, so a share padded as
    DistributedSampler pads would count an image twice."""
    root = synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=40, size=32, seed=0))
    for extra in sorted((root / "diseased").glob("*.png"))[33:]:
        extra.unlink()
    return root


@pytest.fixture
def job_env(mlflow_env, tmp_path):
    """The stack's variables for child processes; gloo on the loopback interface (tests talk to 127.0.0.1 only)."""
    return {**os.environ, **mlflow_env.client_env(), "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1",
            "PLANTML_JOURNAL_DIR": str(tmp_path / "journal")}


@pytest.fixture
def marker():
    """A word in every command line of one job: finds its processes, and kills any left (by pid) after the test."""
    word = f"ddp-{uuid.uuid4().hex[:10]}"
    yield word
    for process in processes_with(word):
        process.kill()


def processes_with(word: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if word in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def only_run(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    [run] = client.search_runs([experiment.experiment_id])
    return run


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_torchrun_two_processes_make_one_run_that_agrees_with_one_process(
        leaves, job_env, mlflow_client, experiment_name, tmp_path):
    """Two gloo ranks with 32 images each per step against one process with 64: the same global batch.

    What must be equal, by design, is asserted exactly: the split sizes, the learning-rate
    series, and the test metrics, which must be the registered model's over the whole test
    split, each image once (evaluated here in one process; 1e-4 relative covers float32
    sums taken in another order).

    What may legitimately differ: batch norm normalises over each rank's 26 images instead of
    the 51 of one process, the sampler's order and the augmentation draws differ, and one
    image is repeated to even the two shares. With a batch as large as the split, each
    epoch is one optimizer step from the same initial model in both runs, so the two
    trajectories stay close; per-epoch losses still jump (one step, augmented images), so
    the comparison is the mean training loss over the 8 epochs. Measured on this set for
    seeds 1 to 8, it was 0.22 to 0.34, and the two runs differed by 0.01 to 0.09 (two
    processes always a little higher: batch norm over half the images). The tolerance,
    0.15, is that largest gap with room for another machine's float order, and well below
    the gap to a run that learns nothing (which stays near ln 2 = 0.69).
    """
    name = f"ddp_{uuid.uuid4().hex[:8]}_plant_classifier"
    workdir = tmp_path / "job"
    workdir.mkdir()
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "plantml", *TRAIN,
                          "--batch-size", "32", "--data-dir", str(leaves), "--experiment-name", experiment_name,
                          "--registered-model-name", name, "--run-name", "two_ranks"],
                         env=job_env, capture_output=True, text=True, timeout=300, cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(workdir.iterdir()) == []  # no rank wrote a file where it ran (no local store, no output)
    journals = Path(job_env["PLANTML_JOURNAL_DIR"])
    assert not journals.exists() or not [p for p in journals.rglob("*") if p.is_file()]  # delivered, none left

    run = only_run(mlflow_client, experiment_name)  # one run: rank 1 created no tracker
    assert run.info.status == "FINISHED" and run.info.run_name == "two_ranks"
    params = run.data.params
    assert (params["world_size"], params["batch_size"], params["global_batch_size"]) == ("2", "32", "64")
    assert (params["train_size"], params["val_size"], params["test_size"]) == ("51", "11", "11")
    assert run.data.tags["distributed_backend"] == "gloo"
    for key in EPOCH_METRICS:  # each epoch logged once
        assert steps(mlflow_client, run.info.run_id, key) == list(range(1, EPOCHS + 1)), key
    [version] = mlflow_client.search_model_versions(f"name='{name}'")  # registered once
    assert version.run_id == run.info.run_id
    # rank 0 alone prints
    assert out.stdout.count("best epoch") == 1 and out.stdout.count(f"/{EPOCHS}  train_loss") == EPOCHS
    assert out.stderr.count("data: leaves") == 1 and "x 2 processes (gloo, 64 images per step)" in out.stderr

    # the logged test metrics are the registered model's, over the 11 test images, each counted once
    import mlflow.pytorch
    import torch

    from plantml.training.config import TrainConfig
    from plantml.training.loop import evaluate
    from plantml.training.run import prepare

    model = mlflow.pytorch.load_model(f"models:/{name}/{version.version}").eval()
    prepared = prepare(TrainConfig(data_dir=leaves, image_size=32, weights="none", num_workers=0, seed=3, batch_size=4))
    test, _ = evaluate(model, prepared.loaders.test, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    assert test.samples == 11
    assert run.data.metrics["test_loss"] == pytest.approx(test.loss, rel=1e-4)
    assert run.data.metrics["test_accuracy"] == pytest.approx(test.accuracy)

    # one process on the same seed, with the same global batch
    single_experiment = f"{experiment_name}_single"
    assert main([*TRAIN, "--batch-size", "64", "--data-dir", str(leaves), "--experiment-name", single_experiment,
                 "--no-register"]) == 0
    single = only_run(mlflow_client, single_experiment)
    assert single.data.params["world_size"] == "1" and single.data.params["train_size"] == "51"

    def series(r, key):
        return [m.value for m in sorted(mlflow_client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)]

    assert series(run, "learning_rate") == series(single, "learning_rate")
    two, one = (sum(series(r, "train_loss")) / EPOCHS for r in (run, single))
    assert two < 0.45 and one < 0.45, (two, one)  # both learned (ln 2 = 0.69 is a coin toss)
    assert two == pytest.approx(one, abs=0.15)


def test_a_failing_rank_ends_the_run_failed_and_leaves_no_process(leaves, job_env, mlflow_client, experiment_name,
                                                                  marker):
    name = f"ddp_{uuid.uuid4().hex[:8]}_plant_classifier"
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "plantml", *TRAIN,
                          "--batch-size", "32", "--data-dir", str(leaves), "--experiment-name", experiment_name,
                          "--registered-model-name", name, "--run-name", marker],
                         env={**job_env, "PLANTML_TEST_FAIL_AT": "1:2"}, capture_output=True, text=True, timeout=300)

    assert out.returncode == 1
    assert processes_with(marker) == []
    run = only_run(mlflow_client, experiment_name)
    assert run.info.status == "FAILED"
    assert run.data.tags["failed_rank"] == "1" and "failure injected on rank 1 at epoch 2" in run.data.tags["failure"]
    assert steps(mlflow_client, run.info.run_id, "val_loss") == [1]
    assert mlflow_client.search_model_versions(f"name='{name}'") == []
    # rank 0 names the culprit in one line, once
    line = "plantml: error: rank 1 of 2 failed: RuntimeError: failure injected on rank 1 at epoch 2 (PLANTML_TEST_FAIL_AT)"
    assert out.stderr.count(line) == 1, out.stderr[-3000:]


@pytest.mark.parametrize("launcher, stop", [("plantml --nproc", signal.SIGTERM), ("torchrun", signal.SIGINT),
                                             ("torchrun", signal.SIGTERM)],
                         ids=["sigterm-to-plantml-nproc", "ctrl-c-to-torchrun", "sigterm-to-torchrun"])
def test_stopping_the_job_ends_the_run_killed_and_leaves_no_process(launcher, stop, leaves, job_env, mlflow_client,
                                                                   experiment_name, marker):
    """The job stopped after epoch 1: SIGTERM to ``plantml train --nproc 2`` (torchrun's agent in plantml
    itself), or SIGINT to torchrun, which is what Ctrl-C sends it (its ranks run in sessions of their own), or
    SIGTERM to torchrun, which is what a batch scheduler sends at the end of a job's time."""
    start = ([sys.executable, "-m", "plantml", *TRAIN, "--nproc", "2"] if launcher == "plantml --nproc"
             else [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "plantml", *TRAIN])
    job = subprocess.Popen([*start, "--epochs", "60", "--batch-size", "32", "--data-dir", str(leaves),
                            "--experiment-name", experiment_name, "--no-register", "--run-name", marker],
                           env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in job.stdout:
            seen.append(line)
            if line.startswith("epoch 1/60"):
                break
        else:
            pytest.fail("".join(seen)[-3000:])
        job.send_signal(stop)
        rest, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()

    if launcher == "plantml --nproc":
        assert job.returncode == 128 + signal.SIGTERM, rest[-3000:]
        assert "plantml: stopped by SIGTERM" in rest
    else:
        assert job.returncode != 0, rest[-3000:]
    assert processes_with(marker) == []
    run = only_run(mlflow_client, experiment_name)
    assert run.info.status == "KILLED"
    assert "failed_rank" not in run.data.tags
    # rank 0 says it ended the run; the other rank stops silently
    assert [line for line in rest.splitlines() if line.startswith("plantml: interrupted")] == [
        f"plantml: interrupted by {stop.name}; run {run.info.run_id} ended KILLED, everything delivered"], rest[-3000:]


def test_a_server_rank_0_cannot_reach_stops_every_rank_before_any_run(leaves, tmp_path, marker):
    """An input error on one rank (here: rank 0's tracker) stops all ranks at once, each with one line."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
           "PLANTML_JOURNAL_DIR": str(tmp_path / "journal")}
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "plantml", *TRAIN,
                          "--data-dir", str(leaves), "--run-name", marker],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    assert out.returncode == 1
    assert processes_with(marker) == []
    errors = [line for line in out.stderr.splitlines() if line.startswith("plantml: error:")]
    assert len(errors) == 2, out.stderr[-3000:]
    own = next(line for line in errors if "rank 0 of 2 failed" not in line)
    assert "127.0.0.1:9" in own  # rank 0 names the server
    assert f"plantml: error: rank 0 of 2 failed: {own.removeprefix('plantml: error: ')}" in errors  # rank 1 names rank 0
    assert "[rank0]" not in out.stderr and "[rank1]" not in out.stderr  # no rank printed a traceback


def test_a_rank_0_killed_outright_has_its_run_ended_killed_by_the_launcher_with_what_it_logged(
        leaves, job_env, mlflow_client, experiment_name, marker):
    """kill -9 of rank 0 (the out-of-memory killer; or torch's agent, when a stop finds rank 0 stuck in a
    collective with a hung peer): no handler runs, so ``plantml train --nproc`` ends the run from its journal."""
    job = subprocess.Popen([sys.executable, "-m", "plantml", *TRAIN, "--nproc", "2", "--epochs", "60", "--batch-size",
                            "32", "--data-dir", str(leaves), "--experiment-name", experiment_name, "--no-register",
                            "--run-name", marker],
                           env=job_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in job.stdout:
            seen.append(line)
            if line.startswith("epoch 2/60"):
                break
        else:
            pytest.fail("".join(seen)[-3000:])
        [rank_0] = [child for child in psutil.Process(job.pid).children() if child.environ().get("RANK") == "0"]
        rank_0.kill()
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()

    assert job.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert processes_with(marker) == []
    run = only_run(mlflow_client, experiment_name)
    assert run.info.status == "KILLED", err[-3000:]
    assert steps(mlflow_client, run.info.run_id, "val_loss")[:2] == [1, 2]  # what it logged before the kill
    assert f"{run.info.run_id} ended KILLED" in err
    assert err.strip().splitlines()[-1] == "plantml: error: rank 0 of 2 was killed by SIGKILL", err[-3000:]
