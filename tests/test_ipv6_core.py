"""IPv6 in the pure core: config, lease keys and records, the book's conflict rules, allocation, desired
entries per VTEP and the direct-routing test. Hostile inputs first."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from vxlan_net.core.allocator import choose_free_subnet, reusable_subnet
from vxlan_net.core.config import build_config, parse_config
from vxlan_net.core.desired import FdbEntry, MainRoute, Neighbour, Route, desired_by_vtep
from vxlan_net.core.direct import DirectReach
from vxlan_net.core.errors import InvalidConfig, InvalidLease, SubnetsExhausted
from vxlan_net.core.lease import Lease, SubnetKey, parse_lease, parse_subnet_key_name, subnet_key_name
from vxlan_net.core.lease_book import LeaseBook, RecordEvent

DUAL = build_config("198.19.0.0/16", ipv6_network="fd19::/56")
V6ONLY = build_config(None, ipv6_network="fd19::/56")
MAC_A, MAC_B, MAC_C, MAC_D = "0a:00:00:00:00:0a", "0a:00:00:00:00:0b", "0a:00:00:00:00:0c", "0a:00:00:00:00:0d"


def record(ip="198.18.1.2", mac=MAC_A, ip6=None, mac6=None, vni=1) -> str:
    doc: dict = {"BackendType": "vxlan"}
    if ip is not None:
        doc.update(PublicIP=ip, BackendData={"VNI": vni, "VtepMAC": mac})
    if ip6 is not None:
        doc.update(PublicIPv6=ip6, BackendV6Data={"VNI": vni, "VtepMAC": mac6})
    return json.dumps(doc)


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("doc, message", [
    ({"EnableIPv6": True, "Network": "198.19.0.0/16"}, "no IPv6Network"),
    ({"EnableIPv6": "true", "Network": "198.19.0.0/16", "IPv6Network": "fd19::/56"}, "true or false"),
    ({"EnableIPv4": False}, "neither"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd19::1/56"}, "without host bits"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "198.19.0.0/16"}, "IPv6 CIDR"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fe80::/64"}, "link-local"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "ff00::/8"}, "multicast"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "::/0"}, "reserved"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd19::/56", "IPv6SubnetLen": 56}, "longer"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd19::/56", "IPv6SubnetLen": 127}, "at most"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd19::/56", "IPv6SubnetMin": "fd18::"}, "outside"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd19::/56", "IPv6SubnetMin": "fd19::1"},
     "not aligned"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd19::/56", "IPv6SubnetMin": "fd19:0:0:9::",
      "IPv6SubnetMax": "fd19:0:0:8::"}, "above"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd19::/56", "IPv6SubnetLen": True}, "integer"),
])
def test_ipv6_config_mistakes_are_refused_with_the_reason(doc, message):
    with pytest.raises(InvalidConfig, match=message):
        parse_config(json.dumps(doc))


def test_ipv6_config_defaults_follow_flannel_and_round_trip():
    assert (DUAL.ipv6.subnet_len, str(DUAL.ipv6.subnet_min), str(DUAL.ipv6.subnet_max)) == \
        (64, "fd19:0:0:1::", "fd19:0:0:ff::")
    assert build_config(None, ipv6_network="fd19::/63").ipv6.subnet_len == 65  # /62 or longer: prefix + 2
    for config in (DUAL, V6ONLY, build_config("198.19.0.0/16")):
        assert parse_config(config.to_json()) == config
    doc = json.loads(V6ONLY.to_json())
    assert doc["EnableIPv4"] is False and doc["EnableIPv6"] is True and "Network" not in doc
    assert "EnableIPv6" not in json.loads(build_config("198.19.0.0/16").to_json())  # IPv4 config unchanged
    assert V6ONLY.network == IPv6Network("fd19::/56") and DUAL.network == IPv4Network("198.19.0.0/16")


# -- keys and records -----------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "fd19:0:0:5::-64\n", "FD19:0:0:5::-64", "fd19:0000:0:5::-64", "fd19:0:0:5:0:0:0:0-64", "fd19:0:0:5::1-64",
    "198.19.5.0-24&", "198.19.5.0-24&198.19.6.0-24", "&fd19:0:0:5::-64", "198.19.5.0-24&fd19:0:0:5::-64&x",
    "fd19:0:0:5::-64&198.19.5.0-24", "fd19:0:0:5::-129", "::ffff:198.19.5.0-120", "198.19.5.0-24 &fd19:0:0:5::-64",
])
def test_ipv6_key_spellings_other_than_the_canonical_one_name_no_subnet(name):
    with pytest.raises(InvalidLease):
        parse_subnet_key_name(name)


def test_key_forms_flannel_dual_stack_and_ours_for_ipv6_only():
    dual = SubnetKey(IPv4Network("198.19.5.0/24"), IPv6Network("fd19:0:0:5::/64"))
    assert subnet_key_name(dual) == "198.19.5.0-24&fd19:0:0:5::-64"  # flannel's form, the ':' kept
    assert parse_subnet_key_name("198.19.5.0-24&fd19:0:0:5::-64") == dual
    assert subnet_key_name(IPv6Network("fd19:0:0:5::/64")) == "fd19:0:0:5::-64"
    assert parse_subnet_key_name("fd19:0:0:5::-64") == SubnetKey(None, IPv6Network("fd19:0:0:5::/64"))


@pytest.mark.parametrize("key, value, message", [
    ("198.19.5.0-24&fd19:0:0:5::-64", record(ip6=5, mac6=MAC_B), "not an IPv6 address string"),
    ("198.19.5.0-24&fd19:0:0:5::-64", record(ip6="198.18.1.2", mac6=MAC_B), "not an IPv6 address"),
    ("198.19.5.0-24&fd19:0:0:5::-64", record(ip6="FD18:0:0:1::2", mac6=MAC_B), "canonical"),
    ("198.19.5.0-24&fd19:0:0:5::-64", record(ip6="fe80::1", mac6=MAC_B), "link-local"),
    ("198.19.5.0-24&fd19:0:0:5::-64", record(ip6="ff02::1", mac6=MAC_B), "multicast"),
    ("198.19.5.0-24&fd19:0:0:5::-64", record(ip6="::1", mac6=MAC_B), "reserved"),
    ("198.19.5.0-24&fd19:0:0:5::-64", record(ip6="fd19:0:0:9::2", mac6=MAC_B), "inside the pod network"),
    ("198.19.5.0-24&fd19:0:0:5::-64", record(ip6="fd18:0:0:1::2", mac6="ff:00:00:00:00:01"), "multicast"),
    ("198.19.5.0-24&fd19:0:0:5::-64", json.dumps({"PublicIPv6": "fd18:0:0:1::2"}), "BackendV6Data"),
    ("198.19.5.0-24&fd19:0:0:5::-64", record(ip6="fd18:0:0:1::2", mac6=MAC_B, vni=9), "VNI"),
    ("198.19.5.0-24&fd19:0:0:5::-64", json.dumps({"BackendType": "vxlan"}), "PublicIP None, and no PublicIPv6"),
    ("198.19.5.0-24&fd18:0:0:5::-64", record(), "not a /64 inside fd19::/56"),
    ("198.19.5.0-24&fd19:0:0:5::-80", record(), "not a /64"),
    ("fd19:0:0:5::-64", record(), "no IPv4 subnet"),  # a dual-stack network needs the IPv4 part
])
def test_hostile_ipv6_records_are_refused_with_the_reason(key, value, message):
    with pytest.raises(InvalidLease, match=message):
        parse_lease(key, value, DUAL)


def test_ipv6_only_network_refuses_ipv4_keys_and_takes_its_own():
    with pytest.raises(InvalidLease, match="IPv6-only"):
        parse_lease("198.19.5.0-24&fd19:0:0:5::-64", record(), V6ONLY)
    with pytest.raises(InvalidLease, match="IPv6-only"):
        parse_lease("198.19.5.0-24", record(), V6ONLY)
    lease = parse_lease("fd19:0:0:5::-64", record(ip=None, ip6="fd18:0:0:1::2", mac6=MAC_B), V6ONLY)
    assert lease.subnet == IPv6Network("fd19:0:0:5::/64") and lease.public_ip is None
    assert lease.underlays == {6} and lease.key_name == "fd19:0:0:5::-64"
    assert parse_lease(lease.key_name, lease.to_json(), V6ONLY) == lease


def test_dual_stack_record_round_trips_and_an_ipv4_only_record_is_still_a_peer():
    lease = parse_lease("198.19.5.0-24&fd19:0:0:5::-64", record(ip6="fd18:0:0:1::2", mac6=MAC_B), DUAL)
    assert (lease.ipv6_subnet, lease.public_ipv6, lease.vtep_mac_v6) == \
        (IPv6Network("fd19:0:0:5::/64"), IPv6Address("fd18:0:0:1::2"), MAC_B)
    assert json.loads(lease.to_json())["BackendV6Data"] == {"VNI": 1, "VtepMAC": MAC_B}
    assert parse_lease(lease.key_name, lease.to_json(), DUAL) == lease
    old = parse_lease("198.19.6.0-24", record(ip="198.18.2.2"), DUAL)  # a node not restarted since IPv6 came
    assert old.ipv6_subnet is None and old.subnets == (IPv4Network("198.19.6.0/24"),)
    ignored = parse_lease("198.19.5.0-24&fd19:0:0:5::-64", record(), build_config("198.19.0.0/16"))
    assert ignored.ipv6_subnet is None  # an IPv4 network ignores the IPv6 part


# -- the book: conflicts per family ------------------------------------------------------------

def _events(records: dict[str, str]) -> list[RecordEvent]:
    return [RecordEvent(k, v.encode(), create_revision=i + 1) for i, (k, v) in enumerate(records.items())]


def test_an_alias_key_cannot_take_a_subnet_or_an_ipv6_identity_from_its_first_holder():
    book = LeaseBook(DUAL)
    change = book.replace(_events({
        "198.19.5.0-24&fd19:0:0:5::-64": record(ip6="fd18:0:0:1::2", mac6=MAC_B),
        # later records claiming the same IPv4 subnet, the same IPv6 subnet, the same v6 MAC or PublicIPv6
        "198.19.5.0-24": record(ip="198.18.3.2", mac=MAC_C),
        "198.19.7.0-24&fd19:0:0:5::-64": record(ip="198.18.4.2", mac=MAC_D),
        "198.19.8.0-24&fd19:0:0:8::-64": record(ip="198.18.5.2", mac="0a:00:00:00:00:11",
                                                ip6="fd18:0:0:5::2", mac6=MAC_B),
        "198.19.9.0-24&fd19:0:0:9::-64": record(ip="198.18.6.2", mac="0a:00:00:00:00:12",
                                                ip6="fd18:0:0:1::2", mac6="0a:00:00:00:00:13"),
    }))
    assert [l.key_name for l in change.added] == ["198.19.5.0-24&fd19:0:0:5::-64"]
    skipped = book.skipped()
    assert "subnet 198.19.5.0/24" in skipped["198.19.5.0-24"]
    assert "subnet fd19:0:0:5::/64" in skipped["198.19.7.0-24&fd19:0:0:5::-64"]
    assert "VtepMAC 0a:00:00:00:00:0b" in skipped["198.19.8.0-24&fd19:0:0:8::-64"]
    assert "PublicIP fd18:0:0:1::2" in skipped["198.19.9.0-24&fd19:0:0:9::-64"]
    # deleting the alias never removes the first holder
    change = book.apply([RecordEvent("198.19.5.0-24", None)])
    assert not change.removed and [l.key_name for l in book.peers()] == ["198.19.5.0-24&fd19:0:0:5::-64"]


def test_a_record_giving_both_its_vteps_one_mac_can_be_rewritten_and_deleted():
    book = LeaseBook(DUAL)
    key = "198.19.5.0-24&fd19:0:0:5::-64"
    same_mac = record(ip="198.18.5.2", mac=MAC_A, ip6="fd18:0:0:5::2", mac6=MAC_A)
    assert [l.key_name for l in book.apply(_events({key: same_mac})).added] == [key]
    change = book.apply(_events({key: record(ip="198.18.5.3", mac=MAC_A, ip6="fd18:0:0:5::2", mac6=MAC_A)}))
    assert [str(l.public_ip) for l in change.updated] == ["198.18.5.3"]
    change = book.apply([RecordEvent(key, None)])
    assert [l.key_name for l in change.removed] == [key] and book.peers() == [] and len(book) == 0
    # the MAC is free again for another record
    assert [l.key_name for l in book.apply(_events({"198.19.6.0-24": record(mac=MAC_A)})).added] == ["198.19.6.0-24"]


def test_records_claiming_our_ipv6_identity_or_capturing_a_protected_ipv6_address_are_skipped():
    book = LeaseBook(DUAL)
    own = Lease(IPv4Network("198.19.1.0/24"), IPv4Address("198.18.1.2"), MAC_A, 1,
                IPv6Network("fd19:0:0:1::/64"), IPv6Address("fd18:0:0:1::2"), MAC_B)
    book.set_own(own)
    book.set_protected({IPv6Address("fd19:0:0:7::5"): "etcd endpoint"})
    book.replace(_events({
        own.key_name: own.to_json(),
        "198.19.2.0-24&fd19:0:0:1::-64": record(ip="198.18.2.2", mac=MAC_C),
        "198.19.3.0-24&fd19:0:0:3::-64": record(ip="198.18.3.2", mac=MAC_D, ip6="fd18:0:0:1::2",
                                                mac6="0a:00:00:00:00:21"),
        "198.19.7.0-24&fd19:0:0:7::-64": record(ip="198.18.7.2", mac="0a:00:00:00:00:22"),
        "198.19.4.0-24&fd19:0:0:4::-64": record(ip="198.18.4.2", mac="0a:00:00:00:00:23",
                                                ip6="fd18:0:0:4::2", mac6="0a:00:00:00:00:24"),
    }))
    skipped = book.skipped()
    assert "subnet fd19:0:0:1::/64 is also claimed by " + own.key_name in skipped["198.19.2.0-24&fd19:0:0:1::-64"]
    assert "PublicIP fd18:0:0:1::2 is also claimed by " + own.key_name in skipped["198.19.3.0-24&fd19:0:0:3::-64"]
    assert "capture etcd endpoint fd19:0:0:7::5" in skipped["198.19.7.0-24&fd19:0:0:7::-64"]
    assert [l.key_name for l in book.peers()] == ["198.19.4.0-24&fd19:0:0:4::-64"]


# -- allocation ------------------------------------------------------------------------------

def test_ipv6_allocation_avoids_taken_and_underlay_subnets_and_samples_huge_spaces():
    space = DUAL.ipv6
    taken = set(list(space.subnets())[:-1])
    assert choose_free_subnet(space, taken) == IPv6Network("fd19:0:0:ff::/64")
    with pytest.raises(SubnetsExhausted, match="overlaps this node's underlay"):
        choose_free_subnet(space, taken, avoid={IPv6Network("fd19:0:0:ff::/64"): "address on eth0"})
    huge = build_config(None, ipv6_network="fd19::/32").ipv6  # 2^32 /64s: never listed
    subnet = choose_free_subnet(huge, set(), random.Random(1))
    assert subnet.prefixlen == 64 and subnet.subnet_of(IPv6Network("fd19::/32"))
    full = build_config(None, ipv6_network="fd19::/32", ipv6_subnet_len=64,
                        ipv6_subnet_min="fd19:0:0:5::", ipv6_subnet_max="fd19:0:1:4::").ipv6
    assert full.size == 65536
    with pytest.raises(SubnetsExhausted):
        choose_free_subnet(full, set(full.subnets()))


def test_an_ipv6_only_node_reuses_its_subnet_by_its_ipv6_endpoint():
    lease = Lease(IPv6Network("fd19:0:0:5::/64"), None, None, 1, None, IPv6Address("fd18:0:0:1::2"), MAC_B)
    leases = {lease.subnet: lease}
    assert reusable_subnet(V6ONLY.primary, leases, IPv6Address("fd18:0:0:1::2"), None, MAC_B) == lease.subnet
    assert reusable_subnet(V6ONLY.primary, leases, IPv6Address("fd18:0:0:9::2"), None, MAC_C) is None


# -- desired entries per VTEP and direct routing -------------------------------------------------

PEER = Lease(IPv4Network("198.19.2.0/24"), IPv4Address("198.18.2.2"), MAC_C, 1,
             IPv6Network("fd19:0:0:2::/64"), IPv6Address("fd18:0:0:2::2"), MAC_D)


def test_each_pod_family_rides_the_same_underlay_family_when_both_ends_have_it():
    sets = desired_by_vtep([PEER], own_underlays=(4, 6), own_families=(4, 6))
    assert sets[4].routes == {Route(IPv4Network("198.19.2.0/24"), IPv4Address("198.19.2.0"))}
    assert sets[4].fdb == {FdbEntry(MAC_C, IPv4Address("198.18.2.2"))}
    assert sets[6].neighbours == {Neighbour(IPv6Address("fd19:0:0:2::"), MAC_D)}
    assert sets[6].fdb == {FdbEntry(MAC_D, IPv6Address("fd18:0:0:2::2"))}
    assert sets[6].routes == {Route(IPv6Network("fd19:0:0:2::/64"), IPv6Address("fd19:0:0:2::"))}


def test_dual_stack_pods_over_an_ipv4_only_underlay_use_the_one_ipv4_vtep():
    sets = desired_by_vtep([PEER], own_underlays=(4,), own_families=(4, 6))
    assert set(sets) == {4} and len(sets[4].routes) == 2 and sets[4].fdb == {FdbEntry(MAC_C, IPv4Address("198.18.2.2"))}
    assert Neighbour(IPv6Address("fd19:0:0:2::"), MAC_C) in sets[4].neighbours
    # a peer with no underlay family in common gets nothing, and an IPv4-only peer no IPv6 route
    v6_only_peer = Lease(IPv6Network("fd19:0:0:3::/64"), None, None, 1, None, IPv6Address("fd18:0:0:3::2"), MAC_B)
    assert not any(len(e) for e in desired_by_vtep([v6_only_peer], (4,), (6,)).values())
    old = Lease(IPv4Network("198.19.6.0/24"), IPv4Address("198.18.6.2"), MAC_A)
    assert len(desired_by_vtep([old], (4, 6), (4, 6))[4].routes) == 1


def test_direct_routing_decides_per_family_with_ipv6_routes():
    routes = [MainRoute(IPv6Network("fd18:0:0:2::/64"), None, "eth0", 2),
              MainRoute(IPv6Network("::/0"), IPv6Address("fd18:0:0:1::1"), "eth0", 3),
              MainRoute(IPv4Network("0.0.0.0/0"), IPv4Address("198.18.1.1"), "eth0", 3)]
    reach = DirectReach.from_routes(routes, "eth0")
    assert reach.is_direct(IPv6Address("fd18:0:0:2::2")) and not reach.is_direct(IPv6Address("fd18:0:0:9::2"))
    assert not reach.is_direct(IPv4Address("198.18.2.2"))
    sets = desired_by_vtep([PEER], (4, 6), (4, 6), reach.is_direct)
    assert sets[4].direct_routes == {Route(IPv6Network("fd19:0:0:2::/64"), IPv6Address("fd18:0:0:2::2"))}
    assert len(sets[4].routes) == 1 and not sets[6].routes and not sets[6].direct_routes
