"""The only writer of the overlay's kernel entries: declare, then apply the difference."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterable, Optional, Protocol

from .desired import OverlayEntries, desired_entries
from .errors import VxlanNetError
from .lease import Lease
from .plan import Plan, plan_changes

log = logging.getLogger(__name__)


class OverlayKernel(Protocol):
    """The part of the netlink door the reconciler needs (vxlan_net.kernel)."""

    def read_overlay_entries(self, ifname: str) -> OverlayEntries: ...

    def apply_plan(self, ifname: str, plan: Plan): ...


@dataclasses.dataclass(frozen=True)
class ReconcileResult:
    ok: bool
    changes: int
    duration: float
    error: Optional[Exception] = None


class Reconciler:
    """Keeps the VXLAN device's neighbour, FDB and route entries equal to the leases.

    Every pass diffs the desired entries against a fresh read of the kernel, so
    entries deleted or added by hand are corrected on the next pass. A failed
    pass is not fatal: it is logged once, counted, and the next pass retries.
    """

    def __init__(self, ifname: str, kernel: OverlayKernel):
        self.ifname = ifname
        self.kernel = kernel
        self._desired = OverlayEntries()
        self.failures_in_a_row = 0
        self.last_success: float | None = None
        self.peers_programmed = 0
        self._peer_count = 0

    def set_peers(self, peers: Iterable[Lease]) -> None:
        """Declare the remote leases; nothing touches the kernel until reconcile()."""
        peers = list(peers)
        self._desired = desired_entries(peers)
        self._peer_count = len(peers)

    @property
    def desired(self) -> OverlayEntries:
        return self._desired

    def reconcile(self) -> ReconcileResult:
        started = time.monotonic()
        try:
            actual = self.kernel.read_overlay_entries(self.ifname)
            plan = plan_changes(self._desired, actual)
            failures = []
            if not plan.empty:
                result = self.kernel.apply_plan(self.ifname, plan)
                failures = list(getattr(result, "failures", []) or [])
            if failures:
                raise VxlanNetError(f"{len(failures)} of {len(plan)} changes failed, first: {failures[0]}")
        except VxlanNetError as exc:
            self._note_failure(exc)
            return ReconcileResult(False, 0, time.monotonic() - started, exc)
        if self.failures_in_a_row:
            log.info("overlay entries back in sync after %d failed passes", self.failures_in_a_row)
        elif len(plan):
            log.info("overlay entries: %d changes applied (%d peers)", len(plan), self._peer_count)
        self.failures_in_a_row = 0
        self.last_success = time.time()
        self.peers_programmed = self._peer_count
        return ReconcileResult(True, len(plan), time.monotonic() - started)

    def _note_failure(self, exc: Exception) -> None:
        self.failures_in_a_row += 1
        if self.failures_in_a_row == 1:
            log.warning("overlay reconcile failed, will retry: %s", exc)
        else:
            log.debug("overlay reconcile failed again (%d in a row): %s", self.failures_in_a_row, exc)
