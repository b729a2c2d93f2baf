"""What the firewall door feeds to `nft -f` and, per event, to its netlink socket (pure): peers of both
families each in their table's set, IPv4 text unchanged when IPv6 is off, garbage refused before anything
reaches nft."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from vxlan_net.doors import firewall

NET, NET6 = IPv4Network("198.19.0.0/16"), IPv6Network("fd19::/56")
IPV4_ONLY = """table ip vxlan-net
delete table ip vxlan-net
table ip vxlan-net {
    chain pod_to_vxlan_port {
        type nat hook postrouting priority srcnat - 10; policy accept;
        ip saddr 198.19.0.0/16 udp dport 8472 counter drop comment "vxlan-net: pod traffic to the VXLAN port"
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 198.19.0.0/16 ip daddr 198.19.0.0/16 return
        ip saddr 198.19.0.0/16 ip daddr 224.0.0.0/4 return
        ip saddr 198.19.0.0/16 masquerade fully-random
    }
    set vxlan_peers {
        type ipv4_addr;
        elements = { 198.18.1.2, 198.18.2.2 }
    }
    chain input {
        type filter hook input priority filter; policy accept;
        udp dport 8472 ip saddr != @vxlan_peers counter drop comment "vxlan-net: VXLAN from a non-node"
    }
}
"""


class PeerSets:
    """Stands in for the door's netlink socket (_PeerSetSocket): records the transactions change_peers sends."""

    def __init__(self):
        self.sent: list[list[str]] = []

    def change(self, changes):
        self.sent.append([firewall._change_text(*change) for change in changes])


@pytest.fixture
def peer_sets(monkeypatch):
    sets = PeerSets()
    monkeypatch.setattr(firewall, "_peer_sets", sets)
    return sets


@pytest.mark.parametrize("bad", ["fd18::zz", "198.18.1.256", "", "fd18::2/64", None, 3.5])
def test_a_peer_that_is_no_address_is_refused_before_nft_runs(bad, peer_sets):
    with pytest.raises((ValueError, TypeError)):
        firewall.render_ruleset(NET, True, 8472, ["198.18.1.2", bad], ipv6_network=NET6)
    for added, removed in (([bad], []), (["198.18.3.2"], [bad])):
        with pytest.raises((ValueError, TypeError), match=re.escape(repr(bad))):
            firewall.change_peers(added, removed)
    assert peer_sets.sent == []  # nothing reached the kernel


def test_with_ipv6_off_the_text_is_the_ipv4_table_alone():
    peers = [IPv4Address("198.18.2.2"), "198.18.1.2"]
    assert firewall.render_ruleset(NET, True, 8472, peers) == IPV4_ONLY
    assert firewall.render_peer_update(peers) == ("flush set ip vxlan-net vxlan_peers\n"
                                                  "add element ip vxlan-net vxlan_peers { 198.18.1.2, 198.18.2.2 }\n")
    assert firewall.forward_rules(firewall.ForwardDevices("cni0", "vxnet.1"), "ip6") == []


def test_each_peer_goes_to_its_familys_set_and_the_ip6_table_follows_the_ipv4_one():
    text = firewall.render_ruleset(NET, True, 8472, ["fd18:0:0:2::2", "198.18.2.2", IPv6Address("fd18:0:0:1::2")],
                                   ipv6_network=NET6)
    ip, ip6 = text.split("table ip6 vxlan-net\n", 1)
    assert "elements = { 198.18.2.2 }" in ip and "fd18" not in ip
    assert "type ipv6_addr;\n        elements = { fd18:0:0:1::2, fd18:0:0:2::2 }" in ip6
    assert "ip6 saddr fd19::/56 ip6 daddr ff00::/8 return" in ip6
    assert "ip6 saddr fd19::/56 udp dport 8472 counter drop" in ip6
    assert ip6.startswith("delete table ip6 vxlan-net\n")


def test_an_ipv6_only_pod_network_has_no_ipv4_pod_rules_but_keeps_the_ipv4_ingress_filter():
    text = firewall.render_ruleset(None, True, 8472, [], ipv6_network=NET6)
    ip = text.split("table ip6 vxlan-net\n", 1)[0]
    assert "saddr" not in ip.replace("ip saddr != @vxlan_peers", "") and "masquerade" not in ip
    assert "ip saddr != @vxlan_peers counter drop" in ip


def test_changes_delete_before_they_add_in_each_family(peer_sets):
    firewall.change_peers(["fd18::5", "198.18.3.2"], ["fd18::6", "198.18.4.2"])
    firewall.change_peers([], [])  # nothing to change: no transaction
    assert peer_sets.sent == [["delete element ip vxlan-net vxlan_peers { 198.18.4.2 }",
                               "delete element ip6 vxlan-net vxlan_peers { fd18::6 }",
                               "add element ip vxlan-net vxlan_peers { 198.18.3.2 }",
                               "add element ip6 vxlan-net vxlan_peers { fd18::5 }"]]
    assert firewall.render_peer_update(["198.18.3.2"], ipv6=True).splitlines()[-1] == \
        "flush set ip6 vxlan-net vxlan_peers"
