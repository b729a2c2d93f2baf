"""Untrusted lease parsing, subnet allocation and lease bookkeeping (pure)."""

import json
import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from vxlan_net.core.allocator import candidate_subnets, choose_free_subnet, overlap, reusable_subnet
from vxlan_net.core.config import build_config
from vxlan_net.core.errors import InvalidLease, SubnetsExhausted
from vxlan_net.core.lease import Lease, parse_lease, subnet_key_name
import vxlan_net.core.lease_book as lease_book
from vxlan_net.core.lease_book import LeaseBook, ParsedListing, RecordEvent

CONFIG = build_config("198.19.0.0/16", vni=1)
MAC_A, MAC_B = "0a:00:00:00:00:01", "0a:00:00:00:00:02"


def record(ip="198.18.1.2", mac=MAC_A, vni=1) -> bytes:
    return json.dumps({"PublicIP": ip, "BackendType": "vxlan", "BackendData": {"VNI": vni, "VtepMAC": mac}}).encode()


def test_valid_lease_parses_and_normalises_mac():
    lease = parse_lease("198.19.3.0-24", record(mac="0A-00-00-00-00-01"), CONFIG)
    assert lease == Lease(IPv4Network("198.19.3.0/24"), IPv4Address("198.18.1.2"), MAC_A, 1)
    assert lease.gateway == IPv4Address("198.19.3.0")
    assert subnet_key_name(lease.subnet) == "198.19.3.0-24"
    assert parse_lease("198.19.3.0-24", lease.to_json(), CONFIG) == lease


@pytest.mark.parametrize(
    "key, raw, reason",
    [
        ("198.19.3.0-24", b"{not json", "not valid JSON"),
        ("198.19.3.0-24", b"[1]", "not a JSON object"),
        ("198.20.3.0-24", record(), "inside"),
        ("198.19.3.0-25", record(), "inside"),
        ("198.19.3.7-24", record(), "not a subnet"),
        ("junk", record(), "form"),
        ("198.19.3.0-24", record(ip="300.1.1.1"), "PublicIP"),
        ("198.19.3.0-24", record(ip="224.0.0.1"), "cannot be a tunnel endpoint"),
        ("198.19.3.0-24", record(mac="zz:00:00:00:00:01"), "not a MAC"),
        ("198.19.3.0-24", record(mac="01:00:5e:00:00:01"), "multicast"),
        ("198.19.3.0-24", record(vni=7), "VNI 7"),
    ],
)
def test_untrusted_records_are_rejected_with_a_reason(key, raw, reason):
    with pytest.raises(InvalidLease, match=reason):
        parse_lease(key, raw, CONFIG)


def test_allocation_is_random_among_free_subnets_and_skips_taken():
    small = build_config("198.19.0.0/28", subnet_len=30).primary  # subnets .4 .8 .12
    taken = [IPv4Network("198.19.0.4/30"), IPv4Network("198.19.0.12/30")]
    assert [str(s) for s in candidate_subnets(small)] == ["198.19.0.4/30", "198.19.0.8/30", "198.19.0.12/30"]
    assert choose_free_subnet(small, taken, random.Random(1)) == IPv4Network("198.19.0.8/30")
    with pytest.raises(SubnetsExhausted, match="no free /30"):
        choose_free_subnet(small, [*taken, IPv4Network("198.19.0.8/30")])


def test_allocation_skips_every_subnet_overlapping_the_nodes_underlay():
    small = build_config("198.19.0.0/28", subnet_len=30).primary  # subnets .4 .8 .12
    avoid = {IPv4Network("198.19.0.0/29"): "address 198.19.0.5/29 on eth0",  # covers .4 (and the unused .0)
             IPv4Network("198.19.0.13/32"): "gateway 198.19.0.13 of route default via 198.19.0.13 dev eth0",
             IPv4Network("10.0.0.0/8"): "address 10.1.2.3/8 on eth1"}  # outside the network: irrelevant
    for seed in range(20):
        assert choose_free_subnet(small, [], random.Random(seed), avoid=avoid) == IPv4Network("198.19.0.8/30")
    with pytest.raises(SubnetsExhausted) as caught:
        choose_free_subnet(small, [IPv4Network("198.19.0.8/30")], avoid=avoid)
    assert str(caught.value) == (
        "every free /30 between 198.19.0.4 and 198.19.0.12 overlaps this node's underlay: address 198.19.0.5/29 "
        "on eth0; gateway 198.19.0.13 of route default via 198.19.0.13 dev eth0")


def test_a_connected_network_containing_the_whole_pod_network_leaves_nothing():
    with pytest.raises(SubnetsExhausted, match="every free /24 .* overlaps this node's underlay: "
                                               "connected route 198.16.0.0/12 dev eth0"):
        choose_free_subnet(CONFIG.primary, [], avoid={IPv4Network("198.16.0.0/12"): "connected route 198.16.0.0/12 dev eth0"})


def test_reuse_gives_up_a_previous_subnet_that_now_overlaps_the_underlay():
    ours = Lease(IPv4Network("198.19.7.0/24"), IPv4Address("198.18.1.2"), MAC_A)
    me, remembered = IPv4Address("198.18.1.2"), IPv4Network("198.19.9.0/24")
    avoid = {IPv4Network("198.19.7.0/25"): "address 198.19.7.1/25 on eth0"}
    assert overlap(ours.subnet, avoid) == "address 198.19.7.1/25 on eth0"
    assert overlap(remembered, avoid) is None
    assert reusable_subnet(CONFIG.primary, {ours.subnet: ours}, me, remembered, avoid=avoid) == remembered
    avoid[IPv4Network("198.19.9.77/32")] = "gateway 198.19.9.77"
    assert reusable_subnet(CONFIG.primary, {ours.subnet: ours}, me, remembered, avoid=avoid) is None


def test_reuse_prefers_the_lease_with_our_public_ip_then_the_remembered_subnet():
    ours = Lease(IPv4Network("198.19.7.0/24"), IPv4Address("198.18.1.2"), MAC_A)
    other = Lease(IPv4Network("198.19.8.0/24"), IPv4Address("198.18.2.2"), MAC_B)
    leases = {ours.subnet: ours, other.subnet: other}
    me = IPv4Address("198.18.1.2")
    assert reusable_subnet(CONFIG.primary, leases, me, IPv4Network("198.19.9.0/24")) == ours.subnet
    del leases[ours.subnet]
    assert reusable_subnet(CONFIG.primary, leases, me, IPv4Network("198.19.9.0/24")) == IPv4Network("198.19.9.0/24")
    assert reusable_subnet(CONFIG.primary, leases, me, other.subnet) is None  # held by someone else
    assert reusable_subnet(CONFIG.primary, leases, me, IPv4Network("198.20.0.0/24")) is None


def _listing(records: dict) -> list[RecordEvent]:
    return [RecordEvent(name, value, create_revision=n) for n, (name, value) in enumerate(records.items(), 1)]


def test_book_diffs_snapshots_including_attribute_changes():
    book = LeaseBook(CONFIG)
    book.set_own(Lease(IPv4Network("198.19.1.0/24"), IPv4Address("198.18.1.2"), MAC_A))
    change = book.replace(_listing({"198.19.1.0-24": record(ip="198.18.1.2"),
                                    "198.19.2.0-24": record(ip="198.18.2.2", mac=MAC_B)}))
    assert [str(l.subnet) for l in change.added] == ["198.19.2.0/24"]  # never ourselves
    assert [str(l.subnet) for l in book.peers()] == ["198.19.2.0/24"]
    change = book.replace(_listing({"198.19.1.0-24": record(ip="198.18.1.2"),
                                    "198.19.2.0-24": record(ip="198.18.2.2", mac="0a:00:00:00:00:03")}))
    assert [l.vtep_mac for l in change.updated] == ["0a:00:00:00:00:03"] and not change.added and not change.removed
    change = book.replace(_listing({"198.19.2.0-24": record(ip="198.18.2.2", mac=MAC_B)}))
    assert change.own_lease_removed and not change.removed


def test_book_reports_each_invalid_record_once_and_drops_it():
    book = LeaseBook(CONFIG)
    book.apply([RecordEvent("198.19.2.0-24", record())])
    change = book.apply([RecordEvent("198.19.2.0-24", b"garbage")])
    assert [k for k, _ in change.rejected] == ["198.19.2.0-24"] and change.removed
    assert book.apply([RecordEvent("198.19.2.0-24", b"garbage")]).rejected == ()
    assert book.peers() == []
    change = book.apply([RecordEvent("198.19.2.0-24", None)])
    assert not change.peers_changed


def test_event_batch_is_summarised_as_its_net_effect():
    book = LeaseBook(CONFIG)
    change = book.apply([RecordEvent("198.19.2.0-24", record()), RecordEvent("198.19.2.0-24", None)])
    assert not change.peers_changed


def test_a_handed_over_listing_of_another_config_is_refused_and_changed_or_invalid_records_parsed_again():
    parsed = ParsedListing(CONFIG)
    LeaseBook(CONFIG).replace(_listing({"198.19.2.0-24": record(ip="198.18.2.2", mac=MAC_B),
                                        "198.19.3.0-24": b"garbage"}), parsed)
    assert list(parsed.leases) == [("198.19.2.0-24", record(ip="198.18.2.2", mac=MAC_B))]  # the invalid: not kept
    with pytest.raises(ValueError, match="another network config"):
        LeaseBook(build_config("198.19.0.0/16", vni=2)).replace([], parsed)
    book = LeaseBook(CONFIG)
    change = book.replace(_listing({"198.19.2.0-24": record(ip="198.18.2.9", mac=MAC_B),  # changed meanwhile
                                    "198.19.3.0-24": b"garbage"}), parsed)
    assert [l.public_ip for l in book.peers()] == [IPv4Address("198.18.2.9")]
    assert [name for name, _ in change.rejected] == ["198.19.3.0-24"]


def test_a_listing_handed_over_is_parsed_once_for_both_books(monkeypatch):
    """The agent's start: the lease keeper's book, then the loop's book, take the same listing."""
    calls = []
    monkeypatch.setattr(lease_book, "parse_lease", lambda *args: calls.append(args[0]) or parse_lease(*args))
    listing = _listing({f"198.19.{i}.0-24": record(ip=f"198.18.{i}.2", mac=f"0a:00:00:00:00:{i:02x}")
                        for i in range(1, 6)})
    parsed = ParsedListing(CONFIG)
    LeaseBook(CONFIG).replace(listing, parsed)
    book = LeaseBook(CONFIG)
    book.set_own(parse_lease(listing[0].key_name, listing[0].value, CONFIG))
    book.replace(listing, parsed)
    assert sorted(calls) == sorted(event.key_name for event in listing)
    assert sorted(str(l.subnet) for l in book.peers()) == [f"198.19.{i}.0/24" for i in range(2, 6)]


def test_reuse_after_renumbering_keeps_the_remembered_subnet_whose_record_has_our_mac():
    """Issue 13: the node's address changed while its agent was down; its record still says the old one."""
    ours = Lease(IPv4Network("198.19.7.0/24"), IPv4Address("198.18.1.2"), MAC_A)
    renumbered = IPv4Address("198.18.1.7")
    leases = {ours.subnet: ours}
    # Hostile first: a remembered subnet held with another MAC and another PublicIP is someone else's.
    assert reusable_subnet(CONFIG.primary, leases, renumbered, ours.subnet, MAC_B) is None
    assert reusable_subnet(CONFIG.primary, leases, renumbered, ours.subnet, MAC_A) == ours.subnet
    # Our MAC on a subnet we do not remember moves us nowhere (anyone can write a record).
    assert reusable_subnet(CONFIG.primary, leases, renumbered, IPv4Network("198.19.9.0/24"), MAC_A) == \
        IPv4Network("198.19.9.0/24")
