"""Overlay entries hash and compare as the dataclasses they are, though their hash is cached and equal
entries are interned (issue 14: a resync diffs 15,000 of them)."""

import copy
import pickle
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from vxlan_net.core.desired import FdbEntry, Neighbour, Route, desired_entries, interned
from vxlan_net.core.lease import Lease
from vxlan_net.core.plan import plan_changes

MAC = "0a:00:00:00:00:01"


def test_entries_of_other_families_or_kinds_with_the_same_ints_are_never_equal():
    assert Neighbour(IPv4Address(1), MAC) != Neighbour(IPv6Address(1), MAC)
    assert Route(IPv4Network("0.0.0.0/32"), IPv4Address(0)) != Route(IPv6Network("::/128"), IPv6Address(0))
    assert FdbEntry(MAC, IPv4Address(1)) != Neighbour(IPv4Address(1), MAC)
    assert Route(IPv4Network("198.19.1.0/24"), IPv4Address("198.19.1.0")) != \
        Route(IPv4Network("198.19.1.0/25"), IPv4Address("198.19.1.0"))
    assert Neighbour(IPv4Address(1), MAC) != (IPv4Address(1), MAC)  # a tuple of the same fields is no entry
    assert len({Neighbour(IPv4Address(1), MAC), Neighbour(IPv6Address(1), MAC)}) == 2


def test_equal_fields_make_equal_entries_with_equal_hashes_and_one_interned_object():
    a = Route(IPv4Network("198.19.1.0/24"), IPv4Address("198.19.1.0"))
    b = Route(IPv4Network("198.19.1.0/24"), IPv4Address("198.19.1.0"))
    assert a == b and hash(a) == hash(b) and a is not b
    assert interned(a) is interned(b) and interned(a) == a  # the first of them interned, or an older equal one
    assert sorted([b, Route(IPv4Network("198.19.0.0/24"), IPv4Address("198.19.0.0"))])[0].subnet.exploded \
        == "198.19.0.0/24"  # order stays the dataclass order


def test_copies_and_pickles_equal_the_original_and_vars_shows_the_fields_alone():
    entry = FdbEntry(MAC, IPv6Address("fd18::2"))
    for twin in (copy.copy(entry), copy.deepcopy(entry), pickle.loads(pickle.dumps(entry))):
        assert twin == entry and hash(twin) == hash(entry)
    assert vars(entry) == {"mac": MAC, "dst": IPv6Address("fd18::2")}


def test_a_diff_of_entries_built_twice_finds_nothing_and_of_a_changed_mac_finds_the_change():
    leases = [Lease(IPv4Network(f"198.19.{n}.0/24"), IPv4Address(f"198.18.{n}.2"), f"0a:00:00:00:00:{n:02x}")
              for n in range(1, 30)]
    assert plan_changes(desired_entries(leases), desired_entries(leases)).empty
    moved = leases[:-1] + [Lease(leases[-1].subnet, leases[-1].public_ip, "0a:00:00:00:00:99")]
    plan = plan_changes(desired_entries(moved), desired_entries(leases))
    assert plan.upsert_neighbours == (Neighbour(IPv4Address("198.19.29.0"), "0a:00:00:00:00:99"),)
    assert plan.remove_fdb == (FdbEntry("0a:00:00:00:00:1d", IPv4Address("198.18.29.2")),)


def _neighbours(first: int, count: int) -> list[Neighbour]:
    return [Neighbour(IPv4Address("198.19.0.0") + first + i, MAC) for i in range(count)]


def test_interned_entries_nobody_holds_are_swept_and_held_ones_stay_the_interned_object():
    import vxlan_net.core.desired as desired

    before = len(desired._INTERNED)
    kept = [interned(n) for n in _neighbours(1 << 20, 3000)]
    for n in _neighbours(2 << 20, 3000):
        interned(n)  # built, interned and dropped, as a departed peer's entries
    # Enough further entries to pass the next sweep point whatever the table held before this test.
    for n in _neighbours(3 << 20, max(desired._sweep_at, desired._SWEEP_MIN) + 1):
        interned(n)
    gone = _neighbours(2 << 20, 3000)
    assert not any(desired._INTERNED.get(hash(n)) is not None for n in gone)
    twins = _neighbours(1 << 20, 3000)
    assert all(interned(t) is k for t, k in zip(twins, kept))  # still the one live object each
    assert len(desired._INTERNED) < before + 3000 + desired._sweep_at


def test_the_sweep_measures_what_the_table_alone_holds():
    import vxlan_net.core.desired as desired

    only = Neighbour(IPv4Address("198.19.255.1"), MAC)
    held = Neighbour(IPv4Address("198.19.255.2"), MAC)
    table = {1: only, 2: held}
    del only
    assert desired._refcounts(table) == [desired._ONLY_IN_TABLE, desired._ONLY_IN_TABLE + 1]


def test_peers_of_one_shape_share_one_layout_and_a_share_reads_back_as_its_entries():
    from vxlan_net.core.desired import entries_by_vtep, peer_entries, share_items, without_field

    peers = [Lease(IPv4Network(f"198.19.{n}.0/24"), IPv4Address(f"198.18.{n}.2"), f"0a:00:00:00:00:{n:02x}")
             for n in (1, 2, 3)]
    direct = {IPv4Address("198.18.3.2")}.__contains__  # the third peer is reached directly
    shares = [peer_entries(p, (4,), (4,), direct) for p in peers]
    assert shares[0][0] is shares[1][0] and shares[2][0] is not shares[0][0]
    assert [(where, entry) for where, entry in share_items(shares[2])] == [
        ((4, "direct_routes"), Route(IPv4Network("198.19.3.0/24"), IPv4Address("198.18.3.2")))]
    assert entries_by_vtep(shares, (4,))[4] == desired_entries(peers, direct)
    assert entries_by_vtep([without_field(s, "direct_routes") for s in shares], (4,))[4] == desired_entries(peers[:2])
