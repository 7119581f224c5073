"""Supervision: a service that dies comes back, like compose's ``restart: unless-stopped``.

Clients see an outage, not the end of the stack, and nothing is deleted: the service
restarts on its own folder and ports. Each restart is one log line; the wait before
it doubles (1, 2, 4… at most 30 s); a service that dies ``max_restarts`` times in a
row (without a minute of running in between) is left down and the stack reports it.
A service stopped on purpose (``stack.stop("s3")``) stays stopped.

A service can also hang: alive but silent (a SIGSTOPped or swapped-out process, a
paused container, a deadlock). Its process looks fine, so each running service
is also asked its readiness rule every quarter of ``health_window``, in a
thread of its own (a probe that hangs too holds nothing up). One that has failed at least
:data:`HEALTH_PROBES` probes in a row and not answered one for ``health_window`` seconds
(``PLANTML_HEALTH_WINDOW``, two minutes: a loaded machine's slow answers are not a hang)
is killed, and restarted as one that died, in one line that says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future

from plantml.errors import StackError
from plantml.stack.service import ServiceProcess, ServiceSpec

log = logging.getLogger(__name__)
#: Failed readiness probes in a row (spread over the health window) before a running service counts as hung.
HEALTH_PROBES = 3


def backoff(failures: int, cap: float) -> float:
    """Seconds to wait before the restart that follows ``failures`` failed ones: 1, 2, 4… at most ``cap``."""
    return min(2.0 ** failures, cap)


class Service:
    """One service of a running stack: its description, its process, and whether it should be up."""

    def __init__(self, spec: ServiceSpec, process: ServiceProcess) -> None:
        self.spec = spec
        self.process = process
        self.name = spec.name
        #: True from start() to stop(): the supervisor brings back only a service that should be up.
        self.wanted = False
        self.lock = threading.RLock()
        self.failures = 0
        self.started_at = 0.0
        self.health = Health()

    @property
    def running(self) -> bool:
        """True while its process (container) is alive."""
        return self.process.running

    def start(self) -> None:
        """Start it (if it is not running), wait until it answers and bootstrap it (database, buckets)."""
        with self.lock:
            self.wanted = True
            if self.process.running:
                return
            self.process.start()
            if self.spec.bootstrap is not None:
                try:
                    self.spec.bootstrap()
                except StackError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any bootstrap failure is this service's failure
                    raise StackError(self.name, f"bootstrap failed: {type(exc).__name__}: {exc}", self.log_tail()) from None
            self.started_at = time.monotonic()

    def stop(self) -> None:
        """Stop it and keep it stopped (its data stays)."""
        with self.lock:
            self.wanted = False
            self.process.stop()

    def remove(self, at_once: bool = False) -> None:
        """Stop it for good (at the end of the stack); ``at_once``: killed, not stopped gracefully."""
        with self.lock:
            self.wanted = False
            self.process.remove(at_once)

    def log_tail(self, lines: int | None = 25) -> str:
        """The last lines of its log."""
        return self.process.log_tail(lines)


class Health:
    """The readiness probes of one running service: when one last answered, how many failed since."""

    def __init__(self) -> None:
        self.answered_at = time.monotonic()
        self.failed = 0
        self.probed_at = 0.0
        self.probe: Future[bool] | None = None

    def reset(self, now: float) -> None:
        """A service (re)started, or not running: it owes no answer yet."""
        self.answered_at, self.failed, self.probe = now, 0, None

    def check(self, ready: Callable[[], bool], now: float, interval: float) -> None:
        """Collect the last probe's answer (one still out after ``interval`` counts as failed), start the next."""
        if self.probe is not None and (self.probe.done() or now - self.probed_at >= interval):
            if self.probe.done() and self.probe.result():
                self.answered_at, self.failed = now, 0
            else:
                self.failed += 1
            self.probe = None
        if self.probe is None and now - self.probed_at >= interval:
            self.probed_at, self.probe = now, probe(ready)

    def hung(self, now: float, window: float) -> bool:
        """Silent for ``window`` seconds through at least :data:`HEALTH_PROBES` failed probes."""
        return self.failed >= HEALTH_PROBES and now - self.answered_at >= window


def probe(ready: Callable[[], bool]) -> Future[bool]:
    """``ready()`` in a thread of its own: its answer (False for an exception) once it returns."""
    answer: Future[bool] = Future()

    def run() -> None:
        try:
            answer.set_result(bool(ready()))
        except Exception:  # noqa: BLE001 - a probe that fails in any way is a failed probe
            answer.set_result(False)

    threading.Thread(target=run, name="plantml-probe", daemon=True).start()
    return answer


class Supervisor:
    """A thread that restarts the stack's services that die (see the module docstring)."""

    def __init__(self, services: Mapping[str, Service], on_change: Callable[[], None] = lambda: None,
                 interval: float = 0.5, max_restarts: int = 5, stable_after: float = 60, max_backoff: float = 30,
                 watch: Callable[[], StackError | None] = lambda: None, health_window: float = 0) -> None:
        self.services = services
        self.on_change = on_change
        #: Checked every interval: a failure of the whole stack (its data folder gone) ends supervision with it.
        self.watch = watch
        self.interval = interval
        self.max_restarts = max_restarts
        self.stable_after = stable_after
        self.max_backoff = max_backoff
        #: Seconds a running service may fail its readiness probes before it is killed as hung (0: never).
        self.health_window = health_window
        self._causes: dict[str, str] = {}  # why a service the supervisor killed is down
        self.failure: StackError | None = None
        self._attempted: dict[str, float] = {}  # when each service's last restart began
        self._restarts: dict[str, threading.Thread] = {}  # each service's restart in progress
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plantml-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising (before the services are stopped for good)."""
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=120)  # then no restart begins any more
        for restart in list(self._restarts.values()):
            if restart is not threading.current_thread():
                restart.join(timeout=120)

    def wait(self) -> None:
        """Block until supervision ends; raise the failure that ended it, if one did."""
        while not self._stopping.wait(1):  # a timed wait: Ctrl-C still interrupts it
            pass
        if self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            failure = self.watch()
            if failure is not None:
                self.failure = failure
                self._stopping.set()
                return
            for service in self.services.values():
                if self._died(service) and not self._stopping.is_set() and not self._restarting(service):
                    # Each restart in a thread of its own: MLflow's waits for its database, which may be down too
                    # and must not wait behind it (one after the other, PostgreSQL came back after MLflow's 90 s).
                    self._restarts[service.name] = threading.Thread(target=self._bring_back, args=(service,),
                                                                    name=f"plantml-restart-{service.name}", daemon=True)
                    self._restarts[service.name].start()
                elif self.health_window > 0:
                    self._check_health(service)
                service.process.trim_log()

    def _restarting(self, service: Service) -> bool:
        restart = self._restarts.get(service.name)
        return restart is not None and restart.is_alive()

    @staticmethod
    def _died(service: Service) -> bool:
        """Down although it should be up; a service a caller is starting or stopping right now is not judged."""
        if not service.lock.acquire(blocking=False):
            return False
        try:
            return service.wanted and not service.running
        finally:
            service.lock.release()

    def _check_health(self, service: Service) -> None:
        """Probe a running service; kill it once it is hung (see the module docstring): it is then restarted."""
        now = time.monotonic()
        if not service.lock.acquire(blocking=False):  # a caller is starting or stopping it: not judged
            service.health.reset(now)
            return
        try:
            if not service.wanted or self._restarting(service) or not service.running:
                service.health.reset(now)
                return
            if service.started_at > service.health.answered_at:  # started (and ready) since the last answer
                service.health.reset(service.started_at)
            service.health.check(service.spec.ready, now, self.health_window / (HEALTH_PROBES + 1))
            if not service.health.hung(now, self.health_window):
                return
            self._causes[service.name] = (f"did not answer for {now - service.health.answered_at:.0f} s "
                                          f"({service.health.failed} readiness checks failed in a row): killed it")
            service.health.reset(now)
            service.process.kill()
        finally:
            service.lock.release()

    def _bring_back(self, service: Service) -> None:
        up_since = service.started_at if service.started_at > self._attempted.get(service.name, 0.0) else None
        if up_since is not None and time.monotonic() - up_since > self.stable_after:
            service.failures = 0  # it ran a good while: a new incident, not a crash loop
        if service.failures >= self.max_restarts:
            self.failure = StackError(service.name, f"exited {service.failures + 1} times in a row; not restarted again",
                                      service.log_tail())
            self._stopping.set()
            return
        delay = backoff(service.failures, self.max_backoff)
        service.failures += 1
        log.warning("%s %s; restarting it in %.0f s (restart %d of at most %d in a row)",
                    service.name, self._causes.pop(service.name, "exited unexpectedly"), delay, service.failures,
                    self.max_restarts)
        if self._stopping.wait(delay):
            return
        with service.lock:  # a caller may have stopped or started it meanwhile
            if not service.wanted or service.running:
                return
            self._attempted[service.name] = time.monotonic()
            try:
                service.start()
            except StackError as exc:
                log.warning("%s: restart failed: %s", service.name, exc.cause)
                return
        self.on_change()
