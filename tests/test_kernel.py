"""The netlink door against the real kernel, in throw-away namespaces, checked with `ip`/`bridge`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import multiprocessing
import os
import secrets
import subprocess
import threading
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address

import pytest

from vxlan_net.core.config import build_config
from vxlan_net.core.desired import FdbEntry, Neighbour, OverlayEntries, Route, desired_entries
from vxlan_net.core.errors import KernelError, LinkNotFound
from vxlan_net.core.lease import Lease
from vxlan_net.core.plan import ApplyResult, Plan, plan_changes
from vxlan_net.core.underlay import node_underlay
from vxlan_net.doors import kernel

pytestmark = pytest.mark.root

UNDERLAY_IP = IPv4Address("198.18.0.1")
ROUTER_IP = IPv4Address("198.18.0.2")
SPEC = kernel.VtepSpec(
    name="vxt0",
    vni=42,
    port=4789,
    local_ip=UNDERLAY_IP,
    underlay_ifname="und0",
    mac="02:42:00:00:00:01",
    mtu=1450,
    address=IPv4Interface("198.19.0.0/32"),
)


def lease(index: int, mac: str | None = None, public_ip: str | None = None) -> Lease:
    return Lease(
        IPv4Network(f"198.19.{index}.0/24"),
        IPv4Address(public_ip or f"198.18.1.{index}"),
        mac or f"0a:00:00:00:00:{index:02x}",
        SPEC.vni,
    )


def run(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


class Namespace:
    """A network namespace with a veth underlay, and a child process living inside it."""

    def __init__(self) -> None:
        self.name = f"vnk-{secrets.token_hex(4)}"
        self._inside: concurrent.futures.ProcessPoolExecutor | None = None

    def ip(self, *argv: str, check: bool = True) -> str:
        return run("ip", "-n", self.name, *argv, check=check)

    def json(self, tool: str, *argv: str):
        return json.loads(run(tool, "-j", "-n", self.name, *argv) or "[]")

    def inside(self, fn, *args, **kwargs):
        """Call fn in a process that entered the namespace: the agent's `ip netns exec` mode."""
        if self._inside is None:
            self._inside = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("fork"),
                initializer=kernel.enter_netns,
                initargs=(self.name,),
            )
        return self._inside.submit(fn, *args, **kwargs).result(timeout=60)

    def close(self) -> None:
        if self._inside is not None:
            self._inside.shutdown(wait=True, cancel_futures=True)
        run("ip", "netns", "del", self.name, check=False)

    # --- what the independent tools see ---

    def link(self, name: str) -> dict:
        return self.json("ip", "-d", "link", "show", "dev", name)[0]

    def addresses(self, name: str) -> set[str]:
        info = self.json("ip", "-4", "addr", "show", "dev", name)[0]
        return {f"{a['local']}/{a['prefixlen']}" for a in info["addr_info"]}

    def neighbours(self, dev: str = SPEC.name) -> set[tuple]:
        return {(n["dst"], n.get("lladdr"), tuple(n["state"])) for n in self.json("ip", "neigh", "show", "dev", dev)}

    def fdb(self, dev: str = SPEC.name) -> set[tuple]:
        return {
            (f["mac"], f.get("dst"), tuple(f.get("flags", [])), f.get("state", ""))
            for f in self.json("bridge", "fdb", "show", "dev", dev)
        }

    def routes(self, dev: str = SPEC.name) -> set[tuple]:
        return {
            (r["dst"], r.get("gateway"), r.get("protocol"), tuple(r.get("flags", [])))
            for r in self.json("ip", "route", "show", "table", "main", "dev", dev)
            if "gateway" in r
        }


@contextlib.contextmanager
def namespace():
    """A Namespace with its veth underlay; deleted on the way out, also on failure."""
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (network namespaces)", pytrace=False)
    space = Namespace()
    try:
        run("ip", "netns", "add", space.name)
        space.ip("link", "set", "lo", "up")
        space.ip("link", "add", SPEC.underlay_ifname, "mtu", "1500", "type", "veth", "peer", "name", "und1")
        space.ip("addr", "add", f"{UNDERLAY_IP}/24", "dev", SPEC.underlay_ifname)
        space.ip("link", "set", SPEC.underlay_ifname, "up")
        space.ip("link", "set", "und1", "up")
        yield space
    finally:
        space.close()


@pytest.fixture
def ns():
    with namespace() as space:
        yield space


def expected_tool_view(leases: list[Lease]) -> tuple[set, set, set]:
    """What `ip`/`bridge` must show for these leases, in the Namespace helpers' tuple form."""
    neigh = {(str(l.gateway), l.vtep_mac, ("PERMANENT",)) for l in leases}
    fdb = {(l.vtep_mac, str(l.public_ip), ("self",), "permanent") for l in leases}
    routes = {(str(l.subnet), str(l.gateway), str(kernel.ROUTE_PROTO), ("onlink",)) for l in leases}
    return neigh, fdb, routes


def sync(leases: list[Lease]) -> ApplyResult:
    """The reconciler's pass, run inside the namespace."""
    plan = plan_changes(desired_entries(leases), kernel.read_overlay_entries(SPEC.name))
    return kernel.apply_plan(SPEC.name, plan)


# --- the VXLAN device ---


def test_ensure_vtep_creates_the_device_as_specified(ns):
    index = ns.inside(kernel.ensure_vtep, SPEC)
    link = ns.link(SPEC.name)
    data = link["linkinfo"]["info_data"]
    assert link["ifindex"] == index
    assert link["linkinfo"]["info_kind"] == "vxlan"
    assert (data["id"], data["port"], data["local"], data["link"]) == (42, 4789, "198.18.0.1", "und0")
    assert data["learning"] is False
    assert (link["address"], link["mtu"]) == (SPEC.mac, SPEC.mtu)
    assert "UP" in link["flags"]
    assert ns.addresses(SPEC.name) == {"198.19.0.0/32"}


def test_ensure_vtep_reuses_a_compatible_device_and_fixes_mac_mtu_addresses_state(ns):
    index = ns.inside(kernel.ensure_vtep, SPEC)
    ns.ip("addr", "add", "198.19.77.1/24", "dev", SPEC.name)
    ns.ip("link", "set", SPEC.name, "mtu", "1300")
    ns.ip("link", "set", SPEC.name, "down")
    changed = kernel.VtepSpec(**{**SPEC.__dict__, "mac": "02:42:00:00:00:99", "address": IPv4Interface("198.19.9.0/32")})
    assert ns.inside(kernel.ensure_vtep, changed) == index
    link = ns.link(SPEC.name)
    assert (link["ifindex"], link["address"], link["mtu"]) == (index, "02:42:00:00:00:99", 1450)
    assert "UP" in link["flags"]
    assert ns.addresses(SPEC.name) == {"198.19.9.0/32"}


@pytest.mark.parametrize(
    "existing",
    [
        ["type", "vxlan", "id", "7", "dstport", "4789", "local", "198.18.0.1", "dev", "und0", "nolearning"],
        ["type", "vxlan", "id", "42", "dstport", "8472", "local", "198.18.0.1", "dev", "und0", "nolearning"],
        ["type", "vxlan", "id", "42", "dstport", "4789", "local", "198.18.0.1", "dev", "und0", "learning"],
        ["type", "bridge"],
    ],
    ids=["other-vni", "other-port", "learning-on", "not-vxlan"],
)
def test_ensure_vtep_replaces_an_incompatible_device(ns, existing):
    ns.ip("link", "add", SPEC.name, *existing)
    old_index = ns.link(SPEC.name)["ifindex"]
    index = ns.inside(kernel.ensure_vtep, SPEC)
    link = ns.link(SPEC.name)
    data = link["linkinfo"]["info_data"]
    assert index == link["ifindex"] != old_index
    assert (data["id"], data["port"], data["learning"]) == (42, 4789, False)


def test_ensure_vtep_moves_the_local_address_in_place_keeping_mac_and_entries(ns):
    """A renumbered node (issue 13): the same device, MAC and overlay entries, only `local` changes."""
    index = ns.inside(kernel.ensure_vtep, SPEC)
    leases = [lease(1), lease(2)]
    ns.inside(kernel.apply_plan, SPEC.name, plan_changes(desired_entries(leases), OverlayEntries()))
    ns.ip("addr", "add", "198.18.0.7/24", "dev", SPEC.underlay_ifname)
    moved = kernel.VtepSpec(**{**SPEC.__dict__, "local_ip": IPv4Address("198.18.0.7")})
    assert ns.inside(kernel.ensure_vtep, moved) == index
    link = ns.link(SPEC.name)
    assert (link["ifindex"], link["address"], link["linkinfo"]["info_data"]["local"]) == (index, SPEC.mac, "198.18.0.7")
    neigh, fdb, routes = expected_tool_view(leases)
    assert (ns.neighbours(), ns.fdb(), ns.routes()) == (neigh, fdb, routes)


def test_ensure_vtep_without_the_underlay_raises_link_not_found(ns):
    missing = kernel.VtepSpec(**{**SPEC.__dict__, "underlay_ifname": "nosuch0"})
    with pytest.raises(LinkNotFound):
        ns.inside(kernel.ensure_vtep, missing)
    assert not ns.inside(kernel.link_exists, SPEC.name)


# --- overlay entries ---


def test_apply_plan_writes_exactly_the_planned_entries(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    leases = [lease(i) for i in (1, 2, 3)]
    result = ns.inside(sync, leases)
    assert result.ok and result.applied == 9
    neigh, fdb, routes = expected_tool_view(leases)
    assert ns.neighbours() == neigh
    assert ns.fdb() == fdb
    assert ns.routes() == routes
    assert ns.inside(sync, leases) == ApplyResult(0, ())  # in sync: nothing to write


def test_a_changed_lease_leaves_no_stale_fdb_or_neighbour(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    ns.inside(sync, [lease(1), lease(2)])
    now = [lease(1, mac="0a:00:00:00:01:01"), lease(2, public_ip="198.18.1.200")]
    result = ns.inside(sync, now)
    assert result.ok
    neigh, fdb, routes = expected_tool_view(now)
    assert ns.fdb() == fdb
    assert ns.neighbours() == neigh
    assert ns.routes() == routes


def test_removals_are_idempotent_and_empty_the_device(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    ns.inside(sync, [lease(1), lease(2)])
    actual = ns.inside(kernel.read_overlay_entries, SPEC.name)
    removal = plan_changes(OverlayEntries(), actual)
    for _ in range(2):
        result = ns.inside(kernel.apply_plan, SPEC.name, removal)
        assert result == ApplyResult(6, ())
    assert ns.neighbours() == ns.fdb() == ns.routes() == set()


def test_read_overlay_entries_round_trips_ip_batch_and_ignores_what_is_not_ours(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    leases = [lease(i) for i in (4, 5, 6)]
    dev = SPEC.name
    run("ip", "-n", ns.name, "-batch", "-", stdin="".join(
        f"neigh replace {l.gateway} lladdr {l.vtep_mac} dev {dev} nud permanent\n"
        f"route replace {l.subnet} via {l.gateway} dev {dev} onlink proto {kernel.ROUTE_PROTO}\n"
        for l in leases
    ) + (
        f"neigh replace 198.19.50.0 lladdr 0a:00:00:00:00:50 dev {dev} nud reachable\n"  # not permanent
        f"neigh replace 198.18.0.9 lladdr 0a:00:00:00:00:51 dev und0 nud permanent\n"  # other device
        f"route replace 198.19.51.0/24 via 198.19.51.0 dev {dev} onlink\n"  # proto boot: not ours
        f"route replace 198.19.52.0/24 via 198.18.0.2 dev und0\n"  # other device
    ))
    run("bridge", "-n", ns.name, "-batch", "-", stdin="".join(
        f"fdb replace {l.vtep_mac} dev {dev} dst {l.public_ip} self permanent\n" for l in leases
    ) + (
        f"fdb append 00:00:00:00:00:00 dev {dev} dst 198.18.1.99 self permanent\n"  # default entry
        f"fdb replace 0a:00:00:00:00:53 dev {dev} dst 198.18.1.53 self dynamic\n"  # not permanent
    ))
    assert ns.inside(kernel.read_overlay_entries, dev) == desired_entries(leases)


def test_netns_argument_reaches_another_namespace(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    plan = plan_changes(desired_entries([lease(1)]), OverlayEntries())
    assert kernel.apply_plan(SPEC.name, plan, netns=ns.name).applied == 3
    assert kernel.read_overlay_entries(SPEC.name, netns=ns.name) == desired_entries([lease(1)])
    assert kernel.link_info(SPEC.name, netns=ns.name)["vxlan"]["vni"] == SPEC.vni
    assert ns.fdb() == expected_tool_view([lease(1)])[1]


def test_apply_plan_reports_each_refusal_and_applies_the_rest(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    bad_route = Route(IPv4Network("198.19.8.0/24"), IPv4Address("224.0.0.1"))
    bad_fdb = FdbEntry("not-a-mac", IPv4Address("198.18.1.8"))
    good = lease(7)
    plan = Plan(
        upsert_neighbours=(Neighbour(good.gateway, good.vtep_mac),),
        upsert_fdb=(bad_fdb, FdbEntry(good.vtep_mac, good.public_ip)),
        upsert_routes=(bad_route, Route(good.subnet, good.gateway)),
    )
    result = ns.inside(kernel.apply_plan, SPEC.name, plan)
    assert result.applied == 3
    assert {(f.action, f.entry) for f in result.failures} == {("upsert_fdb", bad_fdb), ("upsert_routes", bad_route)}
    assert all(f.errno and f.reason for f in result.failures)
    assert ns.routes() == expected_tool_view([good])[2]


def test_refusals_map_to_their_entries_across_chunks(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    bad_rows = {0, kernel.CHUNK - 1, kernel.CHUNK, kernel.CHUNK + 49}  # first, chunk ends, last
    routes = tuple(
        Route(IPv4Network(f"198.19.{i // 64}.{i % 64 * 4}/30"),
              IPv4Address("224.0.0.1") if i in bad_rows else IPv4Address(f"198.19.{i // 64}.{i % 64 * 4}"))
        for i in range(kernel.CHUNK + 50)
    )
    result = ns.inside(kernel.apply_plan, SPEC.name, Plan(upsert_routes=routes))
    assert {f.entry for f in result.failures} == {routes[i] for i in bad_rows}
    assert result.applied == len(routes) - len(bad_rows) == len(ns.routes())


def test_entries_that_do_not_fit_their_message_are_reported_each_and_the_rest_written(ns):
    """Hostile entries a lease could never produce: a gateway of the other family, a MAC that is none.
    Each is a failure of its own (the kernel would refuse it too); every other entry of the batch,
    before and after it, is written."""
    ns.inside(kernel.ensure_vtep, SPEC)
    leases = [lease(i) for i in range(1, 6)]
    misfit = Route(IPv4Network("198.19.9.0/24"), IPv6Address("fd19::9"))
    not_a_mac = Neighbour(IPv4Address("198.19.10.0"), "0a:00:00:00:00")
    plan = Plan(upsert_neighbours=(*(Neighbour(l.gateway, l.vtep_mac) for l in leases[:2]), not_a_mac,
                                   *(Neighbour(l.gateway, l.vtep_mac) for l in leases[2:])),
                upsert_fdb=tuple(FdbEntry(l.vtep_mac, l.public_ip) for l in leases),
                upsert_routes=(Route(leases[0].subnet, leases[0].gateway), misfit,
                               *(Route(l.subnet, l.gateway) for l in leases[1:])))
    result = ns.inside(kernel.apply_plan, SPEC.name, plan)
    assert {(f.action, f.entry, f.errno, f.reason) for f in result.failures} == {
        ("upsert_routes", misfit, errno.EINVAL, "cannot encode: 16 bytes where 4 are expected"),
        ("upsert_neighbours", not_a_mac, errno.EINVAL, "cannot encode: '0a:00:00:00:00' is not a MAC address")}
    assert result.applied == 15
    remotes = {f for f in ns.fdb() if f[1] is not None}  # not the device's own entries
    assert (ns.neighbours(), remotes, ns.routes()) == expected_tool_view(leases)


def _apply_in_one_then_the_other(first: str, second: str, plan_first: Plan, plan_second: Plan) -> tuple:
    """One thread writing to two namespaces in turn, as apply_plan keeps its socket open between calls."""
    kernel.enter_netns(first)
    done_first = kernel.apply_plan(SPEC.name, plan_first)
    kernel.enter_netns(second)
    done_second = kernel.apply_plan(SPEC.name, plan_second)
    kernel.enter_netns(first)  # the pool's process stays the first namespace's
    return done_first, done_second


def test_each_plan_goes_to_the_namespace_its_caller_is_in(ns):
    one, two = lease(1), lease(2)
    with namespace() as other:
        for space in (ns, other):
            space.inside(kernel.ensure_vtep, SPEC)
        results = ns.inside(_apply_in_one_then_the_other, ns.name, other.name,
                            plan_changes(desired_entries([one]), OverlayEntries()),
                            plan_changes(desired_entries([two]), OverlayEntries()))
        assert [r.applied for r in results] == [3, 3]
        assert other.routes() == expected_tool_view([two])[2]
    assert ns.routes() == expected_tool_view([one])[2]


def _kept_sockets_of_two_threads() -> tuple[bool, bool]:
    """(each thread has its own kept socket, a thread gets its own again on its next call)."""
    both_running = threading.Barrier(2, timeout=5)

    def twice(_: int) -> tuple:
        both_running.wait()  # two threads, not one pool thread taking both calls
        with kernel._kept_rtnl(None) as first:
            pass
        with kernel._kept_rtnl(None) as again:
            return first, again
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        (a, a_again), (b, b_again) = pool.map(twice, range(2))
    return a is not b, (a, b) == (a_again, b_again)


def test_each_thread_keeps_an_apply_socket_of_its_own(ns):
    """A netlink socket shared by threads would mix their requests and answers (it once was, by a name
    clash that made the per-thread store a function attribute)."""
    assert ns.inside(_kept_sockets_of_two_threads) == (True, True)


def main_routes(ns: Namespace, prefix: str) -> list[dict]:
    """Every main-table route for exactly `prefix`, as `ip -j route` shows it."""
    return [{k: r.get(k) for k in ("dst", "gateway", "dev", "protocol", "metric", "flags")}
            for r in ns.json("ip", "route", "show", "table", "main", "exact", prefix)]


def test_a_route_someone_else_installed_for_a_peer_subnet_is_left_alone_and_reported(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    ns.ip("route", "add", "198.19.7.0/24", "via", str(ROUTER_IP), "dev", "und0", "proto", "static")
    ns.ip("route", "add", "198.19.8.0/24", "via", "198.19.8.0", "dev", SPEC.name, "onlink")  # proto boot
    ns.ip("addr", "add", "198.19.9.1/24", "dev", "und0")  # its connected route, proto kernel
    before = {p: main_routes(ns, p) for p in ("198.19.7.0/24", "198.19.8.0/24", "198.19.9.0/24")}
    peers = [lease(i) for i in (6, 7, 8, 9)]
    for written in (12 - 3, 0):  # a resync meets the same conflicts again, and still leaves them alone
        result = ns.inside(sync, peers)
        assert {p: main_routes(ns, p) for p in before} == before
        assert result.ok and result.applied == written
        assert sorted(str(c.entry.subnet) for c in result.conflicts) == sorted(before)
        assert all(c.action == "upsert_routes" and c.errno == errno.EEXIST for c in result.conflicts)
        reasons = {str(c.entry.subnet): c.reason for c in result.conflicts}
        assert reasons["198.19.7.0/24"] == (
            f"route 198.19.7.0/24 via {ROUTER_IP} dev und0 proto static is not vxlan-net's; "
            "delete it: ip route del 198.19.7.0/24 via 198.18.0.2 dev und0 proto static")
        assert "route 198.19.8.0/24 via 198.19.8.0 dev vxt0 proto boot is not vxlan-net's" in reasons["198.19.8.0/24"]
        assert "route 198.19.9.0/24 dev und0 proto kernel scope link is not vxlan-net's" in reasons["198.19.9.0/24"]
    assert ns.routes() >= expected_tool_view([lease(6)])[2]  # the peer without a conflict got its route


def test_a_foreign_route_with_another_metric_is_kept_beside_ours(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    ns.ip("route", "add", "198.19.7.0/24", "via", str(ROUTER_IP), "dev", "und0", "proto", "static", "metric", "100")
    result = ns.inside(sync, [lease(7)])
    assert result.ok and not result.conflicts
    routes = main_routes(ns, "198.19.7.0/24")
    assert {"dst": "198.19.7.0/24", "gateway": str(ROUTER_IP), "dev": "und0", "protocol": "static",
            "metric": 100, "flags": []} in routes
    assert {(r["gateway"], r["dev"], r["protocol"]) for r in routes} == {
        (str(ROUTER_IP), "und0", "static"), ("198.19.7.0", SPEC.name, str(kernel.ROUTE_PROTO))}


def test_our_own_route_is_replaced_in_place_when_its_gateway_changed(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    ns.ip("route", "add", "198.19.7.0/24", "via", "198.19.99.0", "dev", SPEC.name, "onlink",
          "proto", str(kernel.ROUTE_PROTO))
    result = ns.inside(sync, [lease(7)])
    assert result.ok and not result.conflicts and result.applied == 3
    assert main_routes(ns, "198.19.7.0/24") == [
        {"dst": "198.19.7.0/24", "gateway": "198.19.7.0", "dev": SPEC.name, "protocol": str(kernel.ROUTE_PROTO),
         "metric": None, "flags": ["onlink"]}]
    # The same, for a route of ours that a targeted diff does not know about (no fresh read).
    ns.ip("route", "replace", "198.19.7.0/24", "via", "198.19.98.0", "dev", SPEC.name, "onlink",
          "proto", str(kernel.ROUTE_PROTO))
    result = ns.inside(kernel.apply_plan, SPEC.name, Plan(upsert_routes=(Route(lease(7).subnet, lease(7).gateway),)))
    assert result == ApplyResult(1, ())
    assert [r["gateway"] for r in main_routes(ns, "198.19.7.0/24")] == ["198.19.7.0"]


def test_node_addresses_and_main_table_routes_are_what_ip_shows_and_leave_our_devices_out(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    ns.inside(kernel.ensure_bridge, "cnit0", IPv4Interface("198.19.0.1/24"), 1450)
    ns.ip("addr", "add", "198.19.5.1/24", "dev", "und0")
    ns.ip("route", "add", "default", "via", str(ROUTER_IP), "dev", "und0")
    ns.ip("route", "add", "198.18.50.0/24", "proto", "static", "nexthop", "via", "198.18.0.7", "dev", "und0",
          "nexthop", "via", "198.18.0.8", "dev", "und0")
    ns.inside(sync, [lease(7)])
    addresses = ns.inside(kernel.node_addresses)
    assert {(a.device, str(a.interface)) for a in addresses} == {
        (link["ifname"], f"{a['local']}/{a['prefixlen']}")
        for link in ns.json("ip", "-4", "addr", "show") for a in link["addr_info"]}
    assert {(a.device, a.kind) for a in addresses} == {("lo", None), ("und0", "veth"), (SPEC.name, "vxlan"),
                                                       ("cnit0", "bridge")}
    routes = ns.inside(kernel.main_table_routes)
    shown = ns.json("ip", "route", "show", "table", "main")
    for r in shown:  # a multipath route is shown by its first hop
        r.update(r.get("nexthops", [{}])[0])
    assert {(str(r.dst), str(r.gateway) if r.gateway else None, r.device) for r in routes} == {
        ("0.0.0.0/0" if r["dst"] == "default" else r["dst"] if "/" in r["dst"] else r["dst"] + "/32",
         r.get("gateway"), r["dev"]) for r in shown}
    assert "198.19.7.0/24 via 198.19.7.0 dev vxt0 proto 157" in {str(r) for r in routes}
    claims = node_underlay(build_config("198.19.0.0/16"), addresses, routes, vteps=SPEC.name).networks()
    assert claims == {
        IPv4Network("127.0.0.0/8"): "address 127.0.0.1/8 on lo",
        IPv4Network("198.18.0.0/24"): "address 198.18.0.1/24 on und0",
        IPv4Network("198.19.5.0/24"): "address 198.19.5.1/24 on und0",
        IPv4Network("198.18.0.2/32"): "gateway 198.18.0.2 of route 0.0.0.0/0 via 198.18.0.2 dev und0 proto boot",
        IPv4Network("198.18.0.7/32"):
            "gateway 198.18.0.7 of route 198.18.50.0/24 via 198.18.0.7 dev und0 proto static",
    }


def test_missing_device_raises_link_not_found(ns):
    with pytest.raises(LinkNotFound):
        ns.inside(kernel.read_overlay_entries, "nosuch0")
    with pytest.raises(LinkNotFound):
        ns.inside(kernel.apply_plan, "nosuch0", Plan(upsert_neighbours=(Neighbour(IPv4Address("198.19.1.0"), "0a:00:00:00:00:01"),)))


@pytest.mark.parametrize("name", ["vxnet.1-but-longer-than-ifnamsiz", "vx\0t0", "", "../vxt0"])
def test_a_name_no_device_can_have_is_link_not_found_not_another_device(ns, name):
    ns.inside(kernel.ensure_vtep, SPEC)
    plan = Plan(upsert_neighbours=(Neighbour(IPv4Address("198.19.1.0"), "0a:00:00:00:00:01"),))
    with pytest.raises(LinkNotFound, match="No such device"):
        ns.inside(kernel.apply_plan, name, plan)
    assert ns.neighbours() == set()


# --- interfaces, bridge, info ---


def test_underlay_and_default_route_lookups(ns):
    ns.ip("route", "add", "default", "via", str(ROUTER_IP), "dev", SPEC.underlay_ifname)
    assert ns.inside(kernel.underlay_for, UNDERLAY_IP) == ("und0", 1500)
    assert ns.inside(kernel.default_route_source) == ("und0", UNDERLAY_IP)
    assert ns.inside(kernel.interface_address, "und0") == UNDERLAY_IP
    with pytest.raises(LinkNotFound):
        ns.inside(kernel.underlay_for, IPv4Address("198.18.9.9"))
    with pytest.raises(KernelError):
        ns.inside(kernel.interface_address, "und1")  # no IPv4 address


def test_default_route_source_without_default_route_raises(ns):
    with pytest.raises(KernelError, match="default route"):
        ns.inside(kernel.default_route_source)


def test_link_info_describes_the_vtep(ns):
    index = ns.inside(kernel.ensure_vtep, SPEC)
    info = ns.inside(kernel.link_info, SPEC.name)
    assert info["index"] == index and info["kind"] == "vxlan" and info["up"]
    assert (info["mtu"], info["mac"], info["addresses"]) == (1450, SPEC.mac, ["198.19.0.0/32"])
    assert info["vxlan"] == {
        "vni": 42, "port": 4789, "local": "198.18.0.1", "link": ns.link("und0")["ifindex"],
        "underlay": "und0", "learning": False,
    }


def test_ensure_bridge_creates_reuses_and_delete_link_tolerates_absence(ns):
    index = ns.inside(kernel.ensure_bridge, "cnit0", IPv4Interface("198.19.0.1/24"), 1450)
    link = ns.link("cnit0")
    assert (link["ifindex"], link["linkinfo"]["info_kind"], link["mtu"]) == (index, "bridge", 1450)
    assert "UP" in link["flags"] and ns.addresses("cnit0") == {"198.19.0.1/24"}
    assert ns.inside(kernel.ensure_bridge, "cnit0", IPv4Interface("198.19.3.1/24"), 1400) == index
    assert ns.addresses("cnit0") == {"198.19.3.1/24"} and ns.link("cnit0")["mtu"] == 1400
    with pytest.raises(KernelError, match="not a bridge"):
        ns.inside(kernel.ensure_bridge, "und0", IPv4Interface("198.19.0.1/24"), 1450)
    assert ns.inside(kernel.delete_link, "cnit0") is True
    assert ns.inside(kernel.delete_link, "cnit0") is False
    assert not ns.inside(kernel.link_exists, "cnit0")


# --- direct routes (issue 10) ---


def sync_modes(leases: list[Lease], direct_ips: set[str]) -> ApplyResult:
    """The reconciler's full pass with direct routing: the named PublicIPs direct, the rest tunnelled."""
    desired = desired_entries(leases, lambda ip: str(ip) in direct_ips)
    plan = plan_changes(desired, kernel.read_overlay_entries(SPEC.name, underlay=SPEC.underlay_ifname))
    return kernel.apply_plan(SPEC.name, plan, underlay=SPEC.underlay_ifname)


def test_a_plan_with_direct_routes_but_no_underlay_is_refused_before_touching_the_kernel():
    with pytest.raises(ValueError, match="needs the underlay device"):
        kernel.apply_plan("vxt-none", Plan(upsert_direct_routes=(Route(lease(1).subnet, UNDERLAY_IP),)))


def test_a_direct_route_to_a_peer_off_the_segment_is_refused_by_the_kernel_not_written(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    far = lease(3, public_ip="198.18.9.3")  # not on und0's 198.18.0.0/24: the kernel has no way there
    result = ns.inside(sync_modes, [far], {"198.18.9.3"})
    assert not result.ok and [f.action for f in result.failures] == ["upsert_direct_routes"]
    assert ns.routes(SPEC.underlay_ifname) == set()


def test_a_peer_switching_between_direct_and_tunnelled_leaves_no_entry_of_the_other_mode(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    near, far = lease(1, public_ip="198.18.0.5"), lease(2, public_ip="198.18.0.6")
    proto = str(kernel.ROUTE_PROTO)
    direct_route = ("198.19.1.0/24", "198.18.0.5", proto, ())
    assert ns.inside(sync_modes, [near, far], set()).ok
    assert (ns.neighbours(), ns.fdb(), ns.routes()) == expected_tool_view([near, far])
    assert ns.routes(SPEC.underlay_ifname) == set()
    for _ in range(2):  # there and back, twice: nothing accumulates
        result = ns.inside(sync_modes, [near, far], {"198.18.0.5"})
        assert result.ok and result.applied == 4 and not result.conflicts
        assert (ns.neighbours(), ns.fdb(), ns.routes()) == expected_tool_view([far])
        assert ns.routes(SPEC.underlay_ifname) == {direct_route}
        assert [(r["dev"], r["gateway"]) for r in main_routes(ns, "198.19.1.0/24")] == [("und0", "198.18.0.5")]
        assert ns.inside(sync_modes, [near, far], {"198.18.0.5"}) == ApplyResult(0, ())
        result = ns.inside(sync_modes, [near, far], set())
        assert result.ok and result.applied == 4
        assert (ns.neighbours(), ns.fdb(), ns.routes()) == expected_tool_view([near, far])
        assert ns.routes(SPEC.underlay_ifname) == set()


def test_a_foreign_route_on_the_underlay_is_never_read_as_ours_nor_overwritten(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    ns.ip("route", "add", "198.19.1.0/24", "via", "198.18.0.9", "dev", "und0", "proto", "static")
    ns.ip("route", "add", "198.19.50.0/24", "via", "198.18.0.9", "dev", "und0")
    assert ns.inside(kernel.read_overlay_entries, SPEC.name, underlay="und0").direct_routes == frozenset()
    result = ns.inside(sync_modes, [lease(1, public_ip="198.18.0.5")], {"198.18.0.5"})
    assert result.ok and [str(c.entry.subnet) for c in result.conflicts] == ["198.19.1.0/24"]
    assert [(r["gateway"], r["protocol"]) for r in main_routes(ns, "198.19.1.0/24")] == [("198.18.0.9", "static")]
    assert [r["gateway"] for r in main_routes(ns, "198.19.50.0/24")] == ["198.18.0.9"]


def test_a_full_sync_of_our_own_routes_is_no_news_however_many(ns):
    """Thousands of our routes at once (a start-up's full sync) never reach the subscription: they
    would overrun its buffer, and a lost notification reads as news (a needless full pass)."""
    ns.inside(kernel.ensure_vtep, SPEC)
    peers = [Lease(IPv4Network(f"198.19.{i // 64}.{i % 64 * 4}/30"),
                   IPv4Address(f"198.18.{1 + i // 250}.{1 + i % 250}"), f"0a:00:00:00:{i >> 8:02x}:{i & 255:02x}",
                   SPEC.vni) for i in range(1, 5001)]
    with kernel.RouteEvents(netns=ns.name) as events:
        result = kernel.apply_plan(SPEC.name, plan_changes(desired_entries(peers), OverlayEntries()), netns=ns.name)
        assert result.ok and result.applied == 15000
        assert events.changed() is False
        ns.ip("route", "add", "198.18.9.0/24", "via", str(ROUTER_IP), "dev", "und0", "proto", "static")
        assert events.changed() is True, "someone else's route still is"
    assert len(ns.routes()) == 5000


def test_route_events_report_address_and_route_changes_but_not_our_own_routes(ns):
    ns.inside(kernel.ensure_vtep, SPEC)
    with kernel.RouteEvents(netns=ns.name) as events:
        assert events.changed() is False
        assert kernel.apply_plan(SPEC.name, plan_changes(desired_entries([lease(1)]), OverlayEntries()),
                                 netns=ns.name).ok
        assert kernel.apply_plan(SPEC.name, Plan(upsert_direct_routes=(Route(lease(2).subnet, ROUTER_IP),)),
                                 underlay="und0", netns=ns.name).ok
        assert events.changed() is False, "our own routes must not trigger a pass"
        ns.ip("route", "del", "198.18.0.0/24", "dev", "und0")  # a link flap's lost connected route
        assert events.changed() is True
        assert events.changed() is False
        ns.ip("addr", "add", "198.18.3.1/24", "dev", "und0")
        assert events.changed() is True
