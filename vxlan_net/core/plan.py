"""The difference between desired and actual overlay entries, in a safe order, and what applying it did
(ApplyResult: the contract between the reconciler and the netlink door)."""

from __future__ import annotations

import dataclasses
from vxlan_net.core.desired import Entry, FdbEntry, Neighbour, OverlayEntries, Route


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to write to the kernel; apply the fields in the order they are declared.

    Additions go neighbour -> FDB -> route, so a route never points at a VTEP the
    kernel would have to ARP for; removals go route -> FDB -> neighbour. A peer
    changing mode has one route class's route upserted before the other's is removed:
    both hold the same prefix, so the upsert replaces ours in place (no moment
    without a route), and the removal, which names the device and gateway, then
    finds nothing to delete.
    Upserts use replace semantics, so a changed MAC or public IP overwrites in place
    (a route only where the one in place is vxlan-net's: see kernel.apply_plan).
    """

    upsert_neighbours: tuple[Neighbour, ...] = ()
    upsert_fdb: tuple[FdbEntry, ...] = ()
    upsert_routes: tuple[Route, ...] = ()
    upsert_direct_routes: tuple[Route, ...] = ()
    remove_routes: tuple[Route, ...] = ()
    remove_direct_routes: tuple[Route, ...] = ()
    remove_fdb: tuple[FdbEntry, ...] = ()
    remove_neighbours: tuple[Neighbour, ...] = ()

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in dataclasses.fields(self))

    def __len__(self) -> int:
        return sum(len(getattr(self, f.name)) for f in dataclasses.fields(self))


def plan_changes(desired: OverlayEntries, actual: OverlayEntries) -> Plan:
    """Compute the minimal ordered change that turns `actual` into `desired`.

    Within one kind the order does not matter to the kernel, so entries are not
    sorted (sorting 15,000 dataclasses cost more than sending them).
    """
    stale_neighbours, stale_routes = actual.neighbours - desired.neighbours, actual.routes - desired.routes
    stale_direct_routes = actual.direct_routes - desired.direct_routes
    # Which stale entries an upsert overwrites in place: only looked at when there are any (a resync
    # that finds the kernel as it should be hashes no address or subnet).
    wanted_neigh_ips = {n.ip for n in desired.neighbours} if stale_neighbours else ()
    wanted_route_subnets = {r.subnet for r in desired.routes} if stale_routes else ()
    wanted_direct_subnets = {r.subnet for r in desired.direct_routes} if stale_direct_routes else ()
    return Plan(
        upsert_neighbours=tuple(desired.neighbours - actual.neighbours),
        upsert_fdb=tuple(desired.fdb - actual.fdb),
        upsert_routes=tuple(desired.routes - actual.routes),
        upsert_direct_routes=tuple(desired.direct_routes - actual.direct_routes),
        remove_routes=tuple(r for r in stale_routes if r.subnet not in wanted_route_subnets),
        remove_direct_routes=tuple(r for r in stale_direct_routes if r.subnet not in wanted_direct_subnets),
        # A stale FDB entry is removed even when its MAC is wanted with another dst:
        # replace only rewrites one remote, and a leftover remote would duplicate traffic.
        remove_fdb=tuple(actual.fdb - desired.fdb),
        remove_neighbours=tuple(n for n in stale_neighbours if n.ip not in wanted_neigh_ips),
    )


@dataclasses.dataclass(frozen=True)
class ApplyFailure:
    """One entry the kernel refused; `action` is the Plan field it came from."""

    action: str
    entry: Entry
    errno: int
    reason: str

    def __str__(self) -> str:
        return f"{self.action} {self.entry}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class ApplyResult:
    """What apply_plan did: entries in place (removals of absent entries count) and refusals."""

    applied: int = 0
    failures: tuple[ApplyFailure, ...] = ()
    conflicts: tuple[ApplyFailure, ...] = ()
    """Routes not written because someone else's route holds the prefix: left alone, not a failure
    (retrying cannot help until that route is deleted)."""

    @property
    def ok(self) -> bool:
        return not self.failures
