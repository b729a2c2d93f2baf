"""Hostile etcd records: whatever bytes any node writes, parsing and the lease book stay sound (pure)."""

import itertools
import json
import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vxlan_net.core.config import build_config, parse_config
from vxlan_net.core.desired import desired_entries
from vxlan_net.core.errors import InvalidConfig, InvalidLease
from vxlan_net.core.lease import Lease, parse_lease, subnet_key_name
from vxlan_net.core.lease_book import LeaseBook, RecordEvent
from vxlan_net.core.untrusted import MAX_RECORD_BYTES

CONFIG = build_config("198.19.0.0/16", vni=1)
OWN = Lease(IPv4Network("198.19.1.0/24"), IPv4Address("198.18.1.2"), "0a:00:00:00:01:01")


def record(ip="198.18.2.2", mac="0a:00:00:00:02:02", vni=1, **extra) -> bytes:
    doc = {"PublicIP": ip, "BackendType": "vxlan", "BackendData": {"VNI": vni, "VtepMAC": mac}, **extra}
    return json.dumps(doc).encode()


# -- parsing: any bytes give a Lease or InvalidLease -----------------------------------------


@pytest.mark.parametrize(
    "key, raw, reason",
    [
        ("198.19.3.0-24", b"[" * 2000, "not valid JSON"),
        ("198.19.3.0-24", b'{"a":' * 3000 + b"1" + b"}" * 3000, "more than"),
        ("198.19.3.0-24", b"{\"a\": " + b"[" * 200 + b"]" * 200 + b"}", "PublicIP None"),
        ("198.19.3.0-24", b"x" * (1 << 20), "more than"),
        ("198.19.3.0-24", b"\xff\xfe{\x00}\x00", "not UTF-8"),
        ("198.19.3.0-24", record().decode().encode("utf-16"), "not UTF-8"),
        ("198.19.3.0-24\n", record(), "form"),
        ("198.19.3.0-24 ", record(), "form"),
        ("x198.19.3.0-24", record(), "form"),
        ("198.19.003.0-24", record(), "not a subnet"),
        ("198.19.3.0-024", record(), "form"),
        ("198.0.0.0-08", record(), "canonical"),
        ("١٩٨.19.3.0-24", record(), "form"),
        ("198.19.3.0-24", record(ip=3323135490), "not an IPv4 address string"),
        ("198.19.3.0-24", record(ip="127.0.0.1"), "tunnel endpoint"),
        ("198.19.3.0-24", record(ip="169.254.1.1"), "tunnel endpoint"),
        ("198.19.3.0-24", record(ip="0.1.2.3"), "tunnel endpoint"),
        ("198.19.3.0-24", record(ip="240.0.0.1"), "tunnel endpoint"),
        ("198.19.3.0-24", record(ip="255.255.255.255"), "tunnel endpoint"),
        ("198.19.3.0-24", record(ip="239.1.1.1"), "tunnel endpoint"),
        ("198.19.3.0-24", record(ip="198.19.9.1"), "inside the pod network"),
        ("198.19.3.0-24", record(vni=True), "VNI"),
        ("198.19.3.0-24", record(vni=1.0), "VNI"),
        ("198.19.3.0-24", record(mac=["0a"] * 6), "not a string"),
        ("198.19.3.0-24", record(mac="0a:00:00:00:00:01\n0a"), "not a MAC"),
    ],
)
def test_hostile_record_is_refused_with_a_short_reason(key, raw, reason):
    with pytest.raises(InvalidLease, match=reason) as caught:
        parse_lease(key, raw, CONFIG)
    assert len(str(caught.value)) < 200  # the log line never carries the hostile value itself


def test_a_record_at_the_size_cap_still_parses():
    padded = record(Padding="p" * (MAX_RECORD_BYTES - len(record()) - len(', "Padding": ""')))
    assert len(padded) == MAX_RECORD_BYTES
    assert parse_lease("198.19.3.0-24", padded, CONFIG).public_ip == IPv4Address("198.18.2.2")


@pytest.mark.parametrize("raw", [b"[" * 5000, b"\xff", b"x" * (1 << 20), b'{"Network": {"a": ' * 900 + b"}" * 900,
                                 json.dumps({"Network": 198}).encode()])
def test_hostile_network_config_is_refused(raw):
    with pytest.raises(InvalidConfig):
        parse_config(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.one_of(st.text(max_size=40), st.sampled_from(["198.19.3.0-24", "198.19.1.0-24", "198.19.3.0-24\n"])),
       raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_any_bytes_parse_or_are_refused(key, raw):
    try:
        lease = parse_lease(key, raw, CONFIG)
    except InvalidLease:
        return
    assert subnet_key_name(lease.subnet) == key and lease.subnet.subnet_of(CONFIG.network)


# -- identity conflicts ---------------------------------------------------------------


def _book(*events: RecordEvent) -> LeaseBook:
    book = LeaseBook(CONFIG)
    book.set_own(OWN)
    book.apply(events)
    return book


def test_duplicated_mac_goes_to_the_record_created_first_in_any_order():
    victim = RecordEvent("198.19.2.0-24", record(ip="198.18.2.2", mac="0a:00:00:00:02:02"), create_revision=5)
    thief = RecordEvent("198.19.9.0-24", record(ip="198.18.9.9", mac="0a:00:00:00:02:02"), create_revision=9)
    for order in ([victim, thief], [thief, victim]):
        book = _book(*order)
        assert [str(l.subnet) for l in book.peers()] == ["198.19.2.0/24"]
        assert "created first" in book.skipped()["198.19.9.0-24"]


def test_when_the_first_record_goes_the_other_takes_its_place():
    first = RecordEvent("198.19.2.0-24", record(ip="198.18.2.2"), create_revision=5)
    second = RecordEvent("198.19.9.0-24", record(ip="198.18.2.2", mac="0a:00:00:00:09:09"), create_revision=9)
    book = _book(first, second)
    change = book.apply([RecordEvent("198.19.2.0-24", None)])
    assert [str(l.subnet) for l in change.added] == ["198.19.9.0/24"]
    assert [str(l.subnet) for l in change.removed] == ["198.19.2.0/24"]
    assert book.skipped() == {}


def test_records_claiming_our_mac_or_public_ip_are_skipped_even_if_older():
    book = _book(RecordEvent("198.19.1.0-24", OWN.to_json().encode(), create_revision=50),
                 RecordEvent("198.19.5.0-24", record(mac=OWN.vtep_mac), create_revision=1),
                 RecordEvent("198.19.6.0-24", record(ip=str(OWN.public_ip), mac="0a:00:00:00:06:06"), create_revision=2))
    assert book.peers() == []
    skipped = book.skipped()
    assert "this node's VtepMAC" in skipped["198.19.5.0-24"] and "this node's PublicIP" in skipped["198.19.6.0-24"]
    assert "198.19.1.0-24" not in skipped


def test_a_rewrite_of_our_own_record_is_reported_but_never_programmed():
    book = _book(RecordEvent("198.19.1.0-24", OWN.to_json().encode(), create_revision=3))
    change = book.apply([RecordEvent("198.19.1.0-24", record(ip="198.18.7.7", mac="0a:00:00:00:07:07"), 3)])
    assert change.own_record_changed and not change.own_lease_removed and not change.peers_changed
    assert book.lease_for(OWN.subnet).public_ip == IPv4Address("198.18.7.7") and book.peers() == []
    alias = book.apply([RecordEvent("198.19.1.0-24\n", OWN.to_json().encode(), 4)])
    assert not alias.own_record_changed and [k for k, _ in alias.rejected] == ["198.19.1.0-24\n"]


def test_a_peer_subnet_covering_an_address_we_need_is_never_routed():
    book = _book(RecordEvent("198.19.200.0-24", record(), create_revision=4))
    assert len(book.peers()) == 1
    change = book.set_protected({IPv4Address("198.19.200.7"): "etcd endpoint http://198.19.200.7:2379",
                                 IPv4Address("198.18.1.2"): "this node's address on eth0"})
    assert [str(l.subnet) for l in change.removed] == ["198.19.200.0/24"] and book.peers() == []
    assert "would capture etcd endpoint http://198.19.200.7:2379 198.19.200.7" in change.rejected[0][1]
    assert book.set_protected({}).added


# -- properties: arbitrary records and mutations of valid ones ---------------------------

_SUBNETS = [f"198.19.{i}.0-24" for i in range(1, 7)]
_MACS = [f"0a:00:00:00:00:0{i}" for i in range(1, 4)] + [OWN.vtep_mac]
_IPS = ["198.18.2.2", "198.18.3.3", str(OWN.public_ip), "198.19.4.4"]


@st.composite
def _mutated_record(draw) -> bytes:
    doc = {"PublicIP": draw(st.sampled_from(_IPS)), "BackendType": "vxlan",
           "BackendData": {"VNI": draw(st.sampled_from([1, 1, 1, 2, True])), "VtepMAC": draw(st.sampled_from(_MACS))}}
    raw = json.dumps(doc).encode()
    cut = draw(st.sampled_from([None, None, None, 5, 30]))
    return raw if cut is None else raw[:cut]


@st.composite
def _events(draw) -> list[RecordEvent]:
    count = draw(st.integers(min_value=1, max_value=12))
    events, created = [], {}
    for revision in range(1, count + 1):  # as etcd numbers them: a put keeps the key's create revision
        key = draw(st.sampled_from(_SUBNETS + ["198.19.2.0-24\n", "junk"]))
        value = draw(st.one_of(st.none(), _mutated_record(), st.binary(max_size=40)))
        if value is None:
            created.pop(key, None)
        events.append(RecordEvent(key, value, create_revision=created.setdefault(key, revision) if value is not None else 0))
    return events


def _final_records(events: list[RecordEvent]) -> list[RecordEvent]:
    """What etcd would hold after the events (last write wins)."""
    held: dict[str, RecordEvent] = {}
    for event in events:
        if event.value is None:
            held.pop(event.key_name, None)
        else:
            held[event.key_name] = event
    return list(held.values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=_events(), seed=st.integers(min_value=0, max_value=1000))
def test_book_invariants_hold_for_any_events_in_any_order(events, seed):
    final = _final_records(events)
    by_events = _book(*events)
    shuffled = list(final)
    random.Random(seed).shuffle(shuffled)
    by_listing = LeaseBook(CONFIG)
    by_listing.set_own(OWN)
    by_listing.replace(shuffled)
    peers = by_events.peers()
    assert sorted(peers) == sorted(by_listing.peers())  # the same winners whatever the arrival order
    macs = [lease.vtep_mac for lease in peers]
    ips = [lease.public_ip for lease in peers]
    assert len(macs) == len(set(macs)) and len(ips) == len(set(ips))
    assert OWN.vtep_mac not in macs and OWN.public_ip not in ips
    assert all(lease.subnet.subnet_of(CONFIG.network) and lease.subnet != OWN.subnet for lease in peers)
    entries = desired_entries(peers)
    assert len({f.mac for f in entries.fdb}) == len(entries.fdb) == len(peers)
    assert all(route.subnet.subnet_of(CONFIG.network) for route in entries.routes)


def test_peers_do_not_depend_on_listing_order_exhaustively():
    records = [RecordEvent("198.19.2.0-24", record(ip="198.18.2.2", mac="0a:00:00:00:00:01"), 7),
               RecordEvent("198.19.3.0-24", record(ip="198.18.3.3", mac="0a:00:00:00:00:01"), 3),
               RecordEvent("198.19.4.0-24", record(ip="198.18.3.3", mac="0a:00:00:00:00:02"), 5),
               RecordEvent("198.19.5.0-24", record(ip="198.18.5.5", mac="0a:00:00:00:00:02"), 9)]
    outcomes = set()
    for order in itertools.permutations(records):
        book = LeaseBook(CONFIG)
        book.replace(order)
        outcomes.add(tuple(sorted(str(l.subnet) for l in book.peers())))
    assert outcomes == {("198.19.3.0/24",)}  # 5.0 shares its MAC with 4.0, created before it
