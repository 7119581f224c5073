"""``plantml train --nproc N``: start N training processes on this machine, as ``torchrun --standalone`` does.

torchrun's elastic agent (``torch.distributed.launcher``) runs in this process: it opens a
rendezvous on 127.0.0.1 on a free port, starts the N ranks (``python -m plantml train …``
without ``--nproc``), watches them, and stops them all when one fails or when this process
gets SIGTERM or Ctrl-C. Each rank prints its own errors; this process adds one line naming
the rank that failed, and exits with that rank's code.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import tempfile
import uuid

from plantml.errors import RankFailed, UsageError
from plantml.settings import env_value
from plantml.tracking.environ import scoped_environ
from plantml.training.distributed import rank_info


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
    # the agent's error files go here, and nowhere else
    log_dir = tempfile.mkdtemp(prefix="plantml-ranks-")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"plantml-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                          logs_specs=DefaultLogsSpecs(log_dir=log_dir))
    # as torchrun: one CPU thread per rank unless told otherwise, or N ranks would each take every core
    threads = {} if nproc == 1 or env_value("OMP_NUM_THREADS") else {"OMP_NUM_THREADS": "1"}
    # its lines narrate each start and stop, and repeat a rank's failure that this command reports in one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        with scoped_environ(threads):
            elastic_launch(config, sys.executable)(*worker_args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            raise RankFailed(f"rank {rank} of {nproc} was killed by {signal.Signals(-failure.exitcode).name}",
                             rank=rank, exit_code=128 - failure.exitcode) from None
        raise RankFailed(f"rank {rank} of {nproc} exited with code {failure.exitcode} (its error is above)",
                         rank=rank, exit_code=failure.exitcode) from None
    except SignalException as exc:  # the agent has already stopped the ranks with the same signal
        return 128 + int(exc.sigval)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0
