"""Acquiring a subnet against a real etcd: reuse, random choice, lost races, exhaustion."""

from __future__ import annotations

import logging
import random
import sys
import uuid
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from integration.etcd_server import EtcdServer  # noqa: E402
from vxlan_net.agent.lease_keeper import SubnetLeaseKeeper  # noqa: E402
from vxlan_net.core.config import build_config  # noqa: E402
from vxlan_net.core.errors import SubnetsExhausted  # noqa: E402
from vxlan_net.core.lease import Lease, parse_lease, parse_subnet_key_name, subnet_key_name  # noqa: E402
from vxlan_net.doors.store import EtcdStore  # noqa: E402

CONFIG = build_config("198.19.0.0/28", subnet_len=30)  # three subnets: .4 .8 .12
ME, OTHER = IPv4Address("198.18.1.2"), IPv4Address("198.18.2.2")


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.fixture
def store(etcd):
    with EtcdStore([etcd.client_url], prefix=f"/sl-{uuid.uuid4().hex[:8]}", timeout=3) as store:
        yield store


class RacingStore(EtcdStore):
    """An EtcdStore where another node creates each subnet just before we try to."""

    def __init__(self, *args, losses: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses = losses
        self.stolen: list[IPv4Network] = []

    def create_lease(self, key, value, ttl):
        if len(self.stolen) < self.losses:
            self.stolen.append(key.primary)
            super().create_lease(key, Lease(key.primary, OTHER, "0a:00:00:00:00:0f").to_json(), ttl)
        return super().create_lease(key, value, ttl)


def stored(store, subnet) -> Lease:
    record = store.list_leases().records[f"{subnet.network_address}-{subnet.prefixlen}"]
    return parse_lease(record.key_name, record.value, CONFIG)


def test_first_acquire_takes_a_free_subnet_and_a_restart_reuses_it(store):
    keeper = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
    lease = keeper.acquire(remembered=None)
    assert stored(store, lease.subnet).public_ip == ME
    again = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:02", ttl=60)  # restarted, new MAC
    assert again.acquire(remembered=None).subnet == lease.subnet
    assert again.lease_id == keeper.lease_id
    assert stored(store, lease.subnet).vtep_mac == "0a:00:00:00:00:02"


def test_acquire_hands_the_records_it_parsed_to_the_next_book_once(store):
    other = SubnetLeaseKeeper(store, CONFIG, OTHER, "0a:00:00:00:00:0f", ttl=60).acquire(remembered=None)
    keeper = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
    keeper.acquire(remembered=None)
    parsed = keeper.take_parsed_listing()
    assert parsed.config is CONFIG and list(parsed.leases.values()) == [other]  # the listing it chose by
    assert keeper.take_parsed_listing() is None  # not kept beyond the book it is handed to


def test_a_restart_after_renumbering_readopts_the_subnet_and_lease_by_mac(store):
    """Issue 13: renumbered while the agent was down: same subnet, same etcd lease, record rewritten."""
    keeper = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
    lease = keeper.acquire(remembered=None)
    stranger = SubnetLeaseKeeper(store, CONFIG, IPv4Address("198.18.1.9"), "0a:00:00:00:00:09", ttl=60)
    assert stranger.acquire(remembered=lease.subnet).subnet != lease.subnet  # hostile: not by the key alone
    renumbered = IPv4Address("198.18.1.7")
    again = SubnetLeaseKeeper(store, CONFIG, renumbered, "0a:00:00:00:00:01", ttl=60)
    assert again.acquire(remembered=lease.subnet).subnet == lease.subnet
    assert again.lease_id == keeper.lease_id
    assert stored(store, lease.subnet).public_ip == renumbered


def test_move_to_rewrites_our_record_in_place(store):
    keeper = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
    lease = keeper.acquire(remembered=None)
    moved = keeper.move_to(IPv4Address("198.18.1.7"))
    assert (moved.subnet, moved.vtep_mac, keeper.public_ip) == (lease.subnet, lease.vtep_mac, moved.public_ip)
    assert stored(store, lease.subnet) == moved
    record = store.list_leases().records[f"{lease.subnet.network_address}-{lease.subnet.prefixlen}"]
    assert record.lease_id == keeper.lease_id


def test_a_record_under_a_dual_stack_key_on_a_network_without_ipv6_is_taken_not_a_crash(store):
    """A node that ran while the network had IPv6 left its record under flannel's dual-stack key; the
    network has none now. Its lease keeps the IPv4 part only, but the keeper finds the record by its key."""
    dual_key = parse_subnet_key_name("198.19.0.4-30&fd19:0:0:1::-64")
    store.create_lease(dual_key, Lease(IPv4Network("198.19.0.4/30"), OTHER, "0a:00:00:00:00:0f").to_json(), 60)
    store.create_lease(parse_subnet_key_name("198.19.0.8-30&fd19:0:0:2::-64"),
                       Lease(IPv4Network("198.19.0.8/30"), ME, "0a:00:00:00:00:01").to_json(), 60)
    keeper = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
    lease = keeper.acquire(remembered=None)
    assert lease.subnet == IPv4Network("198.19.0.8/30")  # ours, by our PublicIP: kept, never the other's
    assert stored(store, lease.subnet) == lease and keeper.lease_id
    assert "198.19.0.8-30&fd19:0:0:2::-64" not in keys(store)  # our old record went with its lease
    other = SubnetLeaseKeeper(store, CONFIG, IPv4Address("198.18.3.2"), "0a:00:00:00:00:03", ttl=60)
    assert other.acquire(remembered=IPv4Network("198.19.0.4/30")).subnet == IPv4Network("198.19.0.12/30")


def test_remembered_subnet_is_preferred_when_free(store):
    keeper = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
    assert keeper.acquire(remembered=IPv4Network("198.19.0.12/30")).subnet == IPv4Network("198.19.0.12/30")


def test_a_lost_race_picks_another_subnet_instead_of_exiting(etcd):
    with RacingStore([etcd.client_url], prefix=f"/sl-{uuid.uuid4().hex[:8]}", timeout=3, losses=2) as racing:
        keeper = SubnetLeaseKeeper(racing, CONFIG, ME, "0a:00:00:00:00:01", ttl=60, rng=random.Random(3))
        lease = keeper.acquire(remembered=None)
        assert len(racing.stolen) == 2 and lease.subnet not in racing.stolen
        assert stored(racing, lease.subnet).public_ip == ME
        assert all(stored(racing, s).public_ip == OTHER for s in racing.stolen)


def test_exhausted_network_is_a_clear_error(etcd):
    with RacingStore([etcd.client_url], prefix=f"/sl-{uuid.uuid4().hex[:8]}", timeout=3, losses=3) as racing:
        keeper = SubnetLeaseKeeper(racing, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
        with pytest.raises(SubnetsExhausted, match="no free /30"):
            keeper.acquire(remembered=None)


def test_reacquire_revokes_the_lease_held_before(store):
    keeper = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
    first = keeper.acquire(remembered=None)
    old_id = keeper.lease_id
    store.delete_lease(first.subnet)
    assert keeper.acquire(remembered=first.subnet).subnet == first.subnet
    assert keeper.lease_id != old_id and store.lease_ttl(old_id) is None


def test_a_held_subnet_now_overlapping_the_underlay_is_given_up_with_a_warning(store, caplog):
    first = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
    old = first.acquire(remembered=None).subnet
    underlay = {IPv4Network((old.network_address + 1, 32)): f"address {old.network_address + 1}/24 on eth0"}
    restarted = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
    with caplog.at_level(logging.WARNING, logger="vxlan_net.agent.lease_keeper"):
        new = restarted.acquire(remembered=old, avoid=underlay).subnet
    assert new != old and not new.overlaps(old)
    assert set(store.list_leases().records) == {f"{new.network_address}-{new.prefixlen}"}  # the old record is gone
    assert store.lease_ttl(first.lease_id) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"giving up subnet {old}: it overlaps this node's address {old.network_address + 1}/24 on eth0"]


def test_no_subnet_outside_the_underlay_is_a_clear_exhaustion_and_leases_nothing(store):
    keeper = SubnetLeaseKeeper(store, CONFIG, ME, "0a:00:00:00:00:01", ttl=60)
    underlay = {IPv4Network("198.19.0.0/28"): "connected route 198.19.0.0/28 dev eth0 proto kernel scope link"}
    with pytest.raises(SubnetsExhausted, match="every free /30 between 198.19.0.4 and 198.19.0.12 overlaps this "
                                               "node's underlay: connected route 198.19.0.0/28 dev eth0"):
        keeper.acquire(remembered=IPv4Network("198.19.0.8/30"), avoid=underlay)
    assert store.list_leases().records == {}


# -- IPv6 (issue 11) ---------------------------------------------------------------------------------

DUAL = build_config("198.19.0.0/28", subnet_len=30, ipv6_network="fd19::/62")  # three /64s: 1 2 3
V6ONLY = build_config(None, ipv6_network="fd19::/62")
ME6, OTHER6 = IPv6Address("fd18:0:0:1::2"), IPv6Address("fd18:0:0:2::2")


def keys(store) -> list[str]:
    return sorted(store.list_leases().records)


def test_a_dual_stack_node_takes_one_subnet_per_family_under_flannels_key_and_keeps_both(store):
    keeper = SubnetLeaseKeeper(store, DUAL, ME, "0a:00:00:00:00:01", ttl=60, public_ipv6=ME6,
                               vtep_mac_v6="0a:00:00:00:00:61")
    lease = keeper.acquire(remembered=None)
    assert keys(store) == [lease.key_name] and "&fd19:0:0:" in lease.key_name
    record = store.list_leases().records[lease.key_name]
    assert parse_lease(record.key_name, record.value, DUAL) == lease
    assert (lease.public_ipv6, lease.vtep_mac_v6) == (ME6, "0a:00:00:00:00:61")
    again = SubnetLeaseKeeper(store, DUAL, ME, "0a:00:00:00:00:01", ttl=60, public_ipv6=ME6,
                              vtep_mac_v6="0a:00:00:00:00:61")  # a restart
    assert again.acquire(remembered=None) == lease and again.lease_id == keeper.lease_id
    # A second node never gets either of our subnets.
    other = SubnetLeaseKeeper(store, DUAL, OTHER, "0a:00:00:00:00:02", ttl=60, public_ipv6=OTHER6,
                              vtep_mac_v6="0a:00:00:00:00:62").acquire(remembered=None)
    assert other.subnet != lease.subnet and other.ipv6_subnet != lease.ipv6_subnet


def test_ipv6_added_to_a_running_network_moves_the_record_to_the_dual_stack_key_on_the_same_subnet(store):
    v4 = build_config("198.19.0.0/28", subnet_len=30)
    old = SubnetLeaseKeeper(store, v4, ME, "0a:00:00:00:00:01", ttl=60).acquire(remembered=None)
    assert keys(store) == [old.key_name] and "&" not in old.key_name
    # a record that already claims an IPv6 subnet: ours must not take it
    store.create_lease(parse_subnet_key_name("198.19.0.12-30&fd19:0:0:1::-64"),
                       Lease(IPv4Network("198.19.0.12/30"), OTHER, "0a:00:00:00:00:02").to_json(), 60)
    keeper = SubnetLeaseKeeper(store, DUAL, ME, "0a:00:00:00:00:01", ttl=60)
    lease = keeper.acquire(remembered=None)
    assert lease.subnet == old.subnet and lease.ipv6_subnet not in (None, IPv6Network("fd19:0:0:1::/64"))
    assert old.key_name not in keys(store) and lease.key_name in keys(store)


def test_an_ipv6_only_node_on_an_ipv6_underlay_keeps_its_subnet_by_its_ipv6_endpoint(store):
    keeper = SubnetLeaseKeeper(store, V6ONLY, None, None, ttl=60, public_ipv6=ME6, vtep_mac_v6="0a:00:00:00:00:61")
    lease = keeper.acquire(remembered=None)
    assert lease.key_name == subnet_key_name(lease.subnet) and lease.subnet.version == 6 and ":" in lease.key_name
    record = store.list_leases().records[lease.key_name]
    assert '"PublicIP"' not in record.value.decode() and parse_lease(lease.key_name, record.value, V6ONLY) == lease
    again = SubnetLeaseKeeper(store, V6ONLY, None, None, ttl=60, public_ipv6=ME6, vtep_mac_v6="0a:00:00:00:00:61")
    assert again.acquire(remembered=None).subnet == lease.subnet and again.lease_id == keeper.lease_id
    SubnetLeaseKeeper(store, V6ONLY, None, None, ttl=60, public_ipv6=OTHER6,
                      vtep_mac_v6="0a:00:00:00:00:62").acquire(remembered=None)
    SubnetLeaseKeeper(store, V6ONLY, None, None, ttl=60, public_ipv6=IPv6Address("fd18:0:0:3::2"),
                      vtep_mac_v6="0a:00:00:00:00:63").acquire(remembered=None)
    with pytest.raises(SubnetsExhausted):  # fd19::/62 in /64s, the first one never handed out: three
        SubnetLeaseKeeper(store, V6ONLY, None, None, ttl=60, public_ipv6=IPv6Address("fd18:0:0:4::2"),
                          vtep_mac_v6="0a:00:00:00:00:64").acquire(remembered=None)
