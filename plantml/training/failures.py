"""A training that ran out of a machine's resources, as one line that says which and what to change.

Out of GPU memory, out of host memory, or a data-loading worker killed (the kernel's out-of-memory
killer picks the largest process, often a worker): torch raises these with a traceback that names
none of the flags that cause them. The run still ends FAILED with torch's own error recorded.
"""

from __future__ import annotations

import re
import signal
from typing import Any

import torch

from plantml.errors import PlantmlError
from plantml.text import shown_text

# torch.utils.data's words for a worker that died: killed by a signal, or gone without saying why
_WORKER_DIED = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (is killed by signal: [^.]+|exited unexpectedly)")

# strsignal's words (what torch's message holds) to the signal's name: "Killed" is SIGKILL, "Bus error" SIGBUS
_SIGNAL_NAMES = {signal.strsignal(number): number.name for number in signal.Signals if signal.strsignal(number)}


class OutOfResources(PlantmlError):
    """The machine ran out of memory (GPU or host) under this training's settings; exit code 1."""


def resource_failure(exc: BaseException, batch_size: int, image_size: int, num_workers: int) -> OutOfResources | None:
    """The one-line error for ``exc`` when it says the machine ran out of memory, else None."""
    sizes = f"--batch-size {batch_size} and --image-size {image_size}"
    if isinstance(exc, torch.OutOfMemoryError):
        said = ". ".join(str(exc).split(". ")[:2]).strip().rstrip(".")  # "CUDA out of memory. Tried to allocate 2.00 GiB"
        return OutOfResources(f"out of GPU memory at {sizes} ({shown_text(said)}): try a smaller --batch-size or "
                              "--image-size")
    if isinstance(exc, MemoryError):
        return OutOfResources(f"out of memory at {sizes} with {num_workers} data-loading workers: try a smaller "
                              "--batch-size, --image-size or --num-workers")
    died = _WORKER_DIED.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if died:
        return OutOfResources(f"a data-loading worker (pid {died[1]}) {_worker_death(died[2], sizes, num_workers)}")
    return None


def _worker_death(said: str, sizes: str, num_workers: int) -> str:
    """What torch said of a worker's death (``is killed by signal: Killed``: strsignal's words), with its likely cause."""
    name = _SIGNAL_NAMES.get(said.removeprefix("is killed by signal: "))
    if name == "SIGKILL":
        return (f"was killed by SIGKILL: the kernel's out-of-memory killer, most likely; at {sizes} with "
                f"--num-workers {num_workers}, try fewer workers or a smaller --batch-size")
    if name == "SIGBUS":
        return ("was killed by SIGBUS: shared memory (/dev/shm) too small for the batches it hands over, most likely "
                "(a container's is 64 MB unless given --shm-size); give it more, or use --num-workers 0")
    if name:
        return f"was killed by {name}: run with --num-workers 0 to see the error in the training's own process"
    # torch saw it gone before its SIGCHLD handler said how: the likely causes, and the way to see any error
    return (f"ended unexpectedly: killed by the kernel's out-of-memory killer, or by SIGBUS for a /dev/shm too small, "
            f"most likely; at {sizes} with --num-workers {num_workers}, try fewer workers or a smaller --batch-size "
            "(--num-workers 0 shows any other error in the training's own process)")


def raise_as_resource_failure(exc: BaseException, prepared: Any) -> None:
    """Raise :func:`resource_failure`'s error from ``exc`` when there is one; else return."""
    failure = resource_failure(exc, prepared.config.batch_size, prepared.image_size, prepared.num_workers)
    if failure is not None:
        raise failure from exc
