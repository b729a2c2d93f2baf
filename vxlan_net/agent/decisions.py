"""What the agent decides, apart from doing it: pure functions of what it knows, tested without root or etcd
(tests/test_agent_decisions.py). The loop (loop.py) asks these, then acts through its doors."""

from __future__ import annotations

import dataclasses
from typing import Collection, Optional

from vxlan_net.core.config import NetworkConfig
from vxlan_net.core.errors import InvalidLease
from vxlan_net.core.families import IPAddress
from vxlan_net.core.lease import Lease, parse_lease_value
from vxlan_net.core.lease_book import LeaseChange

KEEP, RESTORE, REFUSE = "keep", "restore", "refuse"


@dataclasses.dataclass(frozen=True)
class Response:
    """What to do about one change of the lease book."""

    reacquire: bool = False
    """Our record was deleted: acquire a lease again (the same subnet if it is still free)."""
    check_own_record: bool = False
    """Our record was written, or a whole listing came in: compare it with what we hold (own_record_action)."""
    full_pass: bool = False
    """Re-declare every peer and re-read the kernel."""
    targeted_pass: bool = False
    """Program just the peers the change touched."""


def respond_to(change: LeaseChange, listing: bool) -> Response:
    """A listing (or losing our own record) is answered with a full pass, a batch moving peers with a
    targeted one; a batch touching nobody programs nothing."""
    lost = change.own_lease_removed
    full = listing or lost
    return Response(reacquire=lost, check_own_record=not lost and (change.own_record_changed or listing),
                    full_pass=full, targeted_pass=not full and change.peers_changed)


def own_record_action(held: Lease, recorded: Optional[Lease], config: NetworkConfig) -> tuple[str, str]:
    """(KEEP, "") when etcd holds our record as we hold it; (REFUSE, why) when what we hold is itself
    invalid for this network (writing it back would only make every agent skip it again); else (RESTORE, "")."""
    if recorded == held:
        return KEEP, ""
    try:
        parse_lease_value(held.key, held.to_json(), config)
    except InvalidLease as exc:
        return REFUSE, str(exc)
    return RESTORE, ""


def next_resync_delay(interval: float, failures_in_a_row: int) -> float:
    """The resync interval, shortened after failed passes (1, 2, 4 ... 32 s, never above the interval)."""
    if not failures_in_a_row:
        return interval
    return min(interval, 2.0 ** min(failures_in_a_row, 5))


ADDRESS_SETTLE = 2.0
"""Seconds a new underlay address must stay the one to follow before the agent moves to it: an address
removed and re-added, or two addresses briefly present, must not make the lease record churn."""


def address_to_follow(held: IPAddress, explicit: bool, present: Collection[IPAddress],
                      primary: Optional[IPAddress]) -> Optional[IPAddress]:
    """The public IP this node should use now; None: keep what we hold (nothing better is known).

    `present`: the addresses where `held` may live (the underlay interface's, or every address of the
    node for an explicit --public-ip); `primary`: the underlay interface's primary address, if any.
    The held address wins while it is present, so a second address never moves us; an explicit
    --public-ip is never replaced."""
    if held in present:
        return held
    if explicit:
        return None
    return primary


@dataclasses.dataclass
class SettledAddress:
    """Moves to a new address only once it has been the one to follow for `settle` seconds in a row."""

    settle: float = ADDRESS_SETTLE
    candidate: Optional[IPAddress] = None
    since: float = 0.0

    def observe(self, held: IPAddress, wanted: Optional[IPAddress], now: float) -> Optional[IPAddress]:
        """The address to move to now, if any; `wanted` is address_to_follow's answer at `now`."""
        if wanted is None or wanted == held:
            self.candidate = None
            return None
        if wanted != self.candidate:
            self.candidate, self.since = wanted, now
        if now - self.since < self.settle:
            return None
        self.candidate = None
        return wanted

    def check_at(self) -> Optional[float]:
        """When to look again even without news: the moment the candidate would have settled."""
        return None if self.candidate is None else self.since + self.settle
