"""Desired overlay entries and the ordered plan (pure)."""

from ipaddress import IPv4Address, IPv4Network

from vxlan_net.core.desired import FdbEntry, Neighbour, OverlayEntries, Route, desired_entries
from vxlan_net.core.lease import Lease
from vxlan_net.core.plan import plan_changes

A = Lease(IPv4Network("198.19.2.0/24"), IPv4Address("198.18.2.2"), "0a:00:00:00:00:02")
B = Lease(IPv4Network("198.19.3.0/24"), IPv4Address("198.18.3.2"), "0a:00:00:00:00:03")


def test_each_peer_yields_neighbour_fdb_and_onlink_route():
    entries = desired_entries([A])
    assert entries.neighbours == {Neighbour(IPv4Address("198.19.2.0"), A.vtep_mac)}
    assert entries.fdb == {FdbEntry(A.vtep_mac, A.public_ip)}
    assert entries.routes == {Route(A.subnet, IPv4Address("198.19.2.0"))}
    assert len(desired_entries([A, B])) == 6


def test_plan_from_empty_adds_everything_and_removes_nothing():
    plan = plan_changes(desired_entries([A, B]), OverlayEntries())
    assert len(plan) == 6 and not (plan.remove_routes or plan.remove_fdb or plan.remove_neighbours)
    assert [f for f in plan.__dataclass_fields__][:3] == ["upsert_neighbours", "upsert_fdb", "upsert_routes"]


def test_plan_is_empty_when_in_sync():
    assert plan_changes(desired_entries([A]), desired_entries([A])).empty


def test_departed_peer_is_removed_route_first():
    plan = plan_changes(desired_entries([A]), desired_entries([A, B]))
    fields = list(plan.__dataclass_fields__)
    assert fields.index("remove_routes") < fields.index("remove_fdb") < fields.index("remove_neighbours")
    assert plan.remove_routes == (Route(B.subnet, B.gateway),)
    assert plan.remove_fdb == (FdbEntry(B.vtep_mac, B.public_ip),)
    assert plan.remove_neighbours == (Neighbour(B.gateway, B.vtep_mac),)
    assert not plan.upsert_routes


def test_new_mac_replaces_neighbour_in_place_and_drops_the_old_fdb_entry():
    moved = Lease(A.subnet, A.public_ip, "0a:00:00:00:00:99")
    plan = plan_changes(desired_entries([moved]), desired_entries([A]))
    assert plan.upsert_neighbours == (Neighbour(A.gateway, moved.vtep_mac),)
    assert plan.remove_neighbours == ()  # replaced, never left unresolved
    assert plan.upsert_fdb == (FdbEntry(moved.vtep_mac, A.public_ip),)
    assert plan.remove_fdb == (FdbEntry(A.vtep_mac, A.public_ip),)
    assert not plan.upsert_routes and not plan.remove_routes


def test_new_public_ip_replaces_fdb_destination():
    moved = Lease(A.subnet, IPv4Address("198.18.9.2"), A.vtep_mac)
    plan = plan_changes(desired_entries([moved]), desired_entries([A]))
    assert plan.upsert_fdb == (FdbEntry(A.vtep_mac, moved.public_ip),)
    assert plan.remove_fdb == (FdbEntry(A.vtep_mac, A.public_ip),)
