"""Training on several processes: torchrun, DistributedDataParallel, and what the ranks must agree on.

torchrun starts one process per GPU (or several on a CPU) and tells each its place through
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. :func:`session` joins them into one process
group (NCCL on CUDA, gloo on the CPU) and hands the training a :class:`Ranks`, the one
object through which the rest of plantml sees the other processes:

- data: each rank iterates its own share of every split (:meth:`Ranks.train_sampler`,
  :meth:`Ranks.eval_sampler`, :mod:`plantml.training.sharding`);
- metrics: loss and accuracy sums are all-reduced (:meth:`Ranks.sum_across`), so every rank
  reads the same value over the whole split, and early stopping, the kept epoch and the
  learning-rate schedule come out the same everywhere;
- the model: wrapped in DDP for training (:meth:`Ranks.wrap`); before each evaluation rank
  0's batch-norm statistics are copied to all (:meth:`Ranks.broadcast_buffers`), so every
  rank evaluates the very model rank 0 keeps and registers;
- failures: a rank that fails writes why into the group's key-value store before it exits
  (:meth:`Ranks.publish_failure`), so the others, rank 0 above all since it ends the tracking
  run, name that rank (:meth:`Ranks.peer_failure`) rather than the broken connection or the
  SIGTERM torchrun sends them next.

A single process gets ``Ranks()`` (rank 0 of 1), on which every helper does nothing.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from plantml.errors import ConfigError, DataError, Interrupted, PlantmlError, RankFailed, UsageError
from plantml.processes import process_alive, process_start_time
from plantml.settings import env_number, env_value
from plantml.training.sharding import ShardSampler

T = TypeVar("T")

#: Key of the first failure published in the group's store (compare_set keeps the first writer's).
FIRST_FAILURE = "first_failure"


@dataclass(frozen=True)
class Ranks:
    """This process's place in a distributed training, and the group that connects the ranks.

    ``Ranks()`` is a single process. ``store`` is the process group's key-value store
    (``torch.distributed.Store``), set once :func:`start` has joined the group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl" or "gloo" once joined
    store: Any = field(default=None, repr=False, compare=False)

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one process that talks to MLflow and prints."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where tensors for collectives live: this rank's GPU under NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # -- what the training loop asks of the group ---------------------------------------

    def sum_across(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank, in place; every rank gets the same values."""
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (gradients averaged over the ranks), or itself alone.

        DDP syncs only the parameters that require a gradient when it is built: after
        unfreezing, wrap again.
        """
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.local_rank] if self.backend == "nccl" else None)

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (batch-norm statistics) to every rank.

        DDP broadcasts them before each training step, but the last step updates each
        rank's copy with its own batch; evaluation must see the one model rank 0 keeps.
        """
        if self.distributed:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def train_sampler(self, dataset: Any, seed: int) -> DistributedSampler | None:
        """This rank's share of a shuffled training split (None on a single process).

        Every rank gets as many images, so as many batches: DDP steps all ranks together,
        and a rank with one batch more would wait forever for the others. To even the
        shares, DistributedSampler repeats up to ``world_size - 1`` images, which that
        epoch trains on twice. The order is the same permutation on every rank (``seed``
        plus the epoch, see :func:`plantml.training.sharding.set_epoch`).
        """
        if not self.distributed:
            return None
        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed)

    def eval_sampler(self, dataset: Any) -> ShardSampler | None:
        """This rank's share of a validation or test split, without repeats (None on a single process)."""
        return ShardSampler(len(dataset), self.rank, self.world_size) if self.distributed else None

    # -- agreeing, and failing together -------------------------------------------------

    def agree(self, step: Callable[[], T]) -> T:
        """Run ``step`` on every rank; when it fails on any rank, it fails on all.

        Used before the tracking run starts: a bad input on one machine (a missing data
        folder, an unreachable server on rank 0) stops every rank there, and no run is
        created. The failing rank raises its own error; the others :class:`RankFailed`
        naming it, with its exit code. Where several failed with the same message (every rank read the same
        bad image), the first of them raises it and the others a quiet :class:`RankFailed`: one line, not N.
        """
        if not self.distributed:
            return step()
        error: Exception | None = None
        try:
            result = step()
        except Exception as exc:  # anything else (Ctrl-C) ends the process and, with it, the group
            error = exc
            self.publish_failure(exc)
        succeeded = torch.tensor([0 if error else 1], device=self.device)
        torch.distributed.all_reduce(succeeded, op=torch.distributed.ReduceOp.MIN)
        if succeeded.item():
            return result
        messages: list[Any] = [None] * self.world_size  # every rank knows one failed: each says what, if anything
        torch.distributed.all_gather_object(messages, None if error is None else str(error))
        if error is None:
            raise self.peer_failure() or RankFailed(f"{self}: another rank failed", rank=-1)
        first = next(rank for rank, message in enumerate(messages) if message is not None)
        if first != self.rank and messages[first] == messages[self.rank]:
            raise RankFailed(f"{self}: failed as rank {first} did: {error}", rank=first,
                             exit_code=getattr(error, "exit_code", 1), quiet=True) from error
        raise error

    def require_same(self, value: str, what: str) -> None:
        """Every rank must hold the same ``value`` (the data set's content hash); else all raise, naming a rank that differs.

        A collective: call it where every rank arrives, after :meth:`agree`.
        """
        if not self.distributed:
            return
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        differing = [rank for rank, other in enumerate(values) if other != values[0]]
        if differing:
            rank = differing[0]
            raise DataError(f"{what} differs between rank 0 and rank {rank} of {self.world_size} "
                            f"({str(values[0])[:12]}… and {str(values[rank])[:12]}…): every machine needs the same files")

    def local_main_first(self, step: Callable[[], T]) -> T:
        """Run ``step`` on this machine's local rank 0, then on its other ranks: a cache the first fills.

        The others wait on the group's store, not on a collective, so a rank that failed
        elsewhere (and published it) releases them: they raise its :class:`RankFailed`.
        """
        if not self.distributed:
            return step()
        host = socket.gethostname()
        # every rank makes the same calls, so the n-th call of each rank is the same one
        call = self.store.add(f"local_main_calls/{host}/{self.rank}", 1)
        done = f"local_main_done/{host}/{call}"
        if self.local_rank == 0:
            try:
                return step()
            finally:
                self.store.set(done, "1")  # failed or not: the others go on, and meet the failure in agree()
        while not self.store.check([done]):
            culprit = self.peer_failure()
            # a failure published once `done` is there came after the first rank's step (its own input check, a
            # moment later): this rank meets it in agree(), where the ranks that failed alike say it once
            if culprit is not None and not self.store.check([done]):
                raise culprit
            time.sleep(0.05)
        return step()

    def publish_failure(self, exc: BaseException) -> None:
        """Write why this rank fails into the group's store, unless a rank already did.

        The first failure is the cause; the others' are consequences (a broken
        connection once the first one exited). Not for a stop (Ctrl-C, SIGTERM) or a
        :class:`RankFailed` (already someone else's failure). Must run before the
        process exits: the others learn of the failure through that exit.
        """
        if not self.distributed or isinstance(exc, (KeyboardInterrupt, RankFailed)):
            return
        words = str(exc) if isinstance(exc, PlantmlError) else f"{type(exc).__name__}: {exc}"
        failure = {"rank": self.rank, "exit_code": getattr(exc, "exit_code", 1),
                   "error": (words.strip().splitlines() or [type(exc).__name__])[0][:500]}
        with contextlib.suppress(Exception):  # the store left with torchrun's agent: the exit code still tells
            self.store.compare_set(FIRST_FAILURE, "", json.dumps(failure))

    def peer_failure(self) -> RankFailed | None:
        """The failure another rank published first, as a :class:`RankFailed`; None if none did."""
        if not self.distributed or launcher_gone():  # the store left with it: asking prints torch's C++ warning
            return None
        try:
            if not self.store.check([FIRST_FAILURE]):
                return None
            failure = json.loads(self.store.get(FIRST_FAILURE))
        except Exception:  # the store left with torchrun's agent: nothing more to learn
            return None
        if failure["rank"] == self.rank:
            return None
        return RankFailed(f"rank {failure['rank']} of {self.world_size} failed: {failure['error']}",
                          rank=failure["rank"], exit_code=failure["exit_code"])


def fail_if_asked(ranks: Ranks, epoch: int) -> None:
    """Tests only: raise where ``PLANTML_TEST_FAIL_AT=RANK:EPOCH`` says, as a bug or an out-of-memory error would."""
    if env_value("PLANTML_TEST_FAIL_AT") == f"{ranks.rank}:{epoch}":
        raise RuntimeError(f"failure injected on rank {ranks.rank} at epoch {epoch} (PLANTML_TEST_FAIL_AT)")


# -- joining and leaving the group -------------------------------------------------------


def rank_info() -> Ranks:
    """This process's place from torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (not joined yet)."""
    ranks = Ranks(rank=env_number("RANK", kind=int), world_size=env_number("WORLD_SIZE", kind=int),
                  local_rank=env_number("LOCAL_RANK", kind=int))
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
        raise ConfigError(f"RANK={ranks.rank}, WORLD_SIZE={ranks.world_size}, LOCAL_RANK={ranks.local_rank}: "
                          "not a place in a job (let torchrun set them)")
    return ranks


def launcher_gone() -> bool:
    """True in a rank of ``plantml train --nproc`` whose launcher (which holds the group's store) has ended."""
    if not env_value("PLANTML_LAUNCHER_PID"):
        return False
    launcher = env_number("PLANTML_LAUNCHER_PID", kind=int, minimum=1)
    started = process_start_time(launcher)
    return started is None or not process_alive(launcher, started)


def backend_for(device: str | None) -> str:
    """NCCL when training on CUDA, gloo on the CPU (``device`` as ``--device`` gives it; None: CUDA when present)."""
    return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


def start(device: str | None = None) -> Ranks:
    """Join the torchrun job this process belongs to; ``Ranks()`` when it is a single process."""
    ranks = rank_info()
    if not ranks.distributed:
        return ranks
    _check_rendezvous(ranks)
    backend = backend_for(device)
    if backend == "nccl":
        if ranks.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {ranks.local_rank}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(ranks.local_rank)
    # The env:// rendezvous is what init_process_group would do; doing it here keeps the store
    # torchrun prepared, through which ranks leave each other messages (failures).
    store, _, _ = next(torch.distributed.rendezvous("env://"))
    torch.distributed.init_process_group(backend, store=store, rank=ranks.rank, world_size=ranks.world_size,
                                         **collective_timeout())
    return replace(ranks, backend=backend, store=torch.distributed.PrefixStore("plantml", store))


def collective_timeout() -> dict[str, timedelta]:
    """``init_process_group``'s ``timeout`` from ``PLANTML_COLLECTIVE_TIMEOUT``; unset: torch's own (nothing passed).

    A peer that hangs (SIGSTOP, a swapped-out or deadlocked process) breaks no connection: the
    others wait in their next collective until this timeout. torch's is long on purpose (first
    batches, checkpoint writes, a slow data loader on one rank) and stays the default.
    """
    if env_value("PLANTML_COLLECTIVE_TIMEOUT") is None:
        return {}
    return {"timeout": timedelta(seconds=env_number("PLANTML_COLLECTIVE_TIMEOUT", minimum=0, above=True))}


def _check_rendezvous(ranks: Ranks) -> None:
    """torchrun sets ``MASTER_ADDR`` and ``MASTER_PORT`` beside ``WORLD_SIZE``; without them torch's
    env:// rendezvous fails with a traceback, so a process started by hand is told in one line."""
    address, port = env_value("MASTER_ADDR"), env_value("MASTER_PORT")
    if not address or not (port or "").isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"WORLD_SIZE={ranks.world_size} makes this one of {ranks.world_size} processes, but "
                          f"MASTER_ADDR={address!r} and MASTER_PORT={port!r} name no rendezvous: start the processes "
                          "with torchrun, or use plantml train --nproc N")


def stop(ranks: Ranks, failed: bool = False) -> None:
    """Leave the group. After a failure, NCCL's teardown may wait on a dead peer: the process's exit does it."""
    if ranks.distributed and torch.distributed.is_initialized() and not (failed and ranks.backend == "nccl"):
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def session(device: str | None = None) -> Iterator[Ranks]:
    """The process group of this torchrun job for the length of a training (``Ranks()`` for one process).

    An exception leaving the block is published first (:meth:`Ranks.publish_failure`).
    """
    ranks = start(device)
    failed = True
    try:
        yield ranks
        failed = False
    except BaseException as exc:
        ranks.publish_failure(exc)
        raise
    finally:
        stop(ranks, failed)


# -- why rank 0 stopped ---------------------------------------------------------------------
# torchrun stops a job by sending SIGTERM (SIGINT for a Ctrl-C) to every rank: when the user
# stops it, and also when one rank failed. On rank 0 the tracker handles those signals (the
# run ends KILLED, see plantml.tracking.signals); why_stopped picks the status's reason: FAILED
# when a peer published a failure first, KILLED for a stop, else the error itself.


def why_stopped(ranks: Ranks, exc: BaseException, received: KeyboardInterrupt | None) -> BaseException:
    """What ended this rank's training: a failure another rank published first (a :class:`RankFailed`:
    the run FAILED), else the stop signal this process got (``received``: KILLED), else ``exc`` itself."""
    culprit = ranks.peer_failure()
    if culprit is not None:
        return culprit
    if received is not None and not isinstance(exc, KeyboardInterrupt):
        return received
    if launcher_gone() and not isinstance(exc, KeyboardInterrupt):
        # its death stops every rank with SIGTERM (plantml.training.launch): a peer that went first is that stop
        return Interrupted(signal.SIGTERM)
    return lost_peer(ranks, exc) or exc


def lost_peer(ranks: Ranks, exc: BaseException) -> RankFailed | None:
    """``exc`` as a :class:`RankFailed` (rank unknown: -1) when it is a collective broken by a rank that ended
    without publishing why (killed outright: SIGKILL, the out-of-memory killer); None for any other error.

    That rank's launcher names it and its signal; here the broken connection is one line, not torch's traceback.
    """
    if not ranks.distributed or not isinstance(exc, RuntimeError):
        return None
    words = str(exc)
    if not isinstance(exc, torch.distributed.DistError) and "gloo" not in words and "NCCL" not in words:
        return None
    if "Timed out waiting" in words or "collective operation timeout" in words:  # gloo's, NCCL's watchdog's
        # nothing broke: a peer alive but silent (stopped, swapped out, deadlocked) let the group's timeout pass
        peer, peer_rank = (f"rank {1 - ranks.rank}", 1 - ranks.rank) if ranks.world_size == 2 else ("another rank", -1)
        waited = collective_timeout().get("timeout")
        how_long = f"{waited.total_seconds():g} s" if waited else "torch's timeout"
        return RankFailed(f"{ranks} waited {how_long} in a collective for {peer}, which never answered (hung or "
                          "stopped?); PLANTML_COLLECTIVE_TIMEOUT sets that wait", rank=peer_rank)
    reason = (words.strip().splitlines() or [type(exc).__name__])[0]
    reason = reason.split("] ", 1)[-1] if reason.startswith("[") else reason  # gloo's source path says nothing here
    reason = reason.split(". ", 1)[0]  # then its advice to read the other rank's logs: there are none
    return RankFailed(f"{ranks} lost its connection to another rank, which ended without saying why "
                      f"(killed?): {reason[:300]}", rank=-1)
