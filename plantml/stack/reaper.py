"""The reaper of a containers stack: removes its containers once the process that owns it is gone.

testcontainers' Ryuk does this from a container watching a socket, but its image needs
a registry. This is the same idea as a small process: the stack starts it with a pipe
on its standard input and never writes to it. The read ends when the owner closes the
pipe (a normal stop) or dies, however it dies (``kill -9`` included): the reaper then
removes every container and network labelled with the stack's id, and exits.

Run as ``python -m plantml.stack.reaper STACK_ID``, in a session of its own so that a
signal to the owner's process group does not take it along.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Wait for the end of standard input, then remove the stack's containers."""
    from plantml.stack.docker_api import LABEL, docker_client, remove_containers

    stack_id = argv[1]
    client = docker_client()  # connected before the wait, so the removal is immediate
    sys.stdin.buffer.read()
    remove_containers(client, f"{LABEL}={stack_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
