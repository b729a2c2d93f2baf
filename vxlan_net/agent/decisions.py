"""What the agent decides, apart from doing it: pure functions of what it knows, tested without root or etcd
(tests/test_agent_decisions.py). The loop (loop.py) asks these, then acts through its doors."""

from __future__ import annotations

import dataclasses
from typing import Optional

from vxlan_net.core.config import NetworkConfig
from vxlan_net.core.errors import InvalidLease
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
        parse_lease_value(held.subnet, held.to_json(), config)
    except InvalidLease as exc:
        return REFUSE, str(exc)
    return RESTORE, ""


def next_resync_delay(interval: float, failures_in_a_row: int) -> float:
    """The resync interval, shortened after failed passes (1, 2, 4 ... 32 s, never above the interval)."""
    if not failures_in_a_row:
        return interval
    return min(interval, 2.0 ** min(failures_in_a_row, 5))
