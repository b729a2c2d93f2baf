"""The only writer of the overlay's kernel entries: declare, then apply the difference."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterable, Mapping, Optional, Protocol

from vxlan_net.core.desired import OverlayEntries, PeerEntries, entries_by_vtep, peer_entries, without_field
from vxlan_net.core.direct import DirectReach
from vxlan_net.core.errors import VxlanNetError
from vxlan_net.core.families import IPAddress, IPNetwork
from vxlan_net.core.lease import Lease
from vxlan_net.core.plan import ApplyResult, Plan, plan_changes

log = logging.getLogger(__name__)


class OverlayKernel(Protocol):
    """The part of the netlink door the reconciler needs (vxlan_net.doors.kernel)."""

    def read_overlay_entries(self, ifname: str, *, underlay: Optional[str] = None) -> OverlayEntries: ...

    def apply_plan(self, ifname: str, plan: Plan, *, underlay: Optional[str] = None) -> ApplyResult: ...


@dataclasses.dataclass(frozen=True)
class ReconcileResult:
    ok: bool
    changes: int
    duration: float
    error: Optional[Exception] = None
    full: bool = True
    """True when the pass diffed against a fresh read of the kernel."""


class Reconciler:
    """Keeps the VXLAN devices' neighbour, FDB and route entries equal to the leases.

    Calico's model: a full pass diffs every desired entry against a fresh read of
    the kernel (on start, every resync interval, and after any failure), so
    entries changed by hand are corrected. Between full passes, a batch of lease
    changes is applied as a targeted diff of just the touched peers (and the peers
    sharing a touched MAC) against their entries as last read or written: a
    fresh read of every entry costs ~30 ms at 1,000 peers, which alone would
    eat most of a 100 ms convergence budget. A failed pass is not fatal: it is
    logged once, counted, and forces the next pass to be a full one.

    Each peer's entries are computed once per change of its lease (or of which peers
    are direct) and kept: a full pass builds no entry, so its cost is the kernel
    read and a diff of objects whose hash is cached.

    A node has one VTEP per underlay family (`vteps`: {4: "vxnet.1", 6: "vxnet6.1"}); each pass
    covers them all, the direct routes (on `underlay`) beside the first one's entries.
    """

    def __init__(self, ifname: str, kernel: OverlayKernel, underlay: Optional[str] = None,
                 vteps: Optional[Mapping[int, str]] = None, pod_families: Iterable[int] = (4,)):
        self.vteps = dict(sorted((vteps or {4: ifname}).items()))
        self.ifname = ifname
        self.kernel = kernel
        self.underlay = underlay
        """The device direct routes go on; None: no direct routes are read or written."""
        self.pod_families = tuple(pod_families)
        self._reach: Optional[DirectReach] = None  # None: every peer tunnelled
        self._peers: dict[IPNetwork, Lease] = {}  # by the subnet a lease is known by
        self._macs: dict[str, tuple[IPNetwork, ...]] = {}
        """VTEP MAC -> the peers using it: nearly always one (a tuple, not a 216-byte set per peer)."""
        self._shares: dict[IPNetwork, PeerEntries] = {}  # each peer's desired entries, computed when first needed
        self._dirty_peers: set[IPNetwork] = set()
        self._dirty_macs: set[str] = set()
        self._public_ips: dict[IPAddress, int] = {}  # peers' public IPs -> how many peers have it
        self._touched_public_ips: set[IPAddress] = set()
        self._known: Optional[dict[IPNetwork, PeerEntries]] = None
        """Per peer, its entries in the kernel as last read or written; None: a full pass is due."""
        self.failures_in_a_row = 0
        self.peers_programmed = 0
        self.route_conflicts: dict[IPNetwork, str] = {}
        """Peer subnets whose route someone else holds, with why: warned about once each."""

    # -- declaring ---------------------------------------------------------------

    def set_peers(self, peers: Iterable[Lease]) -> None:
        """Declare the complete set of remote leases; nothing touches the kernel until reconcile()."""
        wanted = {lease.subnet: lease for lease in peers}
        for subnet in [s for s in self._peers if s not in wanted]:
            self._forget(subnet)
        for lease in wanted.values():
            if self._peers.get(lease.subnet) != lease:
                self._declare(lease)

    def update_peers(self, added_or_updated: Iterable[Lease] = (), removed: Iterable[IPNetwork] = ()) -> None:
        """Declare a change to the remote leases (cheap: only the touched ones)."""
        for subnet in removed:
            self._forget(subnet)
        for lease in added_or_updated:
            self._declare(lease)

    @staticmethod
    def _endpoints(lease: Lease) -> list[tuple[IPAddress, str]]:
        return [lease.endpoint(f) for f in sorted(lease.underlays)]  # type: ignore[misc]

    def _declare(self, lease: Lease) -> None:
        self._forget(lease.subnet)
        self._peers[lease.subnet] = lease
        self._touch(lease)
        for address, mac in self._endpoints(lease):
            owners = self._macs.get(mac, ())
            if lease.subnet not in owners:  # (both VTEPs of a peer may have one MAC)
                self._macs[mac] = owners + (lease.subnet,)
            self._public_ips[address] = self._public_ips.get(address, 0) + 1

    def _forget(self, subnet: IPNetwork) -> None:
        old = self._peers.pop(subnet, None)
        self._shares.pop(subnet, None)
        for pod_subnet in (old.subnets if old else (subnet,)):
            self.route_conflicts.pop(pod_subnet, None)
        if old is None:
            return
        self._touch(old)
        for address, mac in self._endpoints(old):
            owners = tuple(s for s in self._macs.pop(mac, ()) if s != subnet)
            if owners:
                self._macs[mac] = owners
            left = self._public_ips.pop(address) - 1
            if left:
                self._public_ips[address] = left

    def _touch(self, lease: Lease) -> None:
        self._dirty_peers.add(lease.subnet)
        for address, mac in self._endpoints(lease):
            self._dirty_macs.add(mac)
            self._touched_public_ips.add(address)

    def peer_public_ips(self) -> frozenset[IPAddress]:
        return frozenset(self._public_ips)

    def has_public_ip(self, address: IPAddress) -> bool:
        """Whether some peer has this public IP (cheap, unlike peer_public_ips())."""
        return address in self._public_ips

    def take_touched_public_ips(self) -> set[IPAddress]:
        """The public IPs of the peers declared or forgotten since the last call (whether each is still
        a peer's: has_public_ip): what a filter of peer sources must look at again."""
        touched, self._touched_public_ips = self._touched_public_ips, set()
        return touched

    def set_reach(self, reach: Optional[DirectReach]) -> None:
        """Declare which peers are direct (None: none, direct routing is off); when that changes, the next
        pass is a full one, as any peer's mode may have changed."""
        if reach != self._reach:
            self._reach = reach
            self._shares.clear()
            self.request_full_pass()

    def _share(self, subnet: IPNetwork) -> PeerEntries:
        """The peer's desired entries (cached until its lease or the direct peers change)."""
        share = self._shares.get(subnet)
        if share is None:
            share = peer_entries(self._peers[subnet], tuple(self.vteps), self.pod_families,
                                 self._reach.is_direct if self._reach else None)
            if self.underlay is None:  # nowhere to put direct routes: none are wanted (direct routing needs it)
                share = without_field(share, "direct_routes")
            self._shares[subnet] = share
        return share

    def _all_shares(self) -> dict[IPNetwork, PeerEntries]:
        """Every peer's entries (a copy of the cache: a dict copy keeps the keys' hashes, no subnet is hashed)."""
        if len(self._shares) < len(self._peers):
            for subnet in self._peers.keys() - self._shares.keys():
                self._share(subnet)
        return dict(self._shares)

    @property
    def desired(self) -> OverlayEntries:
        """The first VTEP's desired entries (with the direct routes)."""
        return entries_by_vtep(self._all_shares().values(), self.vteps)[next(iter(self.vteps))]

    # -- applying ----------------------------------------------------------------

    def request_full_pass(self) -> None:
        """The next reconcile() re-reads the kernel (the periodic resync)."""
        self._known = None

    def reconcile(self) -> ReconcileResult:
        started = time.monotonic()
        full = self._known is None
        changes, failed = 0, None
        try:
            if full:
                touched = shares = self._all_shares()
            else:
                touched = self._dirty_peers.union(*(self._macs.get(m, ()) for m in self._dirty_macs))
                held = entries_by_vtep((self._known[s] for s in touched if s in self._known), self.vteps)
                shares = {s: self._share(s) for s in touched if s in self._peers}
            wanted = entries_by_vtep(shares.values(), self.vteps)
            plans = []
            for family, ifname in self.vteps.items():
                underlay = self.underlay if family == next(iter(self.vteps)) else None
                before = self.kernel.read_overlay_entries(ifname, underlay=underlay) if full else held[family]
                plans.append((family, ifname, underlay, plan_changes(wanted[family], before)))
            for ifname, underlay, moving in self._moves_first(plans):
                self._apply(ifname, moving, underlay)
            for _, ifname, underlay, plan in plans:
                try:
                    self._apply(ifname, plan, underlay)
                except VxlanNetError as exc:  # the other VTEPs still get their changes
                    failed = failed or exc
                changes += len(plan)
            if failed is not None:
                raise failed
        except VxlanNetError as exc:
            self._known = None
            self._note_failure(exc)
            return ReconcileResult(False, 0, time.monotonic() - started, exc, full)
        if full:
            self._known = shares
        else:
            for subnet in touched:
                if subnet in shares:
                    self._known[subnet] = shares[subnet]
                else:
                    self._known.pop(subnet, None)
        self._dirty_peers, self._dirty_macs = set(), set()
        self._note_success(changes)
        return ReconcileResult(True, changes, time.monotonic() - started, None, full)

    @staticmethod
    def _moves_first(plans: list) -> list[tuple[str, Optional[str], Plan]]:
        """(VTEP, underlay, Plan) removing the routes that move from one VTEP to the other, to apply before
        any upsert (the kernel refuses an IPv6 onlink route while a route on another device covers its
        gateway)."""
        upserted = {f: {r.subnet for r in plan.upsert_routes} for f, _, _, plan in plans}
        moves = []
        for family, ifname, underlay, plan in plans:
            elsewhere = set().union(*(s for f, s in upserted.items() if f != family))
            leaving = tuple(r for r in plan.remove_routes if r.subnet in elsewhere)
            if leaving:
                moves.append((ifname, underlay, Plan(remove_routes=leaving)))
        return moves

    def _apply(self, ifname: str, plan: Plan, underlay: Optional[str]) -> None:
        if plan.empty:
            return
        result = self.kernel.apply_plan(ifname, plan, underlay=underlay)
        self._note_conflicts(plan, result.conflicts)
        if result.failures:
            raise VxlanNetError(f"{len(result.failures)} of {len(plan)} changes failed, first: {result.failures[0]}")

    def _note_conflicts(self, plan: Plan, conflicts) -> None:
        """Someone else's route for a peer's subnet is left alone; retrying cannot help until it goes,
        so it is not a failed pass: one warning per subnet, one line when it is resolved."""
        now = {c.entry.subnet: c.reason for c in conflicts}
        for subnet, reason in now.items():
            if subnet not in self.route_conflicts:
                log.warning("not routing %s into the overlay: %s", subnet, reason)
        for route in plan.upsert_routes + plan.upsert_direct_routes:
            if route.subnet in self.route_conflicts and route.subnet not in now:
                log.info("route for %s no longer conflicts; it goes into the overlay now", route.subnet)
                del self.route_conflicts[route.subnet]
        self.route_conflicts.update(now)

    def _note_success(self, changes: int) -> None:
        if self.failures_in_a_row:
            log.info("overlay entries back in sync after %d failed passes", self.failures_in_a_row)
        elif changes:
            log.info("overlay entries: %d changes applied (%d peers)", changes, len(self._peers))
        self.failures_in_a_row = 0
        self.peers_programmed = len(self._peers)

    def _note_failure(self, exc: Exception) -> None:
        self.failures_in_a_row += 1
        if self.failures_in_a_row == 1:
            log.warning("overlay reconcile failed, will retry: %s", exc)
        else:
            log.debug("overlay reconcile failed again (%d in a row): %s", self.failures_in_a_row, exc)
