"""Stopping a process a test started, without leaving it behind when it does not stop."""

from __future__ import annotations

import os
import signal
import subprocess


def stop(process: subprocess.Popen, signum: int = signal.SIGINT, timeout: float = 60) -> str:
    """Send ``signum`` and return the rest of the process's output; one that has not ended ``timeout`` seconds
    later is killed (its services go with it: they run under ``--pdeathsig``) and the test fails saying so.
    A Python process started with ``PYTHONFAULTHANDLER=1`` gets SIGABRT first, so the failure shows where each
    of its threads was stuck."""
    process.send_signal(signum)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        raise AssertionError(f"still running {timeout:.0f} s after {signal.Signals(signum).name}; killed. "
                             f"Its output:\n{(output or '')[-6000:]}") from None
    return output or ""


def stop_group(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to the process group of ``process`` (started with ``start_new_session``), SIGKILL after ``timeout``."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
