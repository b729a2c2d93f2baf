"""The agent's decisions without root or etcd: the pure ones (agent/decisions.py, NetworkConfig.pod_mtu)
and the loop's own choices with its doors (etcd, netlink, nftables) replaced by fakes."""

from __future__ import annotations

import threading
import weakref
from ipaddress import IPv4Address, IPv6Address, IPv4Network

import pytest

from vxlan_net.core.errors import KernelError

from vxlan_net.agent.decisions import (KEEP, REFUSE, RESTORE, Response, SettledAddress, address_to_follow,
                                       next_resync_delay, own_record_action, respond_to)
from vxlan_net.agent.loop import Agent, AgentOptions, Doors
from vxlan_net.agent.reconciler import Reconciler
from vxlan_net.core.config import build_config
from vxlan_net.core.desired import desired_entries
from vxlan_net.core.lease import Lease, subnet_key_name
import vxlan_net.core.lease_book as lease_book
from vxlan_net.core.lease_book import LeaseBook, LeaseChange, ParsedListing, RecordEvent

from test_reconciler import MemoryKernel

CONFIG = build_config("198.19.0.0/16", vni=1)
OURS = Lease(IPv4Network("198.19.1.0/24"), IPv4Address("198.18.1.2"), "0a:00:00:00:00:01")
PEER = Lease(IPv4Network("198.19.2.0/24"), IPv4Address("198.18.2.2"), "0a:00:00:00:00:02")


# -- pure decisions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("change, listing, expected", [
    (LeaseChange(own_lease_removed=True), False, Response(reacquire=True, full_pass=True)),
    (LeaseChange(own_lease_removed=True, added=(PEER,)), True, Response(reacquire=True, full_pass=True)),
    (LeaseChange(), True, Response(check_own_record=True, full_pass=True)),
    (LeaseChange(own_record_changed=True), False, Response(check_own_record=True)),
    (LeaseChange(own_record_changed=True, updated=(PEER,)), False,
     Response(check_own_record=True, targeted_pass=True)),
    (LeaseChange(added=(PEER,)), False, Response(targeted_pass=True)),
    (LeaseChange(removed=(PEER,)), False, Response(targeted_pass=True)),
    (LeaseChange(rejected=(("x", "not JSON"),)), False, Response()),
])
def test_a_lost_own_record_or_a_listing_means_a_full_pass_moved_peers_a_targeted_one(change, listing, expected):
    assert respond_to(change, listing) == expected


def test_our_record_is_kept_restored_or_refused():
    assert own_record_action(OURS, OURS, CONFIG) == (KEEP, "")
    for recorded in (None, Lease(OURS.subnet, OURS.public_ip, "0a:00:00:00:00:09"), PEER):
        assert own_record_action(OURS, recorded, CONFIG) == (RESTORE, "")
    outside = Lease(IPv4Network("198.20.1.0/24"), OURS.public_ip, OURS.vtep_mac)  # held under an older config
    action, reason = own_record_action(outside, None, CONFIG)
    assert action == REFUSE and reason


@pytest.mark.parametrize("failures, expected", [(0, 30.0), (1, 2.0), (3, 8.0), (5, 30.0), (40, 30.0)])
def test_failed_passes_shorten_the_resync_never_beyond_the_interval(failures, expected):
    assert next_resync_delay(30.0, failures) == expected
    assert next_resync_delay(5.0, failures) == min(5.0, expected)


def test_the_pod_mtu_is_the_configs_else_the_underlays_minus_the_vxlan_overhead():
    assert CONFIG.pod_mtu(1500) == 1450 and CONFIG.pod_mtu(9000) == 8950
    assert build_config("198.19.0.0/16", mtu=1400).pod_mtu(9000) == 1400


# -- the loop with fake doors ------------------------------------------------------------------------


class FakeStore:
    def endpoint_addresses(self):
        return {IPv4Address("198.18.0.2"): "http://198.18.0.2:2379"}

    def close(self):
        pass


class KernelDoor(MemoryKernel):
    """The netlink door's calls the agent makes, answered from memory and recorded."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __getattr__(self, name):  # every other door function: record the call, answer None
        def call(*args, **kwargs):
            self.calls.append((name, args))
        return call

    ipv6_underlay = False

    def interface_address(self, ifname, family=4):
        self.calls.append(("interface_address", (ifname, family)))
        if family == 6:
            if not self.ipv6_underlay:
                raise KernelError(f"{ifname} has no global IPv6 address")
            return IPv6Address("fd18:0:0:1::2")
        return IPv4Address("198.18.1.2")

    def underlay_for(self, public_ip):
        self.calls.append(("underlay_for", (public_ip,)))
        return "und1", 7

    def default_route_source(self, family=4):
        self.calls.append(("default_route_source", (family,)))
        return "und0", IPv4Address("198.18.1.3")

    def link_info(self, ifname):
        return {"mtu": {"und0": 1500, "und1": 9000, "eth9": 1400}[ifname]}

    def node_addresses(self, family=4):
        return []

    def main_table_routes(self, family=4):
        return []


class FirewallDoor:
    ForwardDevices = staticmethod(lambda bridge, vtep, *args, **kwargs: (bridge, vtep))

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            return False
        return call


class FakeKeeper:
    ttl, renew_interval, lease_id = 60, 20.0, 7

    def __init__(self, lease):
        self.lease, self.acquired, self.restored = lease, 0, 0
        self.parsed = None  # what the real keeper's acquire keeps for the next listing

    def acquire(self, remembered, underlay, remembered_ipv6=None):
        self.acquired += 1
        self.parsed = object()
        return self.lease

    def take_parsed_listing(self):
        parsed, self.parsed = self.parsed, None
        return parsed

    def restore(self):
        self.restored += 1


def fake_agent(tmp_path, **options):
    kernel, nft = KernelDoor(), FirewallDoor()
    agent = Agent(AgentOptions(etcd_endpoints=("http://198.18.0.2:2379",), state_dir=tmp_path,
                               subnet_file=tmp_path / "subnet.env", **options), threading.Event(),
                  Doors(FakeStore(), kernel, nft))
    return agent, kernel, nft


@pytest.mark.parametrize("options, expected, asked", [
    ({"iface": "eth9"}, ("eth9", IPv4Address("198.18.1.2"), 1400), "interface_address"),
    ({"iface": "eth9", "public_ip": IPv4Address("198.18.9.9")}, ("eth9", IPv4Address("198.18.9.9"), 1400), None),
    ({"public_ip": IPv4Address("198.18.9.9")}, ("und1", IPv4Address("198.18.9.9"), 9000), "underlay_for"),
    ({}, ("und0", IPv4Address("198.18.1.3"), 1500), "default_route_source"),
])
def test_the_underlay_is_the_flag_then_the_public_ips_interface_then_the_default_route(tmp_path, options, expected,
                                                                                        asked):
    agent, kernel, _ = fake_agent(tmp_path, **options)
    agent.config = CONFIG
    assert agent._resolve_underlay() == expected and agent.public_ipv6 is None
    assert [name for name, _ in kernel.calls] == ([asked] if asked else [])


def test_an_ipv6_endpoint_is_looked_for_only_when_the_network_has_ipv6(tmp_path):
    agent, kernel, _ = fake_agent(tmp_path)
    kernel.ipv6_underlay = True
    agent.config = CONFIG
    agent._resolve_underlay()
    assert agent.public_ipv6 is None and ("interface_address", ("und0", 6)) not in kernel.calls
    agent.config = build_config("198.19.0.0/16", ipv6_network="fd19::/56")
    assert agent._resolve_underlay() == ("und0", IPv4Address("198.18.1.3"), 1500)
    assert agent.public_ipv6 == IPv6Address("fd18:0:0:1::2")
    kernel.ipv6_underlay = False  # dual-stack pods over an IPv4-only underlay: one VTEP
    agent._resolve_underlay()
    assert agent.public_ipv6 is None


def test_a_node_with_no_underlay_address_of_either_family_is_a_clear_error(tmp_path):
    agent, kernel, _ = fake_agent(tmp_path, iface="eth9")
    kernel.interface_address = lambda ifname, family=4: (_ for _ in ()).throw(KernelError(f"no IPv{family}"))
    agent.config = build_config("198.19.0.0/16", ipv6_network="fd19::/56")
    with pytest.raises(KernelError, match="neither an IPv4 nor a global IPv6 address"):
        agent._resolve_underlay()


def running(tmp_path):
    """An agent as _follow_leases has it: holding OURS, knowing the listing with OURS and PEER."""
    agent, kernel, nft = fake_agent(tmp_path, vxlan_ingress_filter=False)
    agent.config, agent.underlay = CONFIG, ("und0", OURS.public_ip, 1500)
    agent.keeper = FakeKeeper(OURS)
    agent.reconciler = Reconciler("vxnet.1", kernel)
    agent._adopt(OURS)
    agent.book = LeaseBook(CONFIG)
    agent.book.set_own(OURS)
    agent._take([RecordEvent(subnet_key_name(l.subnet), l.to_json().encode(), n) for n, l in enumerate((OURS, PEER))],
                replace=True)
    assert kernel.entries == desired_entries([PEER]) and kernel.reads == 1
    return agent, kernel, nft


def test_adopting_a_lease_creates_the_vtep_with_the_pod_mtu_and_writes_the_subnet_file(tmp_path):
    agent, kernel, nft = running(tmp_path)
    (spec,) = [args[0] for name, args in kernel.calls if name == "ensure_vtep"]
    assert (spec.name, spec.mtu, spec.mac, spec.local_ip, spec.underlay_ifname) == (
        "vxnet.1", 1450, OURS.vtep_mac, OURS.public_ip, "und0")
    assert "VXLAN_NET_MTU=1450\n" in (tmp_path / "subnet.env").read_text()
    assert "apply_rules" in nft.calls


def test_a_new_peer_is_a_targeted_pass_and_a_deleted_own_record_a_reacquire_and_a_full_pass(tmp_path):
    agent, kernel, _ = running(tmp_path)
    third = Lease(IPv4Network("198.19.3.0/24"), IPv4Address("198.18.3.2"), "0a:00:00:00:00:03")
    agent._take([RecordEvent(subnet_key_name(third.subnet), third.to_json().encode(), 5)])
    assert kernel.reads == 1 and kernel.entries == desired_entries([PEER, third]), "not a targeted pass"
    assert agent.keeper.acquired == 0

    agent._take([RecordEvent(subnet_key_name(OURS.subnet), None)])
    assert agent.keeper.acquired == 1 and kernel.reads == 2, "no re-acquire and full pass"
    assert agent.keeper.parsed is None, "a re-acquire's parse of every record must not be kept (no listing takes it)"
    assert len([name for name, _ in kernel.calls if name == "ensure_vtep"]) == 2  # adopted again


def test_our_record_rewritten_by_someone_else_is_restored_without_a_pass(tmp_path):
    agent, kernel, _ = running(tmp_path)
    forged = Lease(OURS.subnet, OURS.public_ip, "0a:00:00:00:00:0e")
    agent._take([RecordEvent(subnet_key_name(OURS.subnet), forged.to_json().encode(), 0)])
    assert agent.keeper.restored == 1 and agent.keeper.acquired == 0 and kernel.reads == 1


def test_the_listing_after_an_acquire_takes_the_records_the_keeper_parsed_and_only_once(tmp_path, monkeypatch):
    agent, kernel, _ = running(tmp_path)
    third = Lease(IPv4Network("198.19.3.0/24"), IPv4Address("198.18.3.2"), "0a:00:00:00:00:03")
    listing = [RecordEvent(subnet_key_name(l.subnet), l.to_json().encode(), n) for n, l in enumerate((OURS, PEER, third))]
    parsed = ParsedListing(CONFIG)
    LeaseBook(CONFIG).replace(listing, parsed)  # what the keeper's acquire parsed to choose our subnet
    handed = [parsed]
    agent.keeper.take_parsed_listing = lambda: handed.pop() if handed else None
    calls = []
    parse = lease_book.parse_lease
    monkeypatch.setattr(lease_book, "parse_lease", lambda *args: calls.append(args[0]) or parse(*args))
    snapshot = type("Snapshot", (), {"events": lambda self: list(listing)})()
    agent._relist(snapshot)
    assert calls == [] and kernel.entries == desired_entries([PEER, third])
    agent._relist(snapshot)  # a later listing (the watch was lost): nothing handed over, parsed afresh
    assert sorted(calls) == sorted(event.key_name for event in listing)


def test_the_handed_over_listing_is_freed_before_the_full_pass_it_triggers(tmp_path):
    """The full pass after a listing ends in malloc_trim: what the listing parsed must be gone by then, or
    its heap stays with the agent for good (1.5 MiB at 5,000 leases)."""
    agent, kernel, _ = running(tmp_path)
    listing = [RecordEvent(subnet_key_name(l.subnet), l.to_json().encode(), n) for n, l in enumerate((OURS, PEER))]
    parsed = ParsedListing(CONFIG)
    LeaseBook(CONFIG).replace(listing, parsed)
    alive_at_full_pass = []
    handed, freed = [parsed], weakref.ref(parsed)
    del parsed
    agent.keeper.take_parsed_listing = lambda: handed.pop()
    full_pass = agent._reconcile
    agent._reconcile = lambda full=True: alive_at_full_pass.append(freed() is not None) or full_pass(full)
    agent._relist(type("Snapshot", (), {"events": lambda self: list(listing)})())
    assert alive_at_full_pass == [False]


# -- following the node's own underlay address (issue 13) --------------------------------------------

OLD, NEW, OTHER = IPv4Address("198.18.1.2"), IPv4Address("198.18.1.7"), IPv4Address("198.18.1.8")


@pytest.mark.parametrize("explicit, present, primary, expected", [
    (False, {OLD, NEW}, NEW, OLD),     # two addresses present (a flap, a migration): keep ours
    (False, set(), None, None),        # no address at all (removed, not re-added yet): keep ours
    (True, {NEW}, NEW, None),          # --public-ip gone: never replaced
    (True, {OLD, NEW}, NEW, OLD),      # --public-ip still present after an unrelated change
    (False, {NEW}, NEW, NEW),          # renumbered
])
def test_address_to_follow(explicit, present, primary, expected):
    assert address_to_follow(OLD, explicit, present, primary) == expected


def test_a_new_address_is_followed_only_once_settled():
    settled = SettledAddress(settle=2.0)
    assert settled.observe(OLD, NEW, now=10.0) is None
    assert settled.check_at() == 12.0
    assert settled.observe(OLD, NEW, now=11.9) is None
    assert settled.observe(OLD, NEW, now=12.0) == NEW
    assert settled.check_at() is None


@pytest.mark.parametrize("flap", [
    [(NEW, 10.0), (None, 10.5), (OLD, 10.9)],  # removed and re-added within a second
    [(NEW, 10.0), (OLD, 11.0)],                 # the new one briefly the only one, then ours back
])
def test_a_flap_back_to_our_address_moves_nothing(flap):
    settled = SettledAddress(settle=2.0)
    for wanted, now in flap:
        assert settled.observe(OLD, wanted, now) is None
    assert settled.observe(OLD, OLD, now=20.0) is None
    assert settled.check_at() is None


def test_renumbered_twice_quickly_moves_once_to_the_last_address():
    settled = SettledAddress(settle=2.0)
    assert settled.observe(OLD, NEW, now=10.0) is None
    assert settled.observe(OLD, OTHER, now=11.5) is None  # changed again: the clock restarts
    assert settled.observe(OLD, OTHER, now=12.5) is None
    assert settled.observe(OLD, OTHER, now=13.5) == OTHER
