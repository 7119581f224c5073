"""Training on several processes: shares of the data, failures named across ranks, torchrun's signals.

The last test starts two real gloo processes with torchrun (no tracking stack): they must
take the same decisions and end with the same model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import torch

from plantml.errors import ConfigError, DataError, RankFailed
from plantml.training import synth
from plantml.training.device_data import DeviceLoader
from plantml.training.distributed import Ranks, rank_info, why_stopped
from plantml.training.sharding import ShardSampler, rank_share


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 5, 6, 7])
def test_evaluation_shares_hold_every_image_exactly_once(size, world_size):
    shares = [list(ShardSampler(size, rank, world_size)) for rank in range(world_size)]

    assert sorted(i for share in shares for i in share) == list(range(size))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("size, world_size", [(7, 2), (10, 4), (2, 3), (12, 3)])
def test_training_shares_are_equal_and_cover_the_split(size, world_size):
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0))
    shares = [rank_share(order, rank, world_size, pad=True) for rank in range(world_size)]

    assert len({len(share) for share in shares}) == 1  # as many batches on every rank: DDP steps them together
    seen = torch.cat(shares).tolist()
    assert set(seen) == set(range(size))
    assert len(seen) - size == (-size) % world_size  # only the padding repeats


def test_the_device_loader_gives_each_rank_its_share():
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 2, 2).contiguous()
    labels = torch.arange(7)

    def loader(rank, train):
        return DeviceLoader(images, labels, batch_size=2, device=torch.device("cpu"), train=train, seed=3,
                            ranks=Ranks(rank=rank, world_size=2))

    evaluated = [label for rank in (0, 1) for _, batch in loader(rank, False) for label in batch.tolist()]
    assert sorted(evaluated) == list(range(7))
    trained = [[label for _, batch in loader(rank, True) for label in batch.tolist()] for rank in (0, 1)]
    assert len(trained[0]) == len(trained[1]) == 4 and set(trained[0] + trained[1]) == set(range(7))
    assert [len(loader(rank, True)) for rank in (0, 1)] == [2, 2]


def test_outside_torchrun_a_process_is_rank_0_of_1(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    ranks = rank_info()

    assert ranks == Ranks() and ranks.is_main and not ranks.distributed


def test_torchrun_variables_give_the_place_and_nonsense_is_one_line(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_info() == Ranks(rank=3, world_size=4, local_rank=1)

    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4, WORLD_SIZE=4"):
        rank_info()


def pair_on_one_store():
    """Rank 0 and rank 1 of a job, sharing a key-value store (no process group needed for the store)."""
    store = torch.distributed.HashStore()
    return Ranks(rank=0, world_size=2, store=store), Ranks(rank=1, world_size=2, store=store)


def test_the_first_published_failure_is_the_one_named():
    rank0, rank1 = pair_on_one_store()
    assert rank0.peer_failure() is None

    rank1.publish_failure(DataError("data folder /nowhere: not found"))
    rank0.publish_failure(RuntimeError("Connection closed by peer"))  # a consequence, not the cause

    failure = rank0.peer_failure()
    assert isinstance(failure, RankFailed)
    assert str(failure) == "rank 1 of 2 failed: data folder /nowhere: not found"
    assert failure.rank == 1 and failure.exit_code == DataError.exit_code
    assert rank1.peer_failure() is None  # its own failure is not a peer's


def test_a_failure_the_first_rank_publishes_after_its_cache_step_does_not_stop_the_rank_waiting_for_that_step():
    """Was (seen in a CI run on two loaded cores): rank 1, waiting for rank 0 to fill the cache, looked for the end of that
    step a moment before rank 0 ended it, then found the failure rank 0 met just after (its input check, which rank 1
    would meet too): rank 1 raised it as "rank 0 of 2 failed: …", and the command printed the error twice."""
    from plantml.errors import UsageError

    first, second = pair_on_one_store()
    first = replace(first, local_rank=0)
    second = replace(second, local_rank=1)

    class LooksJustBefore:
        """Rank 1's store: rank 0 ends its step and fails right after rank 1's first look for the step's end."""

        def __init__(self, store):
            self.store, self.looked = store, False

        def check(self, keys):
            seen = self.store.check(keys)
            if not self.looked:
                self.looked = True
                first.local_main_first(lambda: "filled")
                first.publish_failure(UsageError("2 training images give each of 2 processes one image a step"))
            return seen

        def __getattr__(self, name):
            return getattr(self.store, name)

    second = replace(second, store=LooksJustBefore(second.store))

    assert second.local_main_first(lambda: "read") == "read"  # on to its own input check, and agree()
    assert str(second.peer_failure()) == "rank 0 of 2 failed: 2 training images give each of 2 processes one image a step"


def test_a_stop_is_not_published_as_a_failure():
    rank0, rank1 = pair_on_one_store()
    rank1.publish_failure(KeyboardInterrupt())

    assert rank0.peer_failure() is None


def test_a_single_process_has_no_peers_and_no_store():
    Ranks().publish_failure(RuntimeError("x"))

    assert Ranks().peer_failure() is None


def test_why_stopped_blames_the_peer_that_failed_first_else_the_signal_else_the_error():
    from plantml.errors import Interrupted

    rank0, rank1 = pair_on_one_store()
    broken = RuntimeError("Connection closed by peer")
    sigterm = Interrupted(signal.SIGTERM)

    assert why_stopped(rank0, broken, None) is broken  # FAILED, its own error
    assert why_stopped(rank0, broken, sigterm) is sigterm  # torchrun stopped the job: KILLED
    rank1.publish_failure(MemoryError("out of memory"))
    assert isinstance(why_stopped(rank0, sigterm, sigterm), RankFailed)  # a peer failed: FAILED


def test_nproc_starts_the_same_command_without_nproc(monkeypatch, tmp_path):
    import plantml.training.launch as launch
    from plantml.cli import main

    started = {}
    monkeypatch.setattr(launch, "launch", lambda nproc, args: started.update(nproc=nproc, args=args) or 0)
    for name in ("healthy", "diseased"):  # the launcher checks a local folder has classes before any rank starts
        (tmp_path / name).mkdir()

    code = main(["--debug", "train", "--nproc", "3", "--epochs", "2", "--no-amp", "--freeze-backbone",
                 "--data-dir", str(tmp_path), "--learning-rate", "0.01"])

    assert code == 0 and started["nproc"] == 3
    assert started["args"] == ["-m", "plantml", "--debug", "train", "--epochs", "2", "--learning-rate", "0.01",
                               "--freeze-backbone", "--data-dir", str(tmp_path), "--no-amp"]


WORKER = textwrap.dedent("""
    import json, sys, time
    from dataclasses import replace
    from pathlib import Path
    import torch
    from plantml.errors import DataError, RankFailed
    from plantml.training import distributed
    from plantml.training.config import Reporter, TrainConfig
    from plantml.training.run import fit, prepare

    data, out = sys.argv[1], sys.argv[2]
    with distributed.session("cpu") as ranks:
        # 1. a bad input on rank 1 only: every rank stops, rank 0 names rank 1 and its exit code
        try:
            ranks.agree(lambda: 1 / 0 if ranks.rank == 1 else "fine")
            agreed = "went on"
        except RankFailed as exc:
            agreed = [str(exc), exc.exit_code]
        except ZeroDivisionError:
            agreed = "own error"
        ranks = replace(ranks, store=torch.distributed.PrefixStore("training", ranks.store))  # a clean slate
        # 2. a cache the machine's first rank fills (slowly) before the other reads it
        cache = Path(out) / "cache.txt"

        def fill_or_read():
            if ranks.local_rank == 0:
                time.sleep(1)
                return cache.write_text("filled")
            return cache.read_text()

        read = ranks.local_main_first(fill_or_read)
        try:  # 3. the same data on every machine, or no training
            ranks.require_same("same", "the data")
            ranks.require_same(f"files of rank {ranks.rank}", "the data")
            differ = "went on"
        except DataError as exc:
            differ = str(exc)

        # 4. one training on both ranks, backbone frozen then unfrozen, early stopping on
        config = TrainConfig(data_dir=data, epochs=6, batch_size=4, image_size=32, weights="none", num_workers=0,
                             seed=5, freeze_backbone=True, unfreeze_epoch=2, early_stopping_patience=1,
                             output_dir=f"{out}/outputs-of-rank{ranks.rank}")
        prepared = prepare(config, ranks)
        initial = prepared.model.conv1.weight.detach().clone()
        trained = []  # the backbone after each epoch (the kept epoch may be the frozen one)

        class Watch(Reporter):
            def epoch_end(self, record):
                trained.append(prepared.model.conv1.weight.detach().double().sum().item())

        result = fit(prepared, None, Watch())
        weights = torch.cat([p.detach().flatten() for p in prepared.model.parameters()])
    json.dump({"agreed": agreed, "differ": differ, "read": read, "history": {k: result.history[k] for k in ("epoch", "train_loss", "val_loss", "val_accuracy",
               "learning_rate", "best_epoch", "stopped_early", "test_loss", "test_accuracy", "confusion_matrix")},
               "checksum": weights.double().sum().item(), "first": weights[:5].tolist(),
               "backbone_moved": trained[-1] != initial.double().sum().item(), "trained": trained,
               "sizes": prepared.loaders.split.sizes()},
              open(f"{out}/rank{ranks.rank}.json", "w"))
""")


def test_two_gloo_ranks_decide_alike_and_end_with_the_same_model(tmp_path):
    data = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=12, size=32, seed=0))
    for extra in sorted((data / "diseased").glob("*.png"))[9:]:
        extra.unlink()  # 12 + 9 images: odd splits, so a padded share would count an image twice
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "worker.py"), str(data), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)

    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["agreed"] == ["rank 1 of 2 failed: ZeroDivisionError: division by zero", 1]
    assert rank1["agreed"] == "own error"
    assert rank0["differ"] == rank1["differ"] == ("the data differs between rank 0 and rank 1 of 2 (files of ran… and files of ran…): "
                                                  "every machine needs the same files")
    assert rank1["read"] == "filled"
    assert (tmp_path / "outputs-of-rank0" / "best_model.pth").is_file() and not (tmp_path / "outputs-of-rank1").exists()
    assert rank0["history"] == rank1["history"]  # same metrics, same kept epoch, same stop, same schedule
    assert rank0["history"]["stopped_early"] and len(rank0["history"]["epoch"]) < 6
    assert rank0["checksum"] == rank1["checksum"] and rank0["first"] == rank1["first"]
    assert rank0["backbone_moved"] and rank0["trained"] == rank1["trained"]  # unfreezing rebuilt DDP: the backbone
    # trained, and in step on both ranks
    sizes, history = rank0["sizes"], rank0["history"]
    assert history["confusion_matrix"] and sum(map(sum, history["confusion_matrix"])) == sizes["test_size"]
    for accuracy in history["val_accuracy"]:  # each validation image counted once: a whole number of them right
        assert accuracy * sizes["val_size"] == pytest.approx(round(accuracy * sizes["val_size"]))


LAUNCHER = textwrap.dedent("""
    from plantml.errors import RankFailed
    from plantml.training.launch import launch
    try:
        launch(2, ["-c", "import os, sys; sys.exit(3 if os.environ['RANK'] == '1' else 0)"])
    except RankFailed as exc:
        print(f"{exc}|{exc.rank}|{exc.exit_code}")
""")


def test_nproc_names_the_rank_that_failed_with_its_exit_code_and_keeps_no_files(tmp_path):
    # in a child process: torchrun's agent installs its own signal handlers where it runs
    out = subprocess.run([sys.executable, "-c", LAUNCHER], env={**os.environ, "TMPDIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)

    assert out.stdout.strip().splitlines()[-1] == "rank 1 of 2 exited with code 3 (its error is above)|1|3", out.stderr
    assert list(tmp_path.iterdir()) == []  # the agent's error-file folder is gone


def test_a_process_that_claims_peers_but_has_no_rendezvous_is_one_line(monkeypatch, capsys, tmp_path):
    from plantml.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for label in ("healthy", "diseased"):  # a folder that passes the checks made before torch is imported
        (tmp_path / label).mkdir()
    assert main(["train", "--no-mlflow", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MASTER_ADDR=None and MASTER_PORT=None name no rendezvous" in err[0]


def test_nproc_checks_its_flags_once_before_starting_any_rank(capsys, tmp_path):
    from plantml.cli import main

    started = time.monotonic()
    assert main(["train", "--nproc", "2", "--no-mlflow", "--learning-rate", "nan"]) == 2
    assert main(["train", "--nproc", "2", "--no-mlflow", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "plantml: error: --learning-rate nan: must be a finite number",
        f"plantml: error: data folder {tmp_path / 'nowhere'}: not found"]
    assert time.monotonic() - started < 10  # no rank was started (each costs seconds)


def test_ranks_of_one_training_image_each_are_refused_at_sizes_batch_norm_cannot_train(tmp_path):
    folder = synth.generate(tmp_path / "tiny", synth.SynthSpec(per_class=3, size=32, seed=0))  # 2 training images
    done = subprocess.run([sys.executable, "-m", "plantml", "train", "--nproc", "2", "--no-mlflow", "--epochs", "1",
                           "--image-size", "32", "--weights", "none", "--data-dir", str(folder)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    # both ranks fail with the same error: one line says it (rank 0's), not one per rank and the launcher's
    assert done.stderr.strip().splitlines() == [
        "plantml: error: 2 training images give each of 2 processes one image a step, and batch norm cannot train on "
        "one image at --image-size 32: use fewer processes, more images, or --image-size 33 or more"]


def test_ranks_stop_when_the_nproc_launcher_is_killed_outright_and_its_folder_is_swept(tmp_path):
    import psutil

    from plantml.staging import sweep

    folder = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=8, size=32, seed=0))
    (tmp_path / "tmp").mkdir()
    launcher = subprocess.Popen([sys.executable, "-m", "plantml", "train", "--nproc", "2", "--no-mlflow", "--epochs",
                                 "1000", "--image-size", "32", "--weights", "none", "--data-dir", str(folder)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "TMPDIR": str(tmp_path / "tmp"), "GLOO_SOCKET_IFNAME": "lo"})
    ranks = []
    try:
        for line in launcher.stdout:
            if line.startswith("epoch 1/"):
                break
        ranks = psutil.Process(launcher.pid).children()
        launcher.kill()  # kill -9: no clean-up of its own, as the out-of-memory killer does it
        launcher.wait()
        _, alive = psutil.wait_procs(ranks, timeout=30)
    finally:
        launcher.kill()
        for rank in ranks:
            with contextlib.suppress(psutil.Error):
                rank.kill()
    assert len(ranks) == 2 and alive == [], "ranks train on after their launcher was killed"
    assert len(sweep(tmp_path / "tmp")) == 1 and list((tmp_path / "tmp").iterdir()) == []


def test_a_rank_whose_launcher_died_asks_its_gone_store_nothing_and_ends_as_stopped(monkeypatch):
    asked = []

    class GoneStore:  # torch's TCPStore prints a C++ warning and its stack when its server has gone
        def check(self, keys):
            asked.append(keys)
            raise RuntimeError("Connection reset by peer")

    ended = subprocess.Popen(["true"])
    ended.wait()
    monkeypatch.setenv("PLANTML_LAUNCHER_PID", str(ended.pid))
    ranks = Ranks(rank=0, world_size=2, store=GoneStore())
    assert ranks.peer_failure() is None and asked == []
    # its death stops every rank: a peer that stopped first broke the connection, and the run is KILLED, not FAILED
    stop = why_stopped(ranks, RuntimeError("[gloo/pair.cc:545] Read error: Connection reset by peer"), None)
    assert isinstance(stop, KeyboardInterrupt) and stop.exit_code == 128 + signal.SIGTERM

PAIR = textwrap.dedent("""
    import os, signal, sys, torch
    from plantml.training import distributed
    with distributed.session("cpu") as ranks:
        if ranks.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer: no word left in the store
        try:
            for _ in range(100):
                ranks.sum_across(torch.ones(1))
        except RuntimeError as exc:
            print(distributed.why_stopped(ranks, exc, None).__class__.__name__, distributed.why_stopped(ranks, exc, None))
""")


def test_a_peer_killed_outright_is_one_line_naming_the_lost_connection():
    import port_for

    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port_for.select_random())}
    pair = [subprocess.Popen([sys.executable, "-c", PAIR], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    out, err = pair[0].communicate(timeout=120)
    assert pair[1].wait(timeout=30) == -signal.SIGKILL
    assert out.startswith("RankFailed rank 0 of 2 lost its connection to another rank, which ended without saying why "
                          "(killed?): "), err
    assert len(out.strip().splitlines()) == 1 and "gloo/" not in out


HUNG_PAIR = textwrap.dedent("""
    import os, signal, sys, torch
    from plantml.training import distributed
    with distributed.session("cpu") as ranks:
        ranks.sum_across(torch.ones(1))
        if ranks.rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)  # alive but silent: stopped, swapped out, deadlocked
        try:
            for _ in range(100):
                ranks.sum_across(torch.ones(1))
        except RuntimeError as exc:
            print(distributed.why_stopped(ranks, exc, None).__class__.__name__, distributed.why_stopped(ranks, exc, None))
""")


def test_a_hung_peer_fails_the_other_rank_after_the_collective_timeout_naming_it():
    """A SIGSTOPped rank breaks no connection: the other waited in its collective for torch's 30 minutes,
    saying nothing. ``PLANTML_COLLECTIVE_TIMEOUT`` bounds that wait, and the line names the silent rank."""
    import port_for

    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port_for.select_random()), "PLANTML_COLLECTIVE_TIMEOUT": "3"}
    pair = [subprocess.Popen([sys.executable, "-c", HUNG_PAIR], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        started = time.monotonic()
        out, err = pair[0].communicate(timeout=90)
        elapsed = time.monotonic() - started
    finally:
        for process in pair:
            process.kill()
            process.wait()
    assert out == ("RankFailed rank 0 of 2 waited 3 s in a collective for rank 1, which never answered (hung or "
                   "stopped?); PLANTML_COLLECTIVE_TIMEOUT sets that wait\n"), err[-2000:]
    assert elapsed < 60, elapsed


def test_the_collective_timeout_is_torchs_unless_set(monkeypatch):
    from datetime import timedelta

    from plantml.training.distributed import collective_timeout

    monkeypatch.delenv("PLANTML_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == {}  # torch's own: long first batches and checkpoint writes stay safe
    monkeypatch.setenv("PLANTML_COLLECTIVE_TIMEOUT", "90")
    assert collective_timeout() == {"timeout": timedelta(seconds=90)}
    monkeypatch.setenv("PLANTML_COLLECTIVE_TIMEOUT", "0")
    with pytest.raises(ConfigError, match="PLANTML_COLLECTIVE_TIMEOUT='0': must be above 0"):
        collective_timeout()


def test_nproc_shows_none_of_the_agents_own_log_lines(monkeypatch):
    import logging

    import torch.distributed.launcher.api as launcher_api

    import plantml.training.launch as launch

    shown = []

    def agent(config, entrypoint):
        agent_logger = logging.getLogger("torch.distributed.elastic.agent.server.api")  # its level set on import
        return lambda *args: shown.append(agent_logger.isEnabledFor(logging.WARNING))

    monkeypatch.setattr(launcher_api, "elastic_launch", agent)
    assert launch.launch(2, ["-m", "plantml", "train"]) == 0
    assert shown == [False]  # "Received 2 death signal, shutting down workers" and the like stay unsaid
    assert logging.getLogger("plantml").isEnabledFor(logging.WARNING)  # and logging is back afterwards


def test_nproc_listens_on_the_loopback_address_only_and_gives_each_rank_one_thread(tmp_path):
    """torch's c10d rendezvous binds its two stores on every address; plantml's binds them on 127.0.0.1. Where the
    user set no OMP_NUM_THREADS, each rank gets 1, as under torchrun (else N ranks each take every core)."""
    import psutil

    folder = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=8, size=32, seed=0))
    launcher = subprocess.Popen([sys.executable, "-m", "plantml", "train", "--nproc", "2", "--no-mlflow", "--epochs",
                                 "1000", "--image-size", "32", "--weights", "none", "--data-dir", str(folder)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
                                     "GLOO_SOCKET_IFNAME": "lo"})
    try:
        for line in launcher.stdout:
            if line.startswith("epoch 1/"):
                break
        processes = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children()]
        listening = [(process.pid, connection.laddr.ip) for process in processes
                     for connection in process.net_connections(kind="inet") if connection.status == psutil.CONN_LISTEN]
        threads = [process.environ().get("OMP_NUM_THREADS") for process in processes]
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.communicate(timeout=60)
    assert launcher.pid in {pid for pid, _ in listening}  # the agent's stores were seen
    assert {ip for _, ip in listening} == {"127.0.0.1"}, listening
    assert threads == [None, "1", "1"]  # the launcher as the user started it; its two ranks
