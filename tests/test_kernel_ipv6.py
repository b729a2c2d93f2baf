"""The netlink door's IPv6 (issue 11) against the real kernel, in throw-away namespaces, checked with
`ip -6`/`bridge`: both VTEP kinds (vxnet.N over an IPv4 underlay carrying dual-stack entries, vxnet6.N over
an IPv6 underlay), dual-stack plans, conflicts, refusals, IPv6 underlay discovery, and ping -6 across two
namespaces joined by VTEPs programmed through apply_plan."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import secrets
import subprocess
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

import pytest
from test_kernel import Namespace, run

from vxlan_net.agent.reconciler import Reconciler
from vxlan_net.core.desired import FdbEntry, Neighbour, OverlayEntries, Route
from vxlan_net.core.lease import Lease
from vxlan_net.core.errors import KernelError, LinkNotFound
from vxlan_net.core.names import vtep_name
from vxlan_net.core.plan import ApplyResult, Plan, plan_changes
from vxlan_net.doors import kernel

pytestmark = pytest.mark.root

VNI = 42
PROTO = str(kernel.ROUTE_PROTO)
UNDERLAY4 = IPv4Address("198.18.0.1")
UNDERLAY6 = IPv6Address("fd18:0:0:1::2")
ROUTER6 = IPv6Address("fd18:0:0:1::1")
VTEP4 = kernel.VtepSpec(  # dual-stack pods over the IPv4 underlay: one device carries both families
    name=vtep_name(VNI, 4), vni=VNI, port=4789, local_ip=UNDERLAY4, underlay_ifname="und0",
    mac="02:42:00:00:00:01", mtu=1450, address=IPv4Interface("198.19.0.0/32"),
    ipv6_address=IPv6Interface("fd19:0:0:0::/128"),
)
VTEP6 = kernel.VtepSpec(  # over the IPv6 underlay: its own MAC, 70 bytes of overhead
    name=vtep_name(VNI, 6), vni=VNI, port=4789, local_ip=UNDERLAY6, underlay_ifname="und0",
    mac="02:42:00:00:00:06", mtu=1430, address=IPv4Interface("198.19.0.0/32"),
    ipv6_address=IPv6Interface("fd19:0:0:0::/128"),
)


def spec(base: kernel.VtepSpec, **changes) -> kernel.VtepSpec:
    return kernel.VtepSpec(**{**base.__dict__, **changes})


class Peer:
    """A dual-stack peer node: its pod subnets, its VTEP MAC and its public addresses."""

    def __init__(self, index: int, mac: str | None = None, public4: str | None = None, public6: str | None = None):
        self.subnet4 = IPv4Network(f"198.19.{index}.0/24")
        self.subnet6 = IPv6Network(f"fd19:0:0:{index:x}::/64")
        self.mac = mac or f"0a:00:00:00:00:{index:02x}"
        self.public4 = IPv4Address(public4 or f"198.18.0.{100 + index}")
        self.public6 = IPv6Address(public6 or f"fd18:0:0:1::{100 + index:x}")

    def entries(self, underlay_family: int) -> OverlayEntries:
        """flannel's entries for this peer on the VTEP of that underlay family, both pod families."""
        public = self.public4 if underlay_family == 4 else self.public6
        return OverlayEntries(
            neighbours=frozenset({Neighbour(self.subnet4.network_address, self.mac),
                                  Neighbour(self.subnet6.network_address, self.mac)}),
            fdb=frozenset({FdbEntry(self.mac, public)}),
            routes=frozenset({Route(self.subnet4, self.subnet4.network_address),
                              Route(self.subnet6, self.subnet6.network_address)}),
        )


def union(*sets: OverlayEntries) -> OverlayEntries:
    return OverlayEntries(*(frozenset().union(*(getattr(s, f) for s in sets))
                            for f in ("neighbours", "fdb", "routes", "direct_routes")))


def iproute2_batches(entries: OverlayEntries, dev: str) -> tuple[str, str]:
    """The entries as `ip -batch` and `bridge -batch` input (iproute2 tells the family from each address)."""
    ip_lines = "".join(f"neigh replace {n.ip} lladdr {n.mac} dev {dev} nud permanent\n" for n in entries.neighbours)
    ip_lines += "".join(f"route replace {r.subnet} via {r.gateway} dev {dev} onlink proto {PROTO}\n"
                        for r in entries.routes)
    return ip_lines, "".join(f"fdb replace {f.mac} dev {dev} dst {f.dst} self permanent\n" for f in entries.fdb)


def sync(name: str, desired: OverlayEntries, underlay: str = "und0") -> ApplyResult:
    """The reconciler's full pass, run inside the namespace."""
    plan = plan_changes(desired, kernel.read_overlay_entries(name, underlay=underlay))
    return kernel.apply_plan(name, plan, underlay=underlay)


# --- what the independent tools see ---


def neighbours6(ns: Namespace, dev: str) -> set[tuple]:
    return {(n["dst"], n.get("lladdr"), tuple(n["state"])) for n in ns.json("ip", "-6", "neigh", "show", "dev", dev)}


def neighbours4(ns: Namespace, dev: str) -> set[tuple]:
    return {(n["dst"], n.get("lladdr"), tuple(n["state"])) for n in ns.json("ip", "-4", "neigh", "show", "dev", dev)}


def fdb(ns: Namespace, dev: str) -> set[tuple]:
    return {(f["mac"], f.get("dst"), f.get("state", "")) for f in ns.json("bridge", "fdb", "show", "dev", dev)
            if f.get("dst")}


def routes6(ns: Namespace, dev: str) -> set[tuple]:
    return {(r["dst"], r.get("gateway"), r.get("protocol"), tuple(r.get("flags", [])))
            for r in ns.json("ip", "-6", "route", "show", "table", "main", "dev", dev) if "gateway" in r}


def routes4(ns: Namespace, dev: str) -> set[tuple]:
    return {(r["dst"], r.get("gateway"), r.get("protocol"), tuple(r.get("flags", [])))
            for r in ns.json("ip", "-4", "route", "show", "table", "main", "dev", dev) if "gateway" in r}


def main_routes6(ns: Namespace, prefix: str) -> list[dict]:
    """Every main-table IPv6 route for exactly `prefix`, as `ip -j -6 route` shows it."""
    return [{k: r.get(k) for k in ("dst", "gateway", "dev", "protocol", "metric", "flags")}
            for r in ns.json("ip", "-6", "route", "show", "table", "main", "exact", prefix)]


def addresses6(ns: Namespace, dev: str) -> set[str]:
    info = ns.json("ip", "-6", "addr", "show", "dev", dev)[0]
    return {f"{a['local']}/{a['prefixlen']}" for a in info["addr_info"]}


def expected_view(peers: list[Peer], underlay_family: int) -> dict[str, set]:
    """What `ip`/`bridge` must show on the VTEP for these peers, in the helpers' tuple forms."""
    return {
        "neigh4": {(str(p.subnet4.network_address), p.mac, ("PERMANENT",)) for p in peers},
        "neigh6": {(str(p.subnet6.network_address), p.mac, ("PERMANENT",)) for p in peers},
        "fdb": {(p.mac, str(p.public4 if underlay_family == 4 else p.public6), "permanent") for p in peers},
        "routes4": {(str(p.subnet4), str(p.subnet4.network_address), PROTO, ("onlink",)) for p in peers},
        "routes6": {(str(p.subnet6), str(p.subnet6.network_address), PROTO, ("onlink",)) for p in peers},
    }


def tool_view(ns: Namespace, dev: str) -> dict[str, set]:
    return {"neigh4": neighbours4(ns, dev), "neigh6": neighbours6(ns, dev), "fdb": fdb(ns, dev),
            "routes4": routes4(ns, dev), "routes6": routes6(ns, dev)}


@pytest.fixture
def ns():
    """A namespace whose underlay und0 holds 198.18.0.1/24 and fd18:0:0:1::2/64 (no DAD: settled at once)."""
    space = Namespace()
    try:
        run("ip", "netns", "add", space.name)
        space.ip("link", "set", "lo", "up")
        space.ip("link", "add", "und0", "mtu", "1500", "type", "veth", "peer", "name", "und1")
        space.ip("addr", "add", f"{UNDERLAY4}/24", "dev", "und0")
        space.ip("-6", "addr", "add", f"{UNDERLAY6}/64", "dev", "und0", "nodad")
        space.ip("link", "set", "und0", "up")
        space.ip("link", "set", "und1", "up")
        yield space
    finally:
        space.close()


# --- the VTEP over either underlay ---


def test_a_vtep_spec_with_an_address_of_the_wrong_family_is_refused():
    with pytest.raises(ValueError, match="not an IPv4 interface"):
        spec(VTEP4, address=IPv6Interface("fd19::/128"))
    with pytest.raises(ValueError, match="not an IPv6 interface"):
        spec(VTEP4, ipv6_address=IPv4Interface("198.19.0.0/32"))
    with pytest.raises(ValueError, match="not an IP address"):
        spec(VTEP6, local_ip="fd18:0:0:1::2")


def test_ensure_vtep_over_an_ipv6_underlay_uses_local6_and_holds_both_addresses(ns):
    index = ns.inside(kernel.ensure_vtep, VTEP6)
    link = ns.link(VTEP6.name)
    data = link["linkinfo"]["info_data"]
    assert VTEP6.name == "vxnet6.42" and link["ifindex"] == index
    assert (data["id"], data["port"], data["local6"], data["link"], data["learning"]) == (
        VNI, 4789, str(UNDERLAY6), "und0", False)
    assert (link["address"], link["mtu"]) == (VTEP6.mac, 1430) and "UP" in link["flags"]
    assert ns.addresses(VTEP6.name) == {"198.19.0.0/32"}
    global_six = {a for a in addresses6(ns, VTEP6.name) if not a.startswith("fe80:")}
    assert global_six == {"fd19::/128"}
    info = ns.json("ip", "-6", "addr", "show", "dev", VTEP6.name)[0]["addr_info"]
    assert not any(a.get("tentative") for a in info if a["local"] == "fd19::"), "added without DAD: usable at once"
    described = ns.inside(kernel.link_info, VTEP6.name)
    assert (described["vxlan"]["local"], described["addresses"], described["ipv6_addresses"]) == (
        str(UNDERLAY6), ["198.19.0.0/32"], ["fd19::/128"])
    assert ns.inside(kernel.ensure_vtep, VTEP6) == index  # idempotent


def test_ensure_vtep_keeps_exactly_its_addresses_and_never_the_link_local_one(ns):
    index = ns.inside(kernel.ensure_vtep, VTEP4)
    link_local = {a for a in addresses6(ns, VTEP4.name) if a.startswith("fe80:")}
    assert link_local, "the kernel gives every IPv6-capable device a link-local address"
    ns.ip("-6", "addr", "add", "fd19:0:0:77::1/64", "dev", VTEP4.name, "nodad")
    ns.ip("addr", "add", "198.19.77.1/24", "dev", VTEP4.name)
    moved = spec(VTEP4, ipv6_address=IPv6Interface("fd19:0:0:9::/128"))
    assert ns.inside(kernel.ensure_vtep, moved) == index
    assert addresses6(ns, VTEP4.name) == {"fd19:0:0:9::/128"} | link_local
    assert ns.addresses(VTEP4.name) == {"198.19.0.0/32"}
    ipv6_only = spec(VTEP4, address=None)  # an IPv6-only pod network: the /32 goes
    assert ns.inside(kernel.ensure_vtep, ipv6_only) == index
    assert not any(link["addr_info"] for link in ns.json("ip", "-4", "addr", "show", "dev", VTEP4.name))
    assert addresses6(ns, VTEP4.name) == {"fd19::/128"} | link_local
    ipv4_only = spec(VTEP4, ipv6_address=None)  # and an IPv4-only one: every global IPv6 address goes
    ns.inside(kernel.ensure_vtep, ipv4_only)
    assert addresses6(ns, VTEP4.name) == link_local
    assert ns.addresses(VTEP4.name) == {"198.19.0.0/32"}


def test_an_ipv6_vtep_moves_its_local_address_in_place_keeping_mac_and_entries(ns):
    index = ns.inside(kernel.ensure_vtep, VTEP6)
    peers = [Peer(1), Peer(2)]
    assert ns.inside(sync, VTEP6.name, union(*(p.entries(6) for p in peers))).ok
    ns.ip("-6", "addr", "add", "fd18:0:0:1::7/64", "dev", "und0", "nodad")
    moved = spec(VTEP6, local_ip=IPv6Address("fd18:0:0:1::7"))
    assert ns.inside(kernel.ensure_vtep, moved) == index
    link = ns.link(VTEP6.name)
    assert (link["ifindex"], link["address"], link["linkinfo"]["info_data"]["local6"]) == (index, VTEP6.mac,
                                                                                           "fd18:0:0:1::7")
    assert tool_view(ns, VTEP6.name) == expected_view(peers, 6)


def test_a_vtep_changing_underlay_family_is_recreated(ns):
    """The kernel cannot turn an IPv4 tunnel into an IPv6 one in place (EOPNOTSUPP): a new device."""
    old = ns.inside(kernel.ensure_vtep, spec(VTEP6, name="vxt0", local_ip=UNDERLAY4))
    index = ns.inside(kernel.ensure_vtep, spec(VTEP6, name="vxt0"))
    link = ns.link("vxt0")
    assert index == link["ifindex"] != old
    assert link["linkinfo"]["info_data"]["local6"] == str(UNDERLAY6)


@pytest.mark.parametrize("vtep", [VTEP4, VTEP6], ids=["vxnet-over-ipv4", "vxnet6-over-ipv6"])
def test_another_vxlan_device_with_our_vni_port_and_local_address_is_a_clear_error_not_a_retry(ns, vtep):
    ns.ip("link", "add", "flannel.42", "type", "vxlan", "id", str(VNI), "dstport", "4789", "local", str(vtep.local_ip),
          "dev", "und0")
    with pytest.raises(KernelError, match=f"cannot create VXLAN device {vtep.name}: another VXLAN device already "
                                          f"uses VNI 42, port 4789 and local address {vtep.local_ip}"):
        ns.inside(kernel.ensure_vtep, vtep)
    assert [link["ifname"] for link in ns.json("ip", "link", "show", "type", "vxlan")] == ["flannel.42"]


# --- dual-stack overlay entries ---


@pytest.mark.parametrize("underlay_family", [4, 6], ids=["vxnet-over-ipv4", "vxnet6-over-ipv6"])
def test_a_dual_stack_plan_is_written_read_back_and_removed(ns, underlay_family):
    vtep = VTEP4 if underlay_family == 4 else VTEP6
    ns.inside(kernel.ensure_vtep, vtep)
    peers = [Peer(i) for i in (1, 2, 3)]
    desired = union(*(p.entries(underlay_family) for p in peers))
    result = ns.inside(sync, vtep.name, desired)
    assert result == ApplyResult(15, ())
    assert tool_view(ns, vtep.name) == expected_view(peers, underlay_family)
    assert ns.inside(kernel.read_overlay_entries, vtep.name, underlay="und0") == desired
    assert ns.inside(kernel.walk_overlay_dumps, vtep.name) == 15
    assert ns.inside(sync, vtep.name, desired) == ApplyResult(0, ())  # in sync: nothing to write
    # One peer leaves, one changes its MAC and public addresses: nothing stale of either family stays.
    now = [peers[0], Peer(3, mac="0a:00:00:00:03:03", public4="198.18.0.203", public6="fd18:0:0:1::203")]
    assert ns.inside(sync, vtep.name, union(*(p.entries(underlay_family) for p in now))).ok
    assert tool_view(ns, vtep.name) == expected_view(now, underlay_family)
    for _ in range(2):  # removal is idempotent
        assert ns.inside(sync, vtep.name, OverlayEntries()).ok
        assert tool_view(ns, vtep.name) == expected_view([], underlay_family)


def test_read_overlay_entries_round_trips_ip_batch_of_both_families_and_ignores_what_is_not_ours(ns):
    ns.inside(kernel.ensure_vtep, VTEP6)
    dev, peers = VTEP6.name, [Peer(4), Peer(5)]
    ip_lines, fdb_lines = iproute2_batches(union(*(p.entries(6) for p in peers)), dev)
    run("ip", "-n", ns.name, "-batch", "-", stdin=ip_lines + (
        f"neigh replace fd19:0:0:50:: lladdr 0a:00:00:00:00:50 dev {dev} nud reachable\n"  # not permanent
        f"neigh replace fd18:0:0:1::9 lladdr 0a:00:00:00:00:51 dev und0 nud permanent\n"  # other device
        f"route replace fd19:0:0:51::/64 via fd19:0:0:51:: dev {dev} onlink\n"  # proto boot: not ours
        f"route replace fd19:0:0:52::/64 via {ROUTER6} dev und0\n"  # other device
        f"route replace fd19:0:0:53::/64 via {ROUTER6} dev und0 proto {PROTO}\n"  # ours, direct
    ))
    run("bridge", "-n", ns.name, "-batch", "-", stdin=fdb_lines + (
        f"fdb append 00:00:00:00:00:00 dev {dev} dst fd18:0:0:1::99 self permanent\n"  # default entry
        f"fdb append 00:00:00:00:00:00 dev {dev} dst :: self permanent\n"  # unspecified remote
        f"fdb replace 0a:00:00:00:00:53 dev {dev} dst fd18:0:0:1::53 self dynamic\n"  # not permanent
    ))
    read = ns.inside(kernel.read_overlay_entries, dev, underlay="und0")
    assert read == union(*(p.entries(6) for p in peers),
                         OverlayEntries(direct_routes=frozenset({Route(IPv6Network("fd19:0:0:53::/64"), ROUTER6)})))


def test_ipv6_direct_routes_go_on_the_underlay_and_one_off_the_segment_is_refused(ns):
    ns.inside(kernel.ensure_vtep, VTEP6)
    near, far = Peer(1), Peer(2)
    direct = Route(near.subnet6, IPv6Address("fd18:0:0:1::5"))
    off_segment = Route(far.subnet6, IPv6Address("fd18:0:0:9::5"))  # not on und0's fd18:0:0:1::/64
    result = ns.inside(kernel.apply_plan, VTEP6.name, Plan(upsert_direct_routes=(direct, off_segment)),
                       underlay="und0")
    assert result.applied == 1 and [(f.entry, f.errno) for f in result.failures] == [(off_segment, errno.EHOSTUNREACH)]
    assert routes6(ns, "und0") == {(str(near.subnet6), "fd18:0:0:1::5", PROTO, ())}
    assert ns.inside(kernel.read_overlay_entries, VTEP6.name, underlay="und0").direct_routes == {direct}
    assert ns.inside(kernel.apply_plan, VTEP6.name, Plan(remove_direct_routes=(direct,)), underlay="und0").ok
    assert routes6(ns, "und0") == set()


def test_a_foreign_ipv6_route_for_a_peer_subnet_is_left_alone_and_reported(ns):
    ns.inside(kernel.ensure_vtep, VTEP6)
    ns.ip("-6", "route", "add", "fd19:0:0:7::/64", "via", str(ROUTER6), "dev", "und0", "proto", "static")
    ns.ip("-6", "route", "add", "fd19:0:0:8::/64", "via", "fd19:0:0:8::", "dev", VTEP6.name, "onlink")  # boot
    ns.ip("-6", "addr", "add", "fd19:0:0:9::1/64", "dev", "und0", "nodad")  # its connected route: metric 256
    before = {p: main_routes6(ns, p) for p in ("fd19:0:0:7::/64", "fd19:0:0:8::/64", "fd19:0:0:9::/64")}
    peers = [Peer(i) for i in (6, 7, 8, 9)]
    desired = union(*(p.entries(6) for p in peers))
    for written in (20 - 3, 0):  # a resync meets the same conflicts again, and still leaves them alone
        result = ns.inside(sync, VTEP6.name, desired)
        assert {p: main_routes6(ns, p) for p in before} == before
        assert result.ok and result.applied == written
        assert sorted(str(c.entry.subnet) for c in result.conflicts) == sorted(before)
        # IPv6 checks an onlink gateway before the prefix: one on another device's route is EINVAL.
        assert {str(c.entry.subnet): (c.action, c.errno) for c in result.conflicts} == {
            "fd19:0:0:7::/64": ("upsert_routes", errno.EINVAL), "fd19:0:0:8::/64": ("upsert_routes", errno.EEXIST),
            "fd19:0:0:9::/64": ("upsert_routes", errno.EINVAL)}
        reasons = {str(c.entry.subnet): c.reason for c in result.conflicts}
        assert reasons["fd19:0:0:7::/64"] == (
            f"route fd19:0:0:7::/64 via {ROUTER6} dev und0 proto static metric 1024 is not vxlan-net's; "
            f"delete it: ip route del fd19:0:0:7::/64 via {ROUTER6} dev und0 proto static metric 1024")
        assert reasons["fd19:0:0:9::/64"].startswith(
            "route fd19:0:0:9::/64 dev und0 proto kernel metric 256 is not vxlan-net's")
    assert (str(peers[0].subnet6), str(peers[0].subnet6.network_address), PROTO, ("onlink",)) in routes6(
        ns, VTEP6.name)
    # The printed command deletes exactly the foreign route; the next pass then installs ours.
    run("ip", "-n", ns.name, *reasons["fd19:0:0:7::/64"].split("delete it: ", 1)[1].split()[1:])
    assert main_routes6(ns, "fd19:0:0:7::/64") == []
    assert ns.inside(sync, VTEP6.name, desired).applied == 1


def test_our_own_ipv6_route_is_replaced_in_place_when_its_gateway_changed(ns):
    ns.inside(kernel.ensure_vtep, VTEP6)
    ns.ip("-6", "route", "add", "fd19:0:0:7::/64", "via", "fd19:0:0:99::", "dev", VTEP6.name, "onlink",
          "proto", PROTO)
    route = Route(IPv6Network("fd19:0:0:7::/64"), IPv6Address("fd19:0:0:7::"))
    assert ns.inside(kernel.apply_plan, VTEP6.name, Plan(upsert_routes=(route,))) == ApplyResult(1, ())
    assert [(r["gateway"], r["protocol"], r["metric"]) for r in main_routes6(ns, "fd19:0:0:7::/64")] == [
        ("fd19:0:0:7::", PROTO, 1024)], "replaced, not added beside as a second (multipath) route"


def full_pass(lease: Lease) -> tuple[bool, str]:
    """A fresh reconciler's full pass over both VTEPs with one peer (run inside the namespace)."""
    rec = Reconciler(VTEP4.name, kernel, vteps={4: VTEP4.name, 6: VTEP6.name}, pod_families=(4, 6))
    rec.set_peers([lease])
    result = rec.reconcile()
    return result.ok, str(result.error)


def test_a_peer_losing_its_ipv6_underlay_moves_its_ipv6_route_to_the_ipv4_vtep(ns):
    """The kernel refuses an IPv6 onlink route on one device while ours for that prefix is on the other
    (EINVAL, whether created or replaced): the reconciler removes the moving route first."""
    ns.inside(kernel.ensure_vtep, VTEP4)
    ns.inside(kernel.ensure_vtep, VTEP6)
    peer = Lease(IPv4Network("198.19.7.0/24"), IPv4Address("198.18.0.107"), "0a:00:00:00:00:07", VNI,
                 IPv6Network("fd19:0:0:7::/64"), IPv6Address("fd18:0:0:1::107"), "0a:00:00:00:00:17")
    for lease, device in ((peer, VTEP6.name), (dataclasses.replace(peer, public_ipv6=None, vtep_mac_v6=None),
                                                VTEP4.name)):
        ok, error = ns.inside(full_pass, lease)
        assert ok, error
        assert [(r["dev"], r["protocol"]) for r in main_routes6(ns, "fd19:0:0:7::/64")] == [(device, PROTO)]
    assert fdb(ns, VTEP6.name) == set() and neighbours6(ns, VTEP6.name) == set()


def test_entries_the_kernel_refuses_are_reported_per_entry_and_the_rest_applied(ns):
    ns.inside(kernel.ensure_vtep, VTEP4)
    good = Peer(7)
    multicast_gateway = Route(IPv6Network("fd19:0:0:8::/64"), IPv6Address("ff02::1"))
    mixed_families = Route(IPv6Network("fd19:0:0:9::/64"), IPv4Address("198.19.9.0"))
    ipv6_remote_on_ipv4_tunnel = FdbEntry("0a:00:00:00:00:0a", IPv6Address("fd18:0:0:1::a"))
    bad_mac = Neighbour(IPv6Address("fd19:0:0:b::"), "not-a-mac")
    entries = good.entries(4)
    plan = Plan(
        upsert_neighbours=(bad_mac, *entries.neighbours),
        upsert_fdb=(ipv6_remote_on_ipv4_tunnel, *entries.fdb),
        upsert_routes=(multicast_gateway, mixed_families, *entries.routes),
    )
    result = ns.inside(kernel.apply_plan, VTEP4.name, plan)
    assert result.applied == 5
    failed = {f.entry: (f.action, f.errno) for f in result.failures}
    assert failed == {
        bad_mac: ("upsert_neighbours", errno.EINVAL),
        ipv6_remote_on_ipv4_tunnel: ("upsert_fdb", errno.EAFNOSUPPORT),
        multicast_gateway: ("upsert_routes", errno.EINVAL),
        mixed_families: ("upsert_routes", errno.EINVAL),
    }
    assert all(f.reason for f in result.failures)
    assert tool_view(ns, VTEP4.name) == expected_view([good], 4)


def test_refusals_map_to_their_entries_across_chunks_in_a_mixed_family_field(ns):
    ns.inside(kernel.ensure_vtep, VTEP4)
    count = kernel.CHUNK + 50
    bad4, bad6 = {0, kernel.CHUNK - 1, count - 1}, {1, kernel.CHUNK, kernel.CHUNK + 7}
    routes = []
    for i in range(count):  # interleaved: IPv4, IPv6, IPv4, ...
        routes.append(Route(IPv4Network(f"198.19.{i // 64}.{i % 64 * 4}/30"),
                            IPv4Address("224.0.0.1") if i in bad4 else IPv4Address(f"198.19.{i // 64}.{i % 64 * 4}")))
        routes.append(Route(IPv6Network(f"fd19:0:1:{i:x}::/64"),
                            IPv6Address("ff02::1") if i in bad6 else IPv6Address(f"fd19:0:1:{i:x}::")))
    result = ns.inside(kernel.apply_plan, VTEP4.name, Plan(upsert_routes=tuple(routes)))
    assert {f.entry for f in result.failures} == {routes[2 * i] for i in bad4} | {routes[2 * i + 1] for i in bad6}
    assert result.applied == 2 * count - 6
    assert (len(routes4(ns, VTEP4.name)), len(routes6(ns, VTEP4.name))) == (count - 3, count - 3)


# --- the IPv6 underlay: discovery and events ---


def test_ipv6_underlay_discovery_skips_link_local_tentative_and_deprecated_addresses(ns):
    ns.ip("-6", "route", "add", "default", "via", str(ROUTER6), "dev", "und0")
    ns.ip("link", "add", "und2", "type", "veth", "peer", "name", "und3")
    ns.ip("link", "set", "und2", "up")
    ns.ip("link", "set", "und3", "up")
    ns.ip("-6", "addr", "add", "fd18:0:0:2::98/64", "dev", "und2", "nodad", "preferred_lft", "0")  # deprecated
    # Tentative for the whole test: 30 probes a second apart before DAD can finish.
    run("ip", "netns", "exec", ns.name, "sysctl", "-q", "-w", "net.ipv6.conf.und2.dad_transmits=30")
    ns.ip("-6", "addr", "add", "fd18:0:0:2::97/64", "dev", "und2")
    assert ns.inside(kernel.underlay_for, UNDERLAY6) == ("und0", 1500)
    assert ns.inside(kernel.interface_address, "und0", family=6) == UNDERLAY6
    assert ns.inside(kernel.default_route_source, family=6) == ("und0", UNDERLAY6)
    with pytest.raises(KernelError, match=r"und2 has no usable global IPv6 address \(only fd18:0:0:2::9[78], "
                                          r"fd18:0:0:2::9[78]: tentative"):
        ns.inside(kernel.interface_address, "und2", family=6)
    with pytest.raises(KernelError, match="und1 has no usable global IPv6 address$"):  # link-local only
        ns.inside(kernel.interface_address, "und1", family=6)
    with pytest.raises(LinkNotFound):
        ns.inside(kernel.underlay_for, IPv6Address("fd18:0:0:9::9"))
    with pytest.raises(ValueError):
        ns.inside(kernel.interface_address, "und0", family=5)
    # The IPv4 defaults are untouched by the IPv6 underlay beside them.
    assert ns.inside(kernel.interface_address, "und0") == UNDERLAY4


def test_default_route_source_without_an_ipv6_default_route_raises(ns):
    with pytest.raises(KernelError, match="no IPv6 default route: give --public-ipv6"):
        ns.inside(kernel.default_route_source, family=6)


def test_ipv6_node_addresses_and_main_table_routes_are_what_ip_shows(ns):
    ns.inside(kernel.ensure_vtep, VTEP6)
    ns.ip("-6", "route", "add", "default", "via", str(ROUTER6), "dev", "und0")
    ns.ip("-6", "route", "add", "fd18:0:50::/48", "proto", "static", "nexthop", "via", "fd18:0:0:1::7", "dev", "und0",
          "nexthop", "via", "fd18:0:0:1::8", "dev", "und0")
    ns.inside(sync, VTEP6.name, Peer(7).entries(6))
    addresses = ns.inside(kernel.node_addresses, family=6)
    assert {(a.device, str(a.interface)) for a in addresses} == {
        (link["ifname"], f"{a['local']}/{a['prefixlen']}")
        for link in ns.json("ip", "-6", "addr", "show") for a in link["addr_info"] if a["scope"] != "link"}
    assert ("und0", "fd18:0:0:1::2/64") in {(a.device, str(a.interface)) for a in addresses}
    routes = ns.inside(kernel.main_table_routes, family=6)
    shown = [r for r in ns.json("ip", "-6", "route", "show", "table", "main") if r.get("type", "unicast") == "unicast"]
    for r in shown:  # a multipath route is shown by its first hop
        r.update(r.get("nexthops", [{}])[0])
    assert {(str(r.dst), str(r.gateway) if r.gateway else None, r.device, r.metric) for r in routes} == {
        ("::/0" if r["dst"] == "default" else r["dst"] if "/" in r["dst"] else r["dst"] + "/128",
         r.get("gateway"), r["dev"], r["metric"]) for r in shown}
    assert "fd19:0:0:7::/64 via fd19:0:0:7:: dev vxnet6.42 proto 157 metric 1024" in {str(r) for r in routes}
    assert all(r.dst.version == 4 for r in ns.inside(kernel.main_table_routes))  # the default stays IPv4


def test_route_events_report_ipv6_changes_but_not_our_own_routes(ns):
    ns.inside(kernel.ensure_vtep, VTEP6)
    with kernel.RouteEvents(netns=ns.name) as events, kernel.RouteEvents(ipv6=False, netns=ns.name) as ipv4_only:
        events.changed(), ipv4_only.changed()
        assert kernel.apply_plan(VTEP6.name, plan_changes(Peer(1).entries(6), OverlayEntries()), netns=ns.name).ok
        assert events.changed() is False, "our own routes must not trigger a pass"
        ns.ip("-6", "route", "add", "fd18:0:60::/48", "via", str(ROUTER6), "dev", "und0")
        assert events.changed() is True
        assert events.changed() is False
        ns.ip("-6", "addr", "add", "fd18:0:0:3::1/64", "dev", "und0", "nodad")
        assert events.changed() is True
        assert ipv4_only.changed() is False


def test_enable_ip_forwarding_turns_on_ipv6_forwarding_unless_asked_not_to(ns):
    def forwarding() -> tuple[str, str]:
        return tuple(run("ip", "netns", "exec", ns.name, "sysctl", "-n", key).strip()
                     for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"))

    run("ip", "netns", "exec", ns.name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0",
        "net.ipv6.conf.all.forwarding=0")
    assert forwarding() == ("0", "0")
    ns.inside(kernel.enable_ip_forwarding, ipv6=False)
    assert forwarding() == ("1", "0")
    ns.inside(kernel.enable_ip_forwarding)
    assert forwarding() == ("1", "1")


# --- end to end: ping -6 across hand-made VTEPs programmed by apply_plan ---


@contextlib.contextmanager
def two_nodes():
    """Two namespaces joined by a veth underlay: node i holds 198.18.0.i/24 and fd18:0:0:1::i/64."""
    names = [f"vnk-{secrets.token_hex(4)}" for _ in range(2)]
    try:
        for name in names:
            run("ip", "netns", "add", name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "-n", names[0], "link", "add", "und0", "type", "veth", "peer", "name", "und0", "netns", names[1])
        for i, name in enumerate(names, 1):
            run("ip", "-n", name, "addr", "add", f"198.18.0.{i}/24", "dev", "und0")
            run("ip", "-n", name, "-6", "addr", "add", f"fd18:0:0:1::{i}/64", "dev", "und0", "nodad")
            run("ip", "-n", name, "link", "set", "und0", "up")
        yield names
    finally:
        for name in names:
            run("ip", "netns", "del", name, check=False)


def node_vtep(i: int, underlay_family: int) -> kernel.VtepSpec:
    return kernel.VtepSpec(
        name=vtep_name(VNI, underlay_family), vni=VNI, port=4789,
        local_ip=IPv4Address(f"198.18.0.{i}") if underlay_family == 4 else IPv6Address(f"fd18:0:0:1::{i}"),
        underlay_ifname="und0", mac=f"02:42:00:00:0{underlay_family}:0{i}", mtu=1450 if underlay_family == 4 else 1430,
        address=IPv4Interface(f"198.19.{i}.0/32"), ipv6_address=IPv6Interface(f"fd19:0:0:{i}::/128"))


@pytest.mark.parametrize("underlay_family", [4, 6], ids=["vxnet-over-ipv4", "vxnet6-over-ipv6"])
def test_ping6_crosses_two_nodes_through_vteps_programmed_by_apply_plan(underlay_family):
    with two_nodes() as names:
        vteps = [node_vtep(i, underlay_family) for i in (1, 2)]
        for name, vtep, j in zip(names, vteps, (2, 1)):
            kernel.ensure_vtep(vtep, netns=name)
            entries = Peer(j, mac=vteps[j - 1].mac, public4=f"198.18.0.{j}",
                           public6=f"fd18:0:0:1::{j}").entries(underlay_family)
            assert kernel.apply_plan(vtep.name, plan_changes(entries, OverlayEntries()), netns=name).ok
        ping6 = subprocess.run(["ip", "netns", "exec", names[0], "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2",
                                "-I", "fd19:0:0:1::", "fd19:0:0:2::"], capture_output=True, text=True, timeout=30)
        assert ping6.returncode == 0, ping6.stdout + ping6.stderr
        ping4 = subprocess.run(["ip", "netns", "exec", names[0], "ping", "-c", "1", "-W", "2",
                                "-I", "198.19.1.0", "198.19.2.0"], capture_output=True, text=True, timeout=30)
        assert ping4.returncode == 0, ping4.stdout + ping4.stderr
        # Nothing was learned: every frame went where the FDB entry we wrote sends it.
        assert fdb_dsts(names[0], vteps[0].name) == {(vteps[1].mac, str(vteps[1].local_ip))}


def fdb_dsts(netns: str, dev: str) -> set[tuple]:
    shown = json.loads(run("bridge", "-j", "-n", netns, "fdb", "show", "dev", dev) or "[]")
    return {(f["mac"], f["dst"]) for f in shown if f.get("dst")}
