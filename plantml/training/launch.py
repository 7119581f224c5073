"""``plantml train --nproc N``: start N training processes on this machine, as ``torchrun --standalone`` does.

torchrun's elastic agent (``torch.distributed.launcher``) runs in this process: it opens a
rendezvous on 127.0.0.1 on a free port, starts the N ranks (``python -m plantml train …``
without ``--nproc``), watches them, and stops them all when one fails or when this process
gets SIGTERM or Ctrl-C. torch's c10d rendezvous listens on every address of the machine,
without authentication, for its key-value stores (the rendezvous's and the ranks'
``MASTER_PORT``): plantml's rendezvous (:data:`RENDEZVOUS`) is the same, but each store
listens on 127.0.0.1 only. Each rank prints its own errors; this process adds one line naming
the rank that failed, and exits with that rank's code.

torchrun starts each rank in a session of its own, so nothing stops them when this process
is killed outright (``kill -9``, the out-of-memory killer): each rank therefore watches its
launcher and stops itself with SIGTERM when it dies (:func:`follow_launcher`), as on a stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from plantml.errors import RankFailed, UsageError
from plantml.processes import process_start_time
from plantml.settings import env_value
from plantml.staging import scratch_folder
from plantml.tracking.environ import scoped_environ
from plantml.training.distributed import launcher_gone, rank_info


def launch(nproc: int, worker_args: list[str]) -> int:
    """Run ``python *worker_args`` as ``nproc`` ranks on this machine; 0 when all of them succeed.

    A failed rank raises :class:`RankFailed` with its exit code; a stop (SIGTERM, Ctrl-C)
    returns 128 plus the signal's number, after the ranks have ended their run.
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if rank_info().distributed:
        raise UsageError("--nproc: this process is already one rank of a torchrun job; use one launcher or the other")
    # as torchrun: one CPU thread per rank unless told otherwise, or N ranks would each take every core
    threads = {} if nproc == 1 or env_value("OMP_NUM_THREADS") else {"OMP_NUM_THREADS": "1"}
    # the agent's lines narrate each start and stop ("Received 2 death signal, shutting down workers"), and repeat
    # a rank's failure that this command reports in one line. Each of its modules sets its logger's own level
    # (WARNING) when imported, some only during the launch, so no parent's level reaches them: while the agent
    # runs, this process (which does nothing else) logs nothing below CRITICAL
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        # the agent's error files go here, and nowhere else; named after this process, so that the
        # next launch removes the folder of one that was killed
        with scratch_folder("plantml-ranks") as log_dir, \
                scoped_environ({**threads, "PLANTML_LAUNCHER_PID": str(os.getpid())}):
            _register_rendezvous()
            config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                                  run_id=f"plantml-{uuid.uuid4().hex[:12]}", rdzv_backend=RENDEZVOUS,
                                  rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1", max_restarts=0,
                                  monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=str(log_dir)))
            elastic_launch(config, sys.executable)(*worker_args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode == UsageError.exit_code:  # an input error, which that rank said in one line
            return failure.exitcode
        if failure.exitcode < 0:
            raise RankFailed(f"rank {rank} of {nproc} was killed by {signal.Signals(-failure.exitcode).name}",
                             rank=rank, exit_code=128 - failure.exitcode) from None
        raise RankFailed(f"rank {rank} of {nproc} exited with code {failure.exitcode} (its error is above)",
                         rank=rank, exit_code=failure.exitcode) from None
    except SignalException as exc:  # the agent has already stopped the ranks with the same signal
        return 128 + int(exc.sigval)
    finally:
        logging.disable(previous)
    return 0


#: The name plantml's rendezvous is registered under with torch's elastic agent.
RENDEZVOUS = "plantml-loopback"
#: Seconds a rank waits for an answer from a store (torch's c10d rendezvous: 60).
STORE_TIMEOUT_S = 60


def loopback_store(port: int = 0) -> Any:
    """A ``TCPStore`` server listening on 127.0.0.1 only (``port`` 0: a free one).

    torch's own binds every address; a socket bound here and handed over
    (``master_listen_fd``) keeps it on the loopback interface, where only this machine reaches it.
    """
    from torch.distributed import TCPStore

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(socket.SOMAXCONN)
    except BaseException:
        listener.close()
        raise
    bound = listener.getsockname()[1]
    return TCPStore("127.0.0.1", bound, is_master=True, multi_tenant=True, master_listen_fd=listener.detach(),
                    timeout=timedelta(seconds=STORE_TIMEOUT_S))


def _create_rendezvous(params: Any) -> Any:
    """torch's c10d rendezvous handler, both of whose stores come from :func:`loopback_store`."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    class LoopbackBackend(C10dRendezvousBackend):
        @property
        def name(self) -> str:  # the agent checks that the handler is the one it asked for
            return RENDEZVOUS

    store = loopback_store()
    handler = create_handler(store, LoopbackBackend(store, params.run_id), params)
    # the store the ranks bootstrap from (MASTER_PORT): torch makes it in this method, on every address
    handler._create_tcp_store_server = lambda master_addr, master_port: loopback_store(master_port)
    return handler


def _register_rendezvous() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(RENDEZVOUS, _create_rendezvous)  # again: a no-op


def follow_launcher() -> None:
    """In a rank that ``plantml train --nproc`` started: stop (SIGTERM, once) when that launcher dies, whatever kills it.

    Rank 0 then ends its run KILLED and every rank exits, rather than training on unwatched. A thread
    watches the launcher, rather than the kernel's parent-death signal, which comes again as each of
    the dying launcher's threads ends, and a second SIGTERM cuts the end of the run short.
    Does nothing under another launcher (torchrun) or where ``/proc`` does not exist.
    """
    if not env_value("PLANTML_LAUNCHER_PID") or process_start_time(os.getpid()) is None:
        return
    if launcher_gone():  # before this rank even looked
        os.kill(os.getpid(), signal.SIGTERM)
        return
    threading.Thread(target=_stop_when_launcher_gone, name="plantml-launcher-watch", daemon=True).start()


def _stop_when_launcher_gone() -> None:
    while not launcher_gone():
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
