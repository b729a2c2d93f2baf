"""Reconciler logic against an in-memory kernel (the real kernel is covered in integration/)."""

import dataclasses
import errno
import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from vxlan_net.agent.reconciler import Reconciler
from vxlan_net.core.desired import FdbEntry, MainRoute, OverlayEntries, Route, desired_entries
from vxlan_net.core.direct import DirectReach
from vxlan_net.core.errors import KernelError
from vxlan_net.core.lease import Lease
from vxlan_net.core.plan import ApplyFailure, ApplyResult


def lease(n: int, mac_suffix: int | None = None) -> Lease:
    return Lease(IPv4Network(f"198.19.{n}.0/24"), IPv4Address(f"198.18.{n}.2"),
                 f"0a:00:00:00:00:{mac_suffix if mac_suffix is not None else n:02x}")


class MemoryKernel:
    """Holds entries like the kernel would; counts reads; can be told to fail."""

    def __init__(self):
        self.entries = OverlayEntries()
        self.reads = 0
        self.fail = False
        self.applied = []

    def read_overlay_entries(self, ifname, underlay=None):
        self.reads += 1
        return self.entries

    def apply_plan(self, ifname, plan, underlay=None):
        if self.fail:
            raise KernelError("injected")
        assert underlay is not None or not (plan.upsert_direct_routes or plan.remove_direct_routes)
        self.applied.append(plan)
        e = self.entries
        # One route per prefix in the main table, whichever class: an upsert replaces the other's in place.
        upserted = {u.subnet for u in plan.upsert_routes + plan.upsert_direct_routes}
        self.entries = OverlayEntries(
            (e.neighbours - {x for x in e.neighbours if x.ip in {n.ip for n in plan.upsert_neighbours}}
             - set(plan.remove_neighbours)) | set(plan.upsert_neighbours),
            (e.fdb - set(plan.remove_fdb)) | set(plan.upsert_fdb),
            (e.routes - {r for r in e.routes if r.subnet in upserted}
             - set(plan.remove_routes)) | set(plan.upsert_routes),
            (e.direct_routes - {r for r in e.direct_routes if r.subnet in upserted}
             - set(plan.remove_direct_routes)) | set(plan.upsert_direct_routes),
        )
        return ApplyResult(len(plan))


def test_first_pass_reads_the_kernel_then_batches_touch_only_what_changed():
    kernel = MemoryKernel()
    rec = Reconciler("vxnet.1", kernel)
    rec.set_peers([lease(n) for n in range(1, 51)])
    result = rec.reconcile()
    assert result.ok and result.full and result.changes == 150 and kernel.reads == 1
    rec.update_peers([lease(60)])
    result = rec.reconcile()
    assert result.ok and not result.full and result.changes == 3 and kernel.reads == 1
    assert kernel.entries == desired_entries([lease(n) for n in [*range(1, 51), 60]])


def test_a_new_mac_replaces_entries_and_drops_the_stale_fdb_without_a_full_read():
    kernel = MemoryKernel()
    rec = Reconciler("vxnet.1", kernel)
    rec.set_peers([lease(1), lease(2)])
    rec.reconcile()
    rec.update_peers([lease(2, mac_suffix=0x99)])
    assert rec.reconcile().changes == 3  # neighbour + FDB upsert, old FDB removed
    assert FdbEntry("0a:00:00:00:00:02", IPv4Address("198.18.2.2")) not in kernel.entries.fdb
    assert kernel.entries == desired_entries([lease(1), lease(2, mac_suffix=0x99)])


def test_removal_and_periodic_full_pass_heal_drift():
    kernel = MemoryKernel()
    rec = Reconciler("vxnet.1", kernel)
    rec.set_peers([lease(1), lease(2)])
    rec.reconcile()
    rec.update_peers(removed=[lease(2).subnet])
    rec.reconcile()
    assert kernel.entries == desired_entries([lease(1)])
    kernel.entries = OverlayEntries()  # someone flushed the device by hand
    assert rec.reconcile().changes == 0  # a batch pass trusts what it knows ...
    rec.request_full_pass()
    assert rec.reconcile().changes == 3  # ... the resync re-reads and heals
    assert kernel.entries == desired_entries([lease(1)])


def test_a_failure_forces_the_next_pass_to_be_full():
    kernel = MemoryKernel()
    rec = Reconciler("vxnet.1", kernel)
    rec.set_peers([lease(1)])
    rec.reconcile()
    kernel.fail = True
    rec.update_peers([lease(2)])
    result = rec.reconcile()
    assert not result.ok and rec.failures_in_a_row == 1
    kernel.fail = False
    result = rec.reconcile()
    assert result.ok and result.full and kernel.reads == 2
    assert kernel.entries == desired_entries([lease(1), lease(2)])


def test_two_leases_sharing_a_mac_keep_its_fdb_entry_until_both_are_gone():
    kernel = MemoryKernel()
    rec = Reconciler("vxnet.1", kernel)
    rec.set_peers([lease(1, mac_suffix=7), lease(2, mac_suffix=7)])
    rec.reconcile()
    rec.update_peers(removed=[lease(1).subnet])
    rec.reconcile()
    assert kernel.entries == desired_entries([lease(2, mac_suffix=7)])


def test_a_peer_giving_both_its_vteps_one_mac_can_leave_and_come_back():
    one_mac = "0a:00:00:00:00:07"
    dual = Lease(IPv4Network("198.19.7.0/24"), IPv4Address("198.18.7.2"), one_mac, 1,
                 IPv6Network("fd19:0:0:7::/64"), IPv6Address("fd18::7:2"), one_mac)
    other = lease(8, mac_suffix=7)  # a second peer with that MAC: it keeps the MAC's FDB entry
    kernel = MemoryKernel()
    rec = Reconciler("vxnet.1", kernel)  # one IPv4 VTEP: the dual peer's FDB entry is its IPv4 endpoint's
    rec.set_peers([dual, other])
    assert rec.reconcile().ok
    for _ in range(2):
        rec.update_peers(removed=[dual.subnet])
        assert rec.reconcile().ok and kernel.entries == desired_entries([other])
        rec.update_peers([dual])
        assert rec.reconcile().ok and kernel.entries == desired_entries([dual, other])
    rec.update_peers(removed=[other.subnet, dual.subnet])
    assert rec.reconcile().ok and kernel.entries == OverlayEntries() and rec.peer_public_ips() == frozenset()


class ConflictingKernel(MemoryKernel):
    """A kernel where someone else's routes hold some prefixes: apply_plan reports them as conflicts."""

    def __init__(self, foreign):
        super().__init__()
        self.foreign = set(foreign)

    def apply_plan(self, ifname, plan, underlay=None):
        blocked = tuple(r for r in plan.upsert_routes if r.subnet in self.foreign)
        super().apply_plan(ifname, dataclasses.replace(
            plan, upsert_routes=tuple(r for r in plan.upsert_routes if r not in blocked)))
        return ApplyResult(len(plan) - len(blocked), (), tuple(
            ApplyFailure("upsert_routes", r, errno.EEXIST, f"route {r.subnet} dev eth0 proto static is not vxlan-net's")
            for r in blocked))


def test_a_route_conflict_is_logged_once_per_prefix_and_is_no_failed_pass(caplog):
    caplog.set_level(logging.INFO, logger="vxlan_net.agent.reconciler")
    kernel = ConflictingKernel({lease(2).subnet})
    rec = Reconciler("vxnet.1", kernel)
    rec.set_peers([lease(1), lease(2)])
    for _ in range(3):  # resyncs meet the same conflict
        rec.request_full_pass()
        result = rec.reconcile()
        assert result.ok and rec.failures_in_a_row == 0
    assert Route(lease(2).subnet, lease(2).gateway) not in kernel.entries.routes
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["not routing 198.19.2.0/24 into the overlay: "
                      "route 198.19.2.0/24 dev eth0 proto static is not vxlan-net's"]
    kernel.foreign.clear()  # the operator deleted that route
    rec.request_full_pass()
    assert rec.reconcile().ok
    assert kernel.entries == desired_entries([lease(1), lease(2)])
    assert any("198.19.2.0/24 no longer conflicts" in r.getMessage() for r in caplog.records)


# --- direct routing (issue 10) ---


def reach(*connected: str) -> DirectReach:
    """The node's routes: these networks connected on eth0, everything else via a router."""
    routes = [MainRoute(IPv4Network(n), None, "eth0", 2, 253) for n in connected]
    return DirectReach.from_routes(routes + [MainRoute(IPv4Network("0.0.0.0/0"), IPv4Address("198.18.0.1"),
                                                       "eth0", 2)], "eth0")


def test_a_changed_reach_forces_a_full_pass_that_moves_peers_between_modes_leaving_nothing():
    kernel = MemoryKernel()
    rec = Reconciler("vxnet.1", kernel, underlay="eth0")
    rec.set_peers([lease(1), lease(2)])
    assert rec.reconcile().ok and kernel.entries == desired_entries([lease(1), lease(2)])
    rec.set_reach(reach("198.18.1.0/24"))  # lease(1)'s PublicIP 198.18.1.2 is now on our segment
    reads = kernel.reads
    assert rec.reconcile().ok and kernel.reads == reads + 1, "a changed reach must re-read the kernel"
    assert kernel.entries.direct_routes == {Route(lease(1).subnet, lease(1).public_ip)}
    assert kernel.entries == desired_entries([lease(1), lease(2)], lambda ip: ip == lease(1).public_ip)
    rec.set_reach(reach("198.18.1.0/24"))  # the same routes again: no extra read
    assert rec.reconcile().ok and kernel.reads == reads + 1
    rec.set_reach(None)  # direct routing turned off
    assert rec.reconcile().ok and kernel.entries == desired_entries([lease(1), lease(2)])


def test_a_targeted_pass_moves_a_peer_whose_public_ip_changed_between_modes():
    kernel = MemoryKernel()
    rec = Reconciler("vxnet.1", kernel, underlay="eth0")
    rec.set_reach(reach("198.18.1.0/24"))
    rec.set_peers([lease(1), lease(2)])
    assert rec.reconcile().ok
    moved_away = Lease(lease(1).subnet, IPv4Address("198.18.9.2"), lease(1).vtep_mac)
    moved_in = Lease(lease(2).subnet, IPv4Address("198.18.1.3"), lease(2).vtep_mac)
    rec.update_peers([moved_away, moved_in])
    result = rec.reconcile()
    assert result.ok and not result.full
    assert kernel.entries == desired_entries([moved_away, moved_in], lambda ip: ip == moved_in.public_ip)
    assert kernel.entries.direct_routes == {Route(moved_in.subnet, moved_in.public_ip)}


def test_touched_public_ips_name_each_ip_a_change_moved_and_whether_a_peer_still_has_it():
    rec = Reconciler("vxnet.1", MemoryKernel())
    rec.set_peers([lease(n) for n in range(1, 6)])
    assert rec.take_touched_public_ips() == {lease(n).public_ip for n in range(1, 6)}
    assert rec.take_touched_public_ips() == set()  # taken: a second look sees nothing new
    # Hostile: two records claiming one public IP (the book keeps one, the reconciler must not care):
    # forgetting one of them leaves the address allowed.
    twin = Lease(IPv4Network("198.19.7.0/24"), lease(1).public_ip, "0a:00:00:00:00:77")
    rec.update_peers([twin])
    rec.update_peers(removed=[lease(1).subnet])
    assert rec.take_touched_public_ips() == {lease(1).public_ip}
    assert rec.has_public_ip(lease(1).public_ip)
    moved = Lease(lease(2).subnet, IPv4Address("198.18.99.2"), lease(2).vtep_mac)
    rec.update_peers([moved], removed=[twin.subnet])
    assert rec.take_touched_public_ips() == {lease(1).public_ip, lease(2).public_ip, moved.public_ip}
    assert not rec.has_public_ip(lease(1).public_ip) and not rec.has_public_ip(lease(2).public_ip)
    assert rec.peer_public_ips() == {moved.public_ip} | {lease(n).public_ip for n in range(3, 6)}
