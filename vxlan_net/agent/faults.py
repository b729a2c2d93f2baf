"""Transient faults the agent rides out (each logged once, retried with back-off, shown in /readyz and
metrics) and the background calls that keep a hanging request off its loop."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional, TypeVar

from vxlan_net.agent.health import AgentMetrics, Readiness
from vxlan_net.core.backoff import Backoff
from vxlan_net.core.errors import VxlanNetError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Faults:
    """The faults lasting now, by kind ("firewall", "subnet-file", ...): the one place that reports them.

    A fault is logged when it starts (a warning) and when it ends (info), not at every retry, so an
    outage of hours does not flood the log; /readyz names it meanwhile and the metrics count attempts.
    """

    def __init__(self, readiness: Readiness, metrics: AgentMetrics):
        self.readiness = readiness
        self.metrics = metrics
        self._lock = threading.Lock()  # the health-port thread reports too

    def failed(self, kind: str, error: object, logged: bool = False) -> None:
        """Record a failed attempt; `logged`: the caller already warned about it."""
        with self._lock:
            new = kind not in self.readiness.faults
            self.readiness.faults[kind] = str(error)
        self.metrics.fault_failures.labels(kind).inc()
        self.metrics.fault_active.labels(kind).set(1)
        if new and not logged:
            log.warning("%s: %s; running on and retrying with back-off", kind, error)
        elif not new:
            log.debug("%s still failing: %s", kind, error)

    def cleared(self, kind: str) -> None:
        with self._lock:
            ended = self.readiness.faults.pop(kind, None) is not None
        if ended:
            self.metrics.fault_active.labels(kind).set(0)
            log.info("%s: recovered", kind)


class RetriedStep:
    """One idempotent step (write the subnet file, apply the nft rules, bind the health port).

    `request()` makes it due; `run_if_due()` runs it when due and, if it fails with a VxlanNetError or
    an OSError, reports the fault and schedules the next try after a growing back-off.
    """

    def __init__(self, kind: str, action: Callable[[], None], faults: Faults, backoff: Optional[Backoff] = None):
        self.kind = kind
        self.action = action
        self.faults = faults
        self.backoff = backoff or Backoff(base=1.0, cap=30.0)
        self.pending = False
        self._due_at = 0.0  # time.monotonic()

    def request(self) -> None:
        """Run at the next chance (the state it applies changed)."""
        self.pending, self._due_at = True, 0.0
        self.backoff.reset()

    def failed(self, error: object, now: Optional[float] = None) -> None:
        """The step's work failed (here or in a caller doing part of it): retry after the back-off."""
        now = time.monotonic() if now is None else now
        self.faults.failed(self.kind, error)
        self.pending, self._due_at = True, now + self.backoff.next_delay()

    def seconds_until_due(self, now: Optional[float] = None) -> Optional[float]:
        """None when nothing is pending."""
        if not self.pending:
            return None
        return max(0.0, self._due_at - (time.monotonic() if now is None else now))

    def run_if_due(self, now: Optional[float] = None) -> bool:
        """True when the step is done (now or before); False while it is pending."""
        now = time.monotonic() if now is None else now
        if not self.pending:
            return True
        if now < self._due_at:
            return False
        try:
            self.action()
        except (VxlanNetError, OSError) as exc:
            self.failed(exc, now)
            return False
        self.pending = False
        self.backoff.reset()
        self.faults.cleared(self.kind)
        return True


def retry_in_background(step: RetriedStep, done: threading.Event, name: str) -> threading.Thread:
    """Run `step` in a daemon thread until it succeeds or `done` is set (the health port, which the
    agent must not wait for: it serves /readyz while the agent still waits for etcd)."""

    def keep_trying() -> None:
        step.request()
        while not done.is_set() and not step.run_if_due():
            done.wait(step.seconds_until_due() or 0.0)

    thread = threading.Thread(target=keep_trying, name=name, daemon=True)
    thread.start()
    return thread


def in_background(call: Callable[[], T], name: str) -> "Future[T]":
    """`call()` in a daemon thread; its result or exception in the returned future.

    For etcd requests: one that hangs until its deadline (5 s per endpoint while etcd drops packets)
    must hold up neither the loop that polls the future nor the agent's exit.
    """
    future: "Future[T]" = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(call())
        except BaseException as exc:  # handed over, raised again by future.result()
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
