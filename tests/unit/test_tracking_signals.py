"""A library user's opt-in: SIGTERM/SIGHUP/SIGINT end the run KILLED, one line, the signal as exit status.

A real process, a real signal, MLflow's local sqlite store (the stack-backed ``plantml
train`` cases are in ``tests/integration/test_signals.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

TRAINING = textwrap.dedent("""
    import sys, time
    from plantml.tracking import MLflowTracker

    per_run = sys.argv[3] == "start_run"  # the opt-in on one run, or on the tracker
    tracker = MLflowTracker(tracking_uri=sys.argv[1], experiment_name="signals", handle_signals=not per_run)
    run = tracker.start_run(run_name="lib", handle_signals=True) if per_run else tracker.start_run(run_name="lib")
    if sys.argv[2] == "with":
        run.__enter__()
    print("run", run.run_id, flush=True)
    try:
        for epoch in range(1000):
            tracker.log_training_metrics(epoch, 1.0 / (epoch + 1), 0.5, 0.7, 0.6, 0.01)
            print("epoch", epoch, flush=True)
            time.sleep(0.2)
    except BaseException as exc:
        if sys.argv[2] == "with":
            run.__exit__(type(exc), exc, exc.__traceback__)
        raise
""")


def read_until(stream, prefix: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"never saw {prefix!r}; got {lines}")


@pytest.mark.parametrize("signum, ending, opt_in", [(signal.SIGTERM, "with", "tracker"), (signal.SIGHUP, "atexit", "tracker"),
                                                    (signal.SIGINT, "with", "tracker"), (signal.SIGTERM, "with", "start_run")])
def test_a_signal_ends_the_run_killed_with_one_line_and_the_signal_as_exit_status(signum, ending, opt_in, tmp_path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PLANTML_JOURNAL_DIR": str(tmp_path / "journal"), "PLANTML_LINGER": "5"}
    child = subprocess.Popen([sys.executable, "-c", TRAINING, uri, ending, opt_in], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        lines = read_until(child.stdout, "epoch 2")
        child.send_signal(signum)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    lines += out.split("\n")
    printed = [int(line.split()[1]) for line in lines if line.startswith("epoch ")]
    run_id = lines[0].split()[1]
    assert child.returncode == -signum, err
    name = signal.Signals(signum).name
    # nothing else: not even MLflow's INFO lines about creating the sqlite store's tables
    assert err.strip().splitlines() == [f"-c: interrupted by {name}; run {run_id} ended KILLED, everything delivered"], err
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "KILLED"
    for key in ("train_loss", "val_accuracy"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == printed, key
    assert not list((tmp_path / "journal").glob("*.jsonl"))


@pytest.fixture
def handling():
    from plantml.tracking import signals as handling

    handling.install()
    yield handling
    handling.uninstall()
    handling.reset()  # no after-interruption grace left for the next test


def test_a_signal_inside_a_deferred_section_is_raised_when_it_ends(handling) -> None:
    from plantml.errors import Interrupted

    reached_the_end = False
    with pytest.raises(Interrupted) as raised:
        with handling.deferred():
            signal.raise_signal(signal.SIGINT)  # to this thread: no other thread can take it
            time.sleep(0.01)  # the handler runs here and must not raise
            reached_the_end = True
    assert reached_the_end and raised.value.exit_code == 130 and str(raised.value) == "interrupted by SIGINT"


def test_after_an_interruption_a_second_signal_only_hurries_then_ctrl_c_works_again(handling, monkeypatch) -> None:
    from plantml.errors import Interrupted

    monkeypatch.setattr(handling, "AFTER_INTERRUPT_S", 0.3)
    try:
        signal.raise_signal(signal.SIGINT)  # to this thread: no other thread can take it
        time.sleep(0.01)
    except Interrupted:  # the process unwinds the interruption on its way out
        handling.uninstall()  # the run ended
        signal.raise_signal(signal.SIGINT)  # to this thread: no other thread can take it
        time.sleep(0.01)  # swallowed: no traceback while exiting
    assert handling.hurry()
    handling.exiting()  # past the last except block: atexit
    signal.raise_signal(signal.SIGINT)
    time.sleep(0.01)  # swallowed too
    time.sleep(0.4)  # the grace is over
    with pytest.raises(KeyboardInterrupt) as raised:
        signal.raise_signal(signal.SIGINT)  # to this thread: no other thread can take it
        time.sleep(0.01)
    assert not isinstance(raised.value, Interrupted)  # Python's own handler again, and for good
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    handling.install()  # for the fixture's uninstall


def test_after_an_interruption_caught_and_gone_past_ctrl_c_works_at_once_and_the_handler_is_given_back(handling) -> None:
    from plantml.errors import Interrupted

    # a notebook cell interrupted during its run: the kernel catches the interruption and goes on
    with pytest.raises(Interrupted):
        signal.raise_signal(signal.SIGINT)  # to this thread: no other thread can take it
        time.sleep(0.01)
    handling.uninstall()  # the run ended
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as raised:  # the next cell's Ctrl-C: was swallowed for 30 s
        signal.raise_signal(signal.SIGINT)
        time.sleep(1.0)
    assert time.monotonic() - started < 0.5 and not isinstance(raised.value, Interrupted)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    handling.install()  # for the fixture's uninstall


def test_a_users_own_handler_stands_aside_while_a_run_handles_signals_and_is_back_after() -> None:
    from plantml.errors import Interrupted
    from plantml.tracking import signals as handling

    called: list[int] = []

    def checkpoint(signum, frame) -> None:
        called.append(signum)

    before = signal.signal(signal.SIGTERM, checkpoint)
    try:
        handling.install()  # a run with handle_signals=True opened
        try:
            with pytest.raises(Interrupted):
                signal.raise_signal(signal.SIGTERM)
                time.sleep(0.01)
        finally:
            handling.uninstall()  # the run ended
        assert called == []  # the README says so: catch Interrupted to checkpoint
        signal.raise_signal(signal.SIGTERM)  # the run has ended: the user's handler takes the next signal
        time.sleep(0.01)
        assert called == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is checkpoint
    finally:
        signal.signal(signal.SIGTERM, before)
