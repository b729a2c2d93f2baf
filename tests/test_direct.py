"""Direct routing's pure parts: which peer is direct, and the entries and plan of each mode."""

import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from vxlan_net.core.desired import FdbEntry, MainRoute, Neighbour, OverlayEntries, Route, desired_entries
from vxlan_net.core.direct import DirectReach
from vxlan_net.core.lease import Lease
from vxlan_net.core.names import ROUTE_PROTO
from vxlan_net.core.plan import plan_changes

NEAR = Lease(IPv4Network("198.19.2.0/24"), IPv4Address("198.18.1.12"), "0a:00:00:00:00:02")
FAR = Lease(IPv4Network("198.19.3.0/24"), IPv4Address("198.18.2.13"), "0a:00:00:00:00:03")


def route(dst, gateway=None, device="eth0", protocol=2, metric=0, scope=0) -> MainRoute:
    return MainRoute(IPv4Network(dst), IPv4Address(gateway) if gateway else None, device, protocol, scope, metric)


NODE_ROUTES = [route("198.18.1.0/24", scope=253), route("0.0.0.0/0", "198.18.1.1")]


@pytest.mark.parametrize("routes, why", [
    ([], "no route at all"),
    ([route("0.0.0.0/0", "198.18.1.1")], "only a default route via a router"),
    ([route("198.18.1.0/24", scope=253, device="eth1")], "connected, but on another device than the underlay"),
    ([route("198.18.1.0/24", scope=253), route("198.18.1.12/32", "198.18.1.1")], "a more specific route via a router"),
    ([route("198.18.1.0/24", "198.18.1.1", metric=10), route("198.18.1.0/24", scope=253, metric=20)],
     "the gateway route has the lower metric"),
    ([route("198.18.1.0/24", device="vxnet.1", protocol=ROUTE_PROTO)], "a route of ours (pod subnets) never decides"),
])
def test_a_peer_not_reached_through_a_connected_route_on_the_underlay_is_tunnelled(routes, why):
    assert not DirectReach.from_routes(routes, "eth0").is_direct(NEAR.public_ip), why


def test_a_peer_on_the_underlays_connected_network_is_direct_and_one_behind_the_router_is_not():
    reach = DirectReach.from_routes(NODE_ROUTES, "eth0")
    assert reach.is_direct(NEAR.public_ip) and not reach.is_direct(FAR.public_ip)
    lower_metric_wins = DirectReach.from_routes(
        [route("198.18.1.0/24", "198.18.1.1", metric=20), route("198.18.1.0/24", scope=253, metric=10)], "eth0")
    assert lower_metric_wins.is_direct(NEAR.public_ip)


def test_reach_compares_by_the_routes_that_decide_so_a_change_is_noticed():
    assert DirectReach.from_routes(NODE_ROUTES, "eth0") == DirectReach.from_routes(list(reversed(NODE_ROUTES)), "eth0")
    assert DirectReach.from_routes(NODE_ROUTES, "eth0") != DirectReach.from_routes(NODE_ROUTES[1:], "eth0")


def test_a_direct_peer_gets_one_route_via_its_public_ip_and_no_neighbour_or_fdb_entry():
    entries = desired_entries([NEAR, FAR], DirectReach.from_routes(NODE_ROUTES, "eth0").is_direct)
    assert entries.direct_routes == {Route(NEAR.subnet, NEAR.public_ip)}
    assert entries.routes == {Route(FAR.subnet, FAR.subnet.network_address)}
    assert entries.neighbours == {Neighbour(FAR.subnet.network_address, FAR.vtep_mac)}
    assert entries.fdb == {FdbEntry(FAR.vtep_mac, FAR.public_ip)}
    assert desired_entries([NEAR, FAR]) == desired_entries([NEAR, FAR], lambda ip: False)


def test_a_peer_turning_direct_loses_its_three_tunnel_entries_and_back_again():
    tunnelled, direct = desired_entries([NEAR]), desired_entries([NEAR], lambda ip: True)
    to_direct = plan_changes(direct, tunnelled)
    assert to_direct.upsert_direct_routes == (Route(NEAR.subnet, NEAR.public_ip),)
    assert (set(to_direct.remove_routes), set(to_direct.remove_fdb), set(to_direct.remove_neighbours)) == (
        tunnelled.routes, tunnelled.fdb, tunnelled.neighbours)
    assert len(to_direct) == 4
    to_tunnel = plan_changes(tunnelled, direct)
    assert to_tunnel.remove_direct_routes == (Route(NEAR.subnet, NEAR.public_ip),) and len(to_tunnel) == 4
    fields = list(to_direct.__dataclass_fields__)
    # Each class's upsert comes before either removal: it replaces the other class's route in place.
    assert max(fields.index("upsert_routes"), fields.index("upsert_direct_routes")) < min(
        fields.index("remove_routes"), fields.index("remove_direct_routes"))


def test_a_direct_peer_whose_public_ip_changes_is_replaced_not_removed():
    moved = Lease(NEAR.subnet, IPv4Address("198.18.1.14"), NEAR.vtep_mac)
    plan = plan_changes(desired_entries([moved], lambda ip: True), desired_entries([NEAR], lambda ip: True))
    assert plan.upsert_direct_routes == (Route(NEAR.subnet, moved.public_ip),) and not plan.remove_direct_routes


def test_deciding_5000_peers_takes_well_under_a_resync_pass():
    routes = NODE_ROUTES + [route(f"198.19.{n // 256}.{n % 256}/32", "198.18.1.1") for n in range(2000)]
    reach = DirectReach.from_routes(routes, "eth0")
    peers = [IPv4Address(int(IPv4Address("198.18.0.0")) + n) for n in range(5000)]
    started = time.monotonic()
    direct = sum(reach.is_direct(ip) for ip in peers)
    assert direct == 256 and time.monotonic() - started < 1.0
    assert OverlayEntries() == desired_entries([], reach.is_direct)
