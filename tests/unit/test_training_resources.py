"""A training that runs out of the machine's memory: one line naming the flags to change, the run FAILED.

The worker deaths are real: the data set's worker process kills itself with the signal the kernel would send
(SIGKILL: the out-of-memory killer; SIGBUS: a /dev/shm too small for its batches).
"""

from __future__ import annotations

import os
import signal

import mlflow
import pytest
import torch

from plantml.cli import main
from plantml.training import synth

TINY = ["--epochs", "1", "--batch-size", "8", "--image-size", "32", "--weights", "none"]


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("data") / "leaves", synth.SynthSpec(per_class=12, size=32, seed=0))


ENDED = ("ended unexpectedly: killed by the kernel's out-of-memory killer, or by SIGBUS for a /dev/shm too small, most "
         "likely; at --batch-size 8 and --image-size 32 with --num-workers 1, try fewer workers or a smaller "
         "--batch-size (--num-workers 0 shows any other error in the training's own process)")


def the_run(store: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run


@pytest.mark.parametrize(("signum", "cause"), [
    (signal.SIGKILL, "was killed by SIGKILL: the kernel's out-of-memory killer, most likely; at --batch-size 8 and "
                     "--image-size 32 with --num-workers 1, try fewer workers or a smaller --batch-size"),
    (signal.SIGBUS, "was killed by SIGBUS: shared memory (/dev/shm) too small for the batches it hands over, most "
                    "likely (a container's is 64 MB unless given --shm-size); give it more, or use --num-workers 0"),
], ids=["SIGKILL", "SIGBUS"])
def test_a_data_loading_worker_killed_is_one_line_with_its_likely_cause(leaves, tmp_path, monkeypatch, capsys,
                                                                         signum, cause):
    """Was torch's traceback ending ``RuntimeError: DataLoader worker (pid N) is killed by signal: Killed.``"""
    from plantml.training.data import ImageSamples

    read = ImageSamples.__getitem__

    def killed_in_a_worker(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signum)
        return read(self, index)

    monkeypatch.setattr(ImageSamples, "__getitem__", killed_in_a_worker)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    code = main(["train", "--data-dir", str(leaves), *TINY, "--num-workers", "1", "--tracking-uri", store])

    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("plantml: error:")]
    # torch says how the worker died when its SIGCHLD handler saw it first, else only that it exited
    assert line.startswith("plantml: error: a data-loading worker (pid ")
    assert line.endswith(cause) or line.endswith(ENDED), line
    run = the_run(store)
    assert run.info.status == "FAILED" and run.data.tags["plantml.error.type"] == "RuntimeError"  # torch's own error


def test_out_of_gpu_memory_is_one_line_naming_the_sizes(leaves, tmp_path, monkeypatch, capsys):
    """The error torch raises is made here (no GPU on this machine): the one line and the FAILED run are plantml's."""
    import plantml.training.run as run_module

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 1.50 GiB is free. Of the allocated memory …")

    monkeypatch.setattr(run_module, "train_one_epoch", out_of_memory)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    code = main(["train", "--data-dir", str(leaves), *TINY, "--num-workers", "0", "--tracking-uri", store])

    assert code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "plantml: error: out of GPU memory at --batch-size 8 and --image-size 32 (CUDA out of memory. Tried to allocate "
        "2.00 GiB): try a smaller --batch-size or --image-size")
    run = the_run(store)
    assert run.info.status == "FAILED" and run.data.tags["plantml.error.type"] == "OutOfMemoryError"


def test_an_error_that_is_no_lack_of_memory_keeps_its_traceback(leaves, tmp_path, monkeypatch):
    """A bug is shown as one: only the machine's limits are turned into one line."""
    import plantml.training.run as run_module

    def bug(*args, **kwargs):
        raise RuntimeError("shapes do not match")

    monkeypatch.setattr(run_module, "train_one_epoch", bug)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        main(["train", "--data-dir", str(leaves), *TINY, "--num-workers", "0", "--no-mlflow"])


@pytest.mark.parametrize(("said", "shown"), [
    ("DataLoader worker (pid 12) is killed by signal: Killed. ", "was killed by SIGKILL: the kernel's out-of-memory"),
    ("DataLoader worker (pid 12) is killed by signal: Bus error. It is possible that dataloader's workers are out of "
     "shared memory.", "was killed by SIGBUS: shared memory (/dev/shm) too small"),
    ("DataLoader worker (pid 12) is killed by signal: Segmentation fault. ", "was killed by SIGSEGV: run with"),
    ("DataLoader worker (pid(s) 12, 13) exited unexpectedly", "ended unexpectedly: killed by the kernel's"),
])
def test_each_of_torchs_words_for_a_dead_worker_gets_its_cause(said, shown):
    """torch's messages as its C++ signal handler (strsignal's words) and its Python side write them."""
    from plantml.training.failures import resource_failure

    failure = resource_failure(RuntimeError(said), 8, 32, 1)
    assert failure is not None and str(failure).startswith("a data-loading worker (pid 12") and shown in str(failure)
