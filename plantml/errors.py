"""One exception family for every error a user should see as one line.

Library code raises these; only the command-line layer (:mod:`plantml.cli`) turns
them into a message and an exit code, in one place.
"""

from __future__ import annotations

import os
import re

from plantml.text import mask_passwords, shown_text


class PlantmlError(Exception):
    """Base of every user-facing plantml error. ``exit_code`` is what the CLI exits with.

    Its text never shows the password of a URL in it (``http://user:***@host``).
    """

    exit_code = 1

    def __str__(self) -> str:
        return mask_passwords(super().__str__())


class UsageError(PlantmlError):
    """The caller asked for something invalid (a bad flag, a bad name, a missing folder).

    Its text is one line whatever the culprit's name holds: control characters escaped (a file named with a
    newline), bytes that are not UTF-8 as ``%XX``.
    """

    exit_code = 2

    def __str__(self) -> str:
        return shown_text(super().__str__())


class ConfigError(UsageError):
    """A setting (argument, environment variable or ``.env`` entry) is invalid."""


class DataError(UsageError):
    """The image folder cannot be used as a data set."""


class ValidationError(UsageError):
    """A value handed to the tracker would be rejected by MLflow (bad name, bad value)."""


class StorageError(PlantmlError):
    """A local folder (plantml's cache, a folder being written) ran out of space or failed to write."""


class StackError(PlantmlError):
    """A service of the tracking stack failed to start, stop or answer."""

    def __init__(self, service: str, cause: str, log_tail: str = "") -> None:
        self.service = service
        self.cause = cause
        self.log_tail = log_tail
        message = f"{service}: {cause}"
        if log_tail:
            message += f"\n--- last lines of the {service} log ---\n{log_tail}"
        super().__init__(message)


class TrackingError(PlantmlError):
    """The tracking server or the artifact store refused or failed a request."""


class RegistryError(PlantmlError):
    """A registered model, version or alias is unknown or invalid (one line, as :class:`UsageError`)."""

    exit_code = 2

    def __str__(self) -> str:
        return shown_text(super().__str__())


class RankFailed(PlantmlError):
    """Another process of a distributed training failed first; this one stopped because of it.

    The message names the failing rank and its error; ``exit_code`` is that rank's. ``quiet``: this rank failed
    with the very error that rank printed (every rank read the same bad image), so the command prints nothing more.
    """

    def __init__(self, message: str, rank: int, exit_code: int = 1, quiet: bool = False) -> None:
        super().__init__(message)
        self.rank = rank
        self.exit_code = exit_code
        self.quiet = quiet


class Interrupted(KeyboardInterrupt):
    """The process got SIGTERM, SIGHUP or SIGINT while a tracker handled signals.

    A ``KeyboardInterrupt``, so code that cleans up after Ctrl-C does the same for the
    others. ``exit_code`` is 128 plus the signal's number (143 for SIGTERM, 129 for SIGHUP,
    130 for SIGINT), as a shell reports a process the signal ended. ``detail`` says how the
    tracking run ended (set by the tracker that ended it).
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
        self.detail = detail

    @property
    def signal_name(self) -> str:
        """``SIGTERM``, ``SIGHUP``, ``SIGINT``."""
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def __str__(self) -> str:
        return f"interrupted by {self.signal_name}" + (f"; {self.detail}" if self.detail else "")


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), at most 500 characters;
    MLflow's words for an answer that is not its API's, :func:`foreign_answer`'s."""
    foreign = foreign_answer(exc)
    if foreign is not None:
        return foreign
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


# MLflow's client on an HTTP answer that is not its API's JSON (rest_utils.verify_rest_response)
_REST_FAILURE = re.compile(r"API request to endpoint (\S+) failed with error code (\d+) != 200\. Response body: '(.*)", re.S)


def foreign_answer(exc: BaseException) -> str | None:
    """For an HTTP answer that is not MLflow's (another program's web page on the port, a proxy's error page): a
    short line saying so, where MLflow's client quotes the page's first line (``Response body: '<!DOCTYPE HTML>``)."""
    match = _REST_FAILURE.match(str(exc).strip())
    if match is None or match[3].lstrip().startswith(("{", "[")):
        return None
    body = "a web page" if match[3].lstrip().startswith("<") else "a body that is not MLflow's JSON"
    return (f"HTTP {match[2]} with {body} for {match[1]}: not the answer of an MLflow tracking server "
            "(another program on this port, a wrong path, a proxy in between?)")


def os_reason(exc: OSError) -> str:
    """Why the system refused a file operation, in its own words (``Permission denied``), for a one-line error."""
    return exc.strerror or type(exc).__name__


def no_home_reason() -> str:
    """Why this account has no home folder, when pathlib says ``Could not determine home directory.``"""
    return f"HOME is unset, and uid {os.getuid()} has no /etc/passwd line"


def connection_reason(exc: BaseException) -> str:
    """Why a connection failed, in the system's few words (``Connection refused``, ``timed out``), found in the chain
    of wrappers requests and urllib3 put around it (``HTTPConnectionPool(...): Max retries exceeded with url: ...``);
    :func:`one_line` when the chain holds no such reason."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        cause = pending.pop(0)
        if not isinstance(cause, BaseException) or id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if isinstance(cause, TimeoutError) or type(cause).__name__.endswith("Timeout"):
            return "timed out"
        pending += [getattr(cause, "reason", None), *cause.args[:1], cause.__cause__, cause.__context__]
    return one_line(exc)
