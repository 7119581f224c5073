"""The ``plantml`` command line.

Sub-commands live in their own modules and are imported only when invoked, so that
``plantml --help`` stays fast (importing mlflow or torch takes seconds).
Every :class:`plantml.errors.PlantmlError` becomes one line on stderr and its exit
code here, in one place; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import errno
import importlib
import io
import os
import sys
from typing import Any, NoReturn

import click

from plantml.errors import ConfigError, Interrupted, PlantmlError, no_home_reason, os_reason
from plantml.text import mask_passwords, safe_text, unescaped_bytes

#: command name -> (module, attribute, one-line help shown by ``plantml --help``)
COMMANDS = {
    "train": ("plantml.cli.train", "train", "Train a plant classifier with full MLflow tracking."),
    "data": ("plantml.cli.data", "data", "Make or inspect image data sets."),
    "stack": ("plantml.cli.stack", "stack", "Start the tracking stack (PostgreSQL, S3, MLflow)."),
    "registry": ("plantml.cli.registry", "registry", "List, promote, roll back and compare registered models."),
    "verify": ("plantml.cli.verify", "verify", "Run the eight checks of a tracking installation."),
    "tracking": ("plantml.cli.tracking", "tracking", "Recover runs whose process died; replay a run's journal."),
    "ui": ("plantml.cli.ui", "ui", "Show MLflow's UI on your runs (serves a local store; prints the newest run's URL)."),
}
#: The commands that are MLflow clients: they take its credentials from .env too (``stack`` starts servers).
MLFLOW_CLIENTS = frozenset(COMMANDS) - {"stack"}


class _Stopped(Exception):
    """A KeyboardInterrupt (Ctrl-C, or a signal a tracker handled) carried past click, which would
    turn it into a bare ``Abort`` and print a blank line."""

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__(str(interrupt))
        self.interrupt = interrupt


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's own signature
        _require_working_folder()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Stopped(exc) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        if cmd_name in MLFLOW_CLIENTS:
            _export_env_file_credentials()
        module_name, attribute, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="plantml")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """plantml: train plant-image classifiers with trustworthy MLflow tracking."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _require_working_folder() -> None:
    """Every command reads ``.env`` and MLflow resolves relative paths here: a deleted folder is one line, not a traceback."""
    import os

    try:
        os.getcwd()
    except FileNotFoundError:
        raise ConfigError("the current folder no longer exists (deleted while this shell was in it); cd to another") from None


def _export_env_file_credentials() -> None:
    from plantml.settings import export_env_file_credentials

    try:
        export_env_file_credentials()
    except PlantmlError:
        pass  # an unreadable .env: the command that resolves its settings says so in one line


def shown_click_message(exc: click.ClickException) -> str:
    """Click's message, its passwords masked and a name typed in a Latin-1 shell shown ``pl%E9nts`` (click quotes it
    with ``repr``: ``'pl\\udce9nts'``), as plantml's own messages show it."""
    return unescaped_bytes(safe_text(mask_passwords(exc.format_message())))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``plantml`` console script; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    prog = "plantml"
    try:
        # Without standalone mode click returns the command's value, or the code of a ctx.exit(n).
        result = cli.main(args=args, prog_name=prog, standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        return 130
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else prog
        click.echo(f"{command}: error: {shown_click_message(exc)}", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"{prog}: error: {shown_click_message(exc)}", err=True)
        return exc.exit_code
    except PlantmlError as exc:
        if debug:
            raise
        if not getattr(exc, "quiet", False):  # a rank that failed as a lower rank did, which said it
            click.echo(f"{prog}: error: {exc}", err=True)
        return exc.exit_code
    except RuntimeError as exc:
        # pathlib's Path.home() with HOME unset and an account with no /etc/passwd line (`docker run --user UID`):
        # MLflow calls it when imported
        if debug or str(exc) != "Could not determine home directory.":
            raise
        click.echo(f"{prog}: error: no home folder ({no_home_reason()}), which MLflow needs: set HOME to a folder this "
                   "account can write", err=True)
        return 2
    except OSError as exc:
        # Python 3.11's Path.exists() and is_file() raise on a name too long for the file system (3.12's answer False),
        # wherever a command first looks at a path it was given: the name is the culprit, in one line
        if debug or exc.errno != errno.ENAMETOOLONG or exc.filename is None:
            raise
        click.echo(f"{prog}: error: {safe_text(os.fsdecode(exc.filename))}: file name too long for the file system", err=True)
        return 2
    except (KeyboardInterrupt, _Stopped) as exc:
        interrupt = exc.interrupt if isinstance(exc, _Stopped) else exc
        if isinstance(interrupt, Interrupted):  # raised by the tracker's handlers: a second signal from here to the exit only hurries it
            from plantml.tracking import signals

            signals.exiting()
        from plantml.settings import env_value

        if env_value("RANK") == "0":  # the other ranks of a training stop silently: rank 0 says it
            click.echo(f"{prog}: {interrupt if isinstance(interrupt, Interrupted) else 'interrupted'}", err=True)
        return getattr(interrupt, "exit_code", 130)


def run() -> None:
    """Console-script wrapper: exit with :func:`main`'s code, or 1 where stdout or stderr could not be written."""
    stdout, stderr = _tolerant_stdout(), _tolerant_stderr()
    code = main()
    if stdout is not None and stdout.failure is not None:
        click.echo(f"plantml: error: standard output: {os_reason(stdout.failure)}; what the command printed there "
                   "is lost", err=True)
        code = code or 1
    if stderr is not None and stderr.failure is not None:  # nothing can say so: the exit code does
        code = code or 1
    _exit(code)


def _exit(code: int) -> NoReturn:
    """End the process as Python's own exit does, less its teardown of every module: a command that imported
    torch, torchvision and MLflow spent 1.2 to 1.6 s of CPU in it after its last line (``benchmarks/cli_exit.py``).

    What an exit must still do is done, in Python's order: the threads that keep a process alive are shut down
    and waited for (``concurrent.futures`` pools included), the exit handlers run (a tracker ending its run,
    MLflow's, multiprocessing's, ``logging``'s, temporary folders'), and both streams are flushed. Where this
    Python has no ``threading._shutdown``, the ordinary exit.
    """
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed, or its reader gone: nothing more can reach it
            pass
    os._exit(code)


def _tolerant_stderr() -> TolerantStream | None:
    """stderr as :func:`_tolerant_stdout` makes stdout: a reader that goes away (``plantml train 2>&1 | head -1``,
    a ``|& tee`` that died) ends the progress and error lines, not the command."""
    if not isinstance(sys.stderr, io.TextIOWrapper):
        return None
    sys.stderr = TolerantStream(sys.stderr)
    return sys.stderr


def _tolerant_stdout() -> TolerantStream | None:
    """Text the terminal's encoding cannot show (``✓``, a class named in Greek, in a Latin-1 locale) is written as
    ``\\u`` escapes, as Python already does on stderr, rather than a UnicodeEncodeError traceback halfway through;
    a reader that goes away (``plantml train | head -1``) or a full disk ends the printing, not the command (see
    :class:`TolerantStream`). None where there is no stdout (``>&-``)."""
    if not isinstance(sys.stdout, io.TextIOWrapper):
        return None
    if sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout = TolerantStream(sys.stdout)
    return sys.stdout


class TolerantStream:
    """stdout or stderr that drops what is written once it cannot be written (its reader gone, its disk full),
    instead of raising.

    A training whose output went into ``| head -1``, a ``| tee`` that died or a file on a full disk
    (``> train.log``) would otherwise end FAILED at its next epoch line (or, for stderr, at its last line,
    ``registered … version N``), with a traceback: what the
    command does matters more than what it prints, and its results are in MLflow. A reader that left
    chose to (EPIPE): nothing is said. Any other failure is kept in :attr:`failure`, which
    :func:`run` reports in one line once the command has ended. Its file descriptor is pointed at
    /dev/null then, so Python's last flush at exit is silent too.
    """

    def __init__(self, stream: io.TextIOWrapper) -> None:
        self._stream = stream
        self.reader_gone = False
        #: Why the stream could not be written (not a reader gone): ``No space left on device``, an I/O error.
        self.failure: OSError | None = None

    def write(self, text: str) -> int:
        if not self._dropped:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self._drop(exc)
        return len(text)

    def flush(self) -> None:
        if not self._dropped:
            try:
                self._stream.flush()
            except OSError as exc:
                self._drop(exc)

    @property
    def _dropped(self) -> bool:
        return self.reader_gone or self.failure is not None

    def _drop(self, exc: OSError) -> None:
        if isinstance(exc, BrokenPipeError):
            self.reader_gone = True
        else:
            self.failure = exc
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno...: the stream's own
        return getattr(self._stream, name)
