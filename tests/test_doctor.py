"""doctor's checks on hand-made facts: a healthy node passes, and each broken item is named."""

from __future__ import annotations

import dataclasses
import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address

import pytest

from vxlan_net.core.config import build_config
from vxlan_net.core.desired import FdbEntry, MainRoute, Neighbour, OverlayEntries, Route, desired_entries
from vxlan_net.core.lease import Lease
from vxlan_net.doors.firewall import render_ruleset
from vxlan_net.tools import doctor
from vxlan_net.tools.doctor import Finding, Link, NodeFacts, TunnelFrame, Unavailable, VxlanAttrs

CONFIG = build_config("198.19.0.0/16")
OWN = Lease(IPv4Network("198.19.3.0/24"), IPv4Address("198.18.1.2"), "02:00:00:00:00:01")
PEER = Lease(IPv4Network("198.19.7.0/24"), IPv4Address("198.18.2.2"), "02:00:00:00:00:02")
OTHER = Lease(IPv4Network("198.19.9.0/24"), IPv4Address("198.18.3.2"), "02:00:00:00:00:03")
SUBNET_FILE = ("VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=198.19.3.1/24\n"
               "VXLAN_NET_MTU=1450\nVXLAN_NET_IPMASQ=true\n")


def nft_listing(network: str = "198.19.0.0/16", ip_masq: bool = True, family: str = "ip",
                peers: tuple = (PEER.public_ip, OTHER.public_ip)) -> dict:
    """What `nft -j list table <family> vxlan-net` prints for our ruleset, built by hand in the same shape."""
    def prefix(field, net):
        addr, length = net.split("/")
        return {"match": {"op": "==", "left": {"payload": {"protocol": family, "field": field}},
                          "right": {"prefix": {"addr": addr, "len": int(length)}}}}

    def rule(chain, *expr):
        return {"rule": {"family": family, "table": "vxlan-net", "chain": chain, "expr": list(expr)}}

    udp_port = {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 8472}}
    items = [{"table": {"family": family, "name": "vxlan-net"}},
             {"set": {"family": family, "name": "vxlan_peers", "table": "vxlan-net",
                      "type": "ipv4_addr" if family == "ip" else "ipv6_addr", "elem": [str(p) for p in peers]}},
             rule("input", udp_port, {"counter": {"packets": 0, "bytes": 0}}, {"drop": None})]
    if ip_masq:
        items += [rule("postrouting", prefix("saddr", network), prefix("daddr", network), {"return": None}),
                  rule("postrouting", prefix("saddr", network),
                       prefix("daddr", "224.0.0.0/4" if family == "ip" else "ff00::/8"), {"return": None}),
                  rule("postrouting", prefix("saddr", network), {"masquerade": {"flags": "fully-random"}})]
    return {"nftables": items}


def healthy(**changes) -> NodeFacts:
    facts = NodeFacts(
        config=CONFIG,
        leases={OWN.subnet: OWN, PEER.subnet: PEER, OTHER.subnet: OTHER},
        vtep_name="vxnet.1",
        vtep=Link("vxnet.1", "vxlan", 1450, OWN.vtep_mac, True, (IPv4Interface("198.19.3.0/32"),),
                  VxlanAttrs(1, 8472, OWN.public_ip, "ul0", False)),
        underlay=Link("ul0", "veth", 1500, "0a:00:00:00:00:01", True, (IPv4Interface("198.18.1.2/24"),)),
        entries=desired_entries([PEER, OTHER]),
        bridge=Link("cni0", "bridge", 1450, "0a:00:00:00:00:02", True, (IPv4Interface("198.19.3.1/24"),)),
        subnet_file=SUBNET_FILE,
        nft=nft_listing(),
        ip_forward=True,
        state={"VtepMAC": OWN.vtep_mac, "Subnet": "198.19.3.0/24"},
        subnet_file_path="/run/vxlan-net/subnet.env",
        etcd_endpoints="http://198.18.0.2:2379",
    )
    return dataclasses.replace(facts, **changes)


def failures(facts: NodeFacts) -> dict[str, Finding]:
    return {f.item: f for f in doctor.run_checks(facts) if not f.ok}


def only_failure(facts: NodeFacts) -> Finding:
    failed = failures(facts)
    assert len(failed) == 1, failed
    finding = next(iter(failed.values()))
    assert finding.fix, finding
    return finding


def vtep(**changes) -> Link:
    return dataclasses.replace(healthy().vtep, **changes)


def test_a_healthy_node_passes_every_check():
    findings = doctor.run_checks(healthy())
    assert all(f.ok for f in findings), [f for f in findings if not f.ok]
    items = [f.item for f in findings]
    assert items == ["config", "own lease 198.19.3.0/24", "state /var/lib/vxlan-net/node.json", "device vxnet.1",
                     "peer 198.19.7.0/24 at 198.18.2.2", "peer 198.19.9.0/24 at 198.18.3.2", "stale entries",
                     "bridge cni0", "subnet file /run/vxlan-net/subnet.env", "nftables table ip vxlan-net",
                     "masquerade", "ip_forward"]


def test_etcd_unavailable_fails_config_with_its_reason_and_the_data_plane_is_still_checked():
    down = Unavailable("etcd unavailable: etcd http://198.18.0.2:2379: get config: UNAVAILABLE: connection refused")
    failed = failures(healthy(config=down, leases=Unavailable("leases not read: see the config line")))
    assert "connection refused" in failed["config"].reason
    assert "198.18.0.2:2379" in failed["config"].fix
    assert set(failed) == {"config", "own lease", "peer entries"}
    assert failed["peer entries"].reason == "not checked: leases not read: see the config line"


def test_missing_config_says_how_to_write_it():
    finding = failures(healthy(config=Unavailable("no config at /vxlan-net/config"),
                               leases=Unavailable("no config")))["config"]
    assert "config set" in finding.fix


def test_own_lease_missing_is_named():
    finding = only_failure(healthy(leases={PEER.subnet: PEER, OTHER.subnet: OTHER}))
    assert finding.item == "own lease" and "no lease for 198.19.3.0/24" in finding.reason


def test_own_lease_with_another_public_ip_or_mac_is_named():
    moved = dataclasses.replace(OWN, public_ip=IPv4Address("198.18.9.2"), vtep_mac="02:00:00:00:00:99")
    failed = failures(healthy(leases={OWN.subnet: moved, PEER.subnet: PEER}, entries=desired_entries([PEER])))
    reason = failed["own lease 198.19.3.0/24"].reason
    assert "PublicIP 198.18.9.2 but vxnet.1 sends from 198.18.1.2" in reason
    assert "VtepMAC 02:00:00:00:00:99" in reason


def test_a_lease_public_ip_no_longer_on_this_node_is_flagged_with_the_fix():
    """Issue 13: renumbered under an agent run with --public-ip (it keeps the old address)."""
    renumbered = frozenset({IPv4Address("198.18.1.7"), IPv4Address("198.19.3.0")})
    finding = only_failure(healthy(node_addresses=renumbered))
    assert finding.item == "own lease 198.19.3.0/24"
    assert "PublicIP 198.18.1.2 is not on this node any more" in finding.reason
    assert "--public-ip <new>" in finding.fix and "subnet and MAC stay" in finding.fix
    assert not failures(healthy(node_addresses=renumbered | {OWN.public_ip}))
    assert not failures(healthy(node_addresses=Unavailable("cannot read this node's addresses")))


def test_own_subnet_is_found_from_the_subnet_file_when_the_vtep_is_gone():
    failed = failures(healthy(vtep=Unavailable("no device named vxnet.1"),
                              entries=Unavailable("cannot read the entries of vxnet.1")))
    assert "no device named vxnet.1" in failed["device vxnet.1"].reason
    assert "own lease 198.19.3.0/24" in failed  # found, but cannot be compared with the device


def test_persisted_mac_differing_from_the_device_is_named():
    finding = only_failure(healthy(state={"VtepMAC": "02:00:00:00:00:42", "Subnet": "198.19.3.0/24"}))
    assert finding.item.startswith("state ") and "persisted VtepMAC 02:00:00:00:00:42" in finding.reason


@pytest.mark.parametrize("change, expected", [
    (dict(mtu=1400), "MTU 1400, expected 1450 (underlay ul0 MTU 1500 - 50)"),
    (dict(up=False), "down"),
    (dict(addresses=()), "lacks address 198.19.3.0/32"),
    (dict(addresses=(IPv4Interface("198.19.3.0/32"), IPv4Interface("198.18.77.1/24"))),
     "extra addresses 198.18.77.1/24"),
    (dict(vxlan=VxlanAttrs(2, 8472, OWN.public_ip, "ul0", False)), "VNI 2, config says 1"),
    (dict(vxlan=VxlanAttrs(1, 4789, OWN.public_ip, "ul0", False)), "port 4789, config says 8472"),
    (dict(vxlan=VxlanAttrs(1, 8472, OWN.public_ip, "ul0", True)), "learning is on"),
    (dict(vxlan=VxlanAttrs(1, 8472, OWN.public_ip, "eth9", False)), "underlay eth9, expected ul0"),
])
def test_each_wrong_vtep_attribute_is_named(change, expected):
    failed = failures(healthy(vtep=vtep(**change)))
    assert expected in failed["device vxnet.1"].reason


def test_vtep_local_differing_from_the_lease_is_named():
    failed = failures(healthy(vtep=vtep(vxlan=VxlanAttrs(1, 8472, IPv4Address("198.18.1.9"), "ul0", False))))
    assert "local 198.18.1.9, the lease's PublicIP is 198.18.1.2" in failed["device vxnet.1"].reason


def test_the_config_mtu_wins_over_the_underlay():
    facts = healthy(config=dataclasses.replace(CONFIG, mtu=1400))
    assert "MTU 1450, expected 1400 (config MTU)" in failures(facts)["device vxnet.1"].reason


def test_a_missing_peer_route_is_named_with_the_commands_that_restore_it():
    entries = healthy().entries
    facts = healthy(entries=dataclasses.replace(entries, routes=entries.routes - {Route(PEER.subnet, PEER.gateway)}))
    finding = only_failure(facts)
    assert finding.item == "peer 198.19.7.0/24 at 198.18.2.2"
    assert finding.reason == "missing route 198.19.7.0/24 via 198.19.7.0"
    assert "ip route replace 198.19.7.0/24 via 198.19.7.0 dev vxnet.1 onlink proto 157" in finding.fix


def test_a_missing_fdb_entry_and_a_wrong_neighbour_are_named():
    entries = healthy().entries
    fdb = entries.fdb - {FdbEntry(OTHER.vtep_mac, OTHER.public_ip)}
    neighbours = entries.neighbours - {Neighbour(OTHER.gateway, OTHER.vtep_mac)} | {
        Neighbour(OTHER.gateway, "02:00:00:00:00:66")}
    finding = only_failure(healthy(entries=OverlayEntries(neighbours, fdb, entries.routes)))
    assert finding.item == "peer 198.19.9.0/24 at 198.18.3.2"
    assert "neighbour 198.19.9.0 has lladdr 02:00:00:00:00:66, lease says 02:00:00:00:00:03" in finding.reason
    assert "missing FDB entry 02:00:00:00:00:03 dst 198.18.3.2" in finding.reason


def test_entries_of_no_lease_are_named_as_stale():
    gone = Lease(IPv4Network("198.19.44.0/24"), IPv4Address("198.18.4.2"), "02:00:00:00:00:44")
    entries = desired_entries([PEER, OTHER, gone])
    finding = only_failure(healthy(entries=entries))
    assert finding.item == "stale entries"
    assert "route 198.19.44.0/24 via 198.19.44.0" in finding.reason
    assert "FDB entry 02:00:00:00:00:44 dst 198.18.4.2" in finding.reason


@pytest.mark.parametrize("bridge, expected", [
    (Unavailable("no device named cni0"), "no device named cni0"),
    (Link("cni0", "bridge", 1450, "0a:00:00:00:00:02", False, (IPv4Interface("198.19.3.1/24"),)), "down"),
    (Link("cni0", "bridge", 1450, "0a:00:00:00:00:02", True, ()), "lacks the gateway address 198.19.3.1/24"),
    (Link("cni0", "dummy", 1450, "0a:00:00:00:00:02", True, (IPv4Interface("198.19.3.1/24"),)), "not a bridge"),
])
def test_each_bridge_problem_is_named(bridge, expected):
    finding = only_failure(healthy(bridge=bridge))
    assert finding.item == "bridge cni0" and expected in finding.reason


@pytest.mark.parametrize("text, expected", [
    ("garbage\x00\n", "not a vxlan-net subnet file"),
    (SUBNET_FILE.replace("1450", "fourteen"), "VXLAN_NET_MTU is not an MTU (68..65535)"),
    (SUBNET_FILE.replace("VXLAN_NET_MTU=1450\n", ""), "VXLAN_NET_MTU missing"),
    (SUBNET_FILE.replace("=true", "=maybe"), "VXLAN_NET_IPMASQ is not true or false"),
])
def test_a_subnet_file_that_does_not_parse_is_named(text, expected):
    failed = failures(healthy(subnet_file=text))
    assert expected in failed["subnet file /run/vxlan-net/subnet.env"].reason
    assert "bridge cni0" not in failed  # the gateway then comes from the lease


@pytest.mark.parametrize("text, expected", [
    (SUBNET_FILE.replace("VXLAN_NET_MTU=1450", "VXLAN_NET_MTU=1500"), "VXLAN_NET_MTU 1500, expected 1450"),
    (SUBNET_FILE.replace("198.19.0.0/16", "198.19.0.0/17"), "VXLAN_NET_NETWORK 198.19.0.0/17, config says"),
])
def test_a_subnet_file_that_disagrees_with_config_is_named(text, expected):
    failed = failures(healthy(subnet_file=text))
    assert expected in failed["subnet file /run/vxlan-net/subnet.env"].reason


def test_a_subnet_file_for_another_subnet_is_named():
    text = SUBNET_FILE.replace("198.19.3.1/24", "198.19.5.1/24")
    failed = failures(healthy(subnet_file=text, bridge=dataclasses.replace(
        healthy().bridge, addresses=(IPv4Interface("198.19.5.1/24"),))))
    assert "VXLAN_NET_SUBNET 198.19.5.1/24, our lease is 198.19.3.0/24" in \
        failed["subnet file /run/vxlan-net/subnet.env"].reason


def test_a_missing_subnet_file_is_named():
    failed = failures(healthy(subnet_file=Unavailable("/run/vxlan-net/subnet.env does not exist")))
    assert "does not exist" in failed["subnet file /run/vxlan-net/subnet.env"].reason


def test_a_missing_nft_table_fails_firewall_and_masquerade():
    failed = failures(healthy(nft=Unavailable("the nftables table ip vxlan-net does not exist")))
    assert set(failed) == {"nftables table ip vxlan-net", "masquerade"}
    assert "VXLAN_NET_IPMASQ=true but the nftables table" in failed["masquerade"].reason


def test_a_table_without_masquerade_fails_only_when_the_subnet_file_asks_for_it():
    no_masq = nft_listing(ip_masq=False)
    assert only_failure(healthy(nft=no_masq)).item == "masquerade"
    assert not failures(healthy(nft=no_masq, subnet_file=SUBNET_FILE.replace("=true", "=false")))


def test_masquerade_without_the_pod_to_pod_exception_is_named():
    listing = nft_listing()
    listing["nftables"] = [i for i in listing["nftables"]
                           if not ("rule" in i and {"return": None} in i["rule"]["expr"]
                                   and len(i["rule"]["expr"]) == 3
                                   and i["rule"]["expr"][1]["match"]["right"]["prefix"]["len"] == 16)]
    assert "pod-to-pod traffic would be masqueraded" in only_failure(healthy(nft=listing)).reason


def test_masquerade_for_another_network_is_named():
    listing = nft_listing(network="198.19.0.0/17")
    assert only_failure(healthy(nft=listing)).item == "masquerade"


def test_a_peer_missing_from_the_ingress_filter_is_named():
    listing = nft_listing()
    for item in listing["nftables"]:
        if "set" in item:
            item["set"]["elem"] = [str(PEER.public_ip)]
    finding = only_failure(healthy(nft=listing))
    assert finding.item == "nftables table ip vxlan-net" and str(OTHER.public_ip) in finding.reason


def test_no_input_chain_means_the_ingress_filter_is_off_not_broken():
    listing = nft_listing()
    listing["nftables"] = [i for i in listing["nftables"] if "set" not in i and i.get("rule", {}).get("chain") != "input"]
    assert not failures(healthy(nft=listing))


def test_ip_forward_off_is_named():
    finding = only_failure(healthy(ip_forward=False))
    assert finding.item == "ip_forward" and "sysctl -w net.ipv4.ip_forward=1" in finding.fix


def test_invalid_lease_records_are_named():
    finding = only_failure(healthy(invalid_leases=("lease 198.19.8.0/24 is not valid JSON",)))
    assert finding.item == "lease records" and "198.19.8.0/24" in finding.reason


def test_render_prints_one_line_per_item_and_a_fix_under_failures():
    facts = healthy(ip_forward=False)
    text = doctor.render(doctor.run_checks(facts))
    lines = text.splitlines()
    assert lines[0].startswith("OK    config: Network 198.19.0.0/16")
    assert "FAIL  ip_forward: net.ipv4.ip_forward is 0: pod traffic is not routed" in lines
    assert lines[lines.index("FAIL  ip_forward: net.ipv4.ip_forward is 0: pod traffic is not routed") + 1] \
        .startswith("      fix: ")
    assert lines[-1] == "12 checks, 1 failed"
    doc = json.loads(doctor.render_json(doctor.run_checks(facts)))
    assert doc["ok"] is False and {"ok", "item", "reason", "fix"} == set(doc["findings"][0])


def test_the_nft_rules_doctor_expects_are_the_ones_the_agent_renders():
    """Guards the hand-built listing above: same rules as firewall.render_ruleset, in the same order."""
    text = render_ruleset(IPv4Network("198.19.0.0/16"), True, 8472, [PEER.public_ip, OTHER.public_ip])
    assert "ip saddr 198.19.0.0/16 ip daddr 198.19.0.0/16 return" in text
    assert text.index("ip daddr 198.19.0.0/16 return") < text.index("masquerade")
    assert "udp dport 8472 ip saddr != @vxlan_peers counter drop" in text
    assert f"elements = {{ {PEER.public_ip}, {OTHER.public_ip} }}" in text
    assert "hook forward" not in text


# --- the probe ---------------------------------------------------------------------


SOURCE, DEST = IPv4Address("198.19.3.1"), IPv4Address("198.19.7.2")


def plan():
    result = doctor.plan_probe(healthy(), DEST)
    assert not isinstance(result, Unavailable), result
    return result


def frame(outer_dst="198.18.2.2", vni=1, inner_src=SOURCE, inner_dst=DEST, icmp_type=8, outer_src="198.18.1.2"):
    return TunnelFrame(IPv4Address(outer_src), IPv4Address(outer_dst), vni,
                       IPv4Address(inner_src), IPv4Address(inner_dst), icmp_type)


def reply():
    return frame(outer_src="198.18.2.2", outer_dst="198.18.1.2", inner_src=DEST, inner_dst=SOURCE, icmp_type=0)


def test_probe_plan_picks_the_lease_holding_the_destination_and_the_bridge_address():
    p = plan()
    assert (p.peer, p.source, p.vni, p.port, p.underlay, p.local) == (PEER, SOURCE, 1, 8472, "ul0", OWN.public_ip)


@pytest.mark.parametrize("dest, expected", [
    ("198.18.2.2", "outside the pod network"),
    ("198.19.3.5", "this node's own subnet"),
    ("198.19.200.5", "no lease covers 198.19.200.5"),
    ("fd19:1::5", "outside the pod network 198.19.0.0/16 or fd19::/56"),  # IPv6, on the dual-stack node below
    ("fd19:0:0:3::5", "this node's own subnet fd19:0:0:3::/64"),
    ("fd19:0:0:44::5", "no lease covers fd19:0:0:44::5"),
])
def test_probe_plan_refuses_destinations_that_never_cross_the_tunnel(dest, expected):
    result = doctor.plan_probe(healthy() if "." in dest else dual_node(), ip_address(dest))
    assert isinstance(result, Unavailable) and expected in result.reason


def test_probe_passes_with_the_right_outer_destination_vni_and_inner_addresses():
    findings = doctor.check_probe(plan(), [frame(), reply()], replied=True)
    assert [f.ok for f in findings] == [True, True]
    assert "outer 198.18.1.2 -> 198.18.2.2 (node of 198.19.7.0/24), VNI 1, inner 198.19.3.1 -> 198.19.7.2" \
        == findings[0].reason


@pytest.mark.parametrize("bad, expected", [
    (frame(outer_dst="198.18.3.2"), "outer destination 198.18.3.2, but 198.19.7.0/24 is held by 198.18.2.2"),
    (frame(vni=7), "VNI 7, expected 1"),
    (frame(inner_src="198.18.1.2"), "inner source 198.18.1.2, expected 198.19.3.1"),
])
def test_probe_names_a_wrong_frame(bad, expected):
    findings = doctor.check_probe(plan(), [bad], replied=False)
    assert not findings[0].ok and expected in findings[0].reason


def test_probe_with_no_frame_or_no_reply_fails():
    assert "no VXLAN frame carrying an echo request to 198.19.7.2 left ul0" in \
        doctor.check_probe(plan(), [], replied=False)[0].reason
    findings = doctor.check_probe(plan(), [frame()], replied=False)
    assert findings[0].ok and not findings[1].ok and "no reply from 198.19.7.2" in findings[1].reason


def test_tunnel_frame_reads_a_hand_built_vxlan_packet():
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    packet = (Ether() / IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=40000, dport=8472)
              / VXLAN(vni=1, flags=0x08) / Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
              / IP(src=str(SOURCE), dst=str(DEST)) / ICMP(type=8))
    assert doctor.tunnel_frame(Ether(bytes(packet)), 8472) == frame()
    assert doctor.tunnel_frame(Ether(bytes(packet)), 4789) is None


def test_someone_elses_route_keeping_a_peer_route_out_is_named_with_the_command_that_deletes_it():
    entries = healthy().entries
    foreign = MainRoute(PEER.subnet, IPv4Address("198.18.1.254"), "ul0", protocol=4)
    facts = healthy(entries=dataclasses.replace(entries, routes=entries.routes - {Route(PEER.subnet, PEER.gateway)}),
                    main_routes=(foreign, MainRoute(OTHER.subnet, OTHER.gateway, "vxnet.1", protocol=157)))
    finding = only_failure(facts)
    assert finding.item == "peer 198.19.7.0/24 at 198.18.2.2"
    assert finding.reason == ("route 198.19.7.0/24 via 198.18.1.254 dev ul0 proto static is not vxlan-net's, "
                              "so the agent does not route 198.19.7.0/24 into the overlay")
    assert finding.fix.startswith("delete it: `ip route del 198.19.7.0/24 via 198.18.1.254 dev ul0 proto static`")


def test_a_foreign_route_beside_our_own_is_not_a_failure():
    shadowed = MainRoute(PEER.subnet, IPv4Address("198.18.1.254"), "ul0", protocol=4, metric=100)
    assert not failures(healthy(main_routes=(shadowed,)))


# --- direct routing (issue 10) ---

DIRECT_CONFIG = build_config("198.19.0.0/16", direct_routing=True)
# PEER's 198.18.2.2 is on a segment this node shares (connected on ul0); OTHER is behind the router.
SHARED_ROUTES = (MainRoute(IPv4Network("198.18.2.0/24"), None, "ul0", 2, 253),
                 MainRoute(IPv4Network("0.0.0.0/0"), IPv4Address("198.18.1.1"), "ul0", 3))


def direct_node(**changes) -> NodeFacts:
    entries = desired_entries([PEER, OTHER], lambda ip: ip == PEER.public_ip)
    return healthy(**{"config": DIRECT_CONFIG, "main_routes": SHARED_ROUTES, "entries": entries, **changes})


def test_a_direct_peer_with_leftover_tunnel_entries_is_flagged_as_stale():
    tunnel_leftovers = desired_entries([PEER])
    entries = direct_node().entries
    facts = direct_node(entries=dataclasses.replace(
        entries, neighbours=entries.neighbours | tunnel_leftovers.neighbours, fdb=entries.fdb | tunnel_leftovers.fdb))
    finding = only_failure(facts)
    assert finding.item == "stale entries"
    assert f"neighbour {PEER.gateway} lladdr {PEER.vtep_mac}" in finding.reason
    assert f"FDB entry {PEER.vtep_mac} dst {PEER.public_ip}" in finding.reason


def test_a_direct_peer_without_its_route_is_named_with_the_route_to_add():
    entries = direct_node().entries
    finding = only_failure(direct_node(entries=dataclasses.replace(entries, direct_routes=frozenset())))
    assert finding.item == "peer 198.19.7.0/24 at 198.18.2.2 (direct)"
    assert finding.reason == "missing direct route 198.19.7.0/24 via 198.18.2.2"
    assert "`ip route replace 198.19.7.0/24 via 198.18.2.2 dev ul0 proto 157`" in finding.fix


def test_a_peer_the_agent_routes_directly_but_the_node_reaches_through_a_router_is_named_as_tunnelled():
    # The connected route went away (a link flap) and the agent has not caught up: its tunnel entries are missing.
    finding = failures(direct_node(main_routes=SHARED_ROUTES[1:]))
    assert "missing route 198.19.7.0/24 via 198.19.7.0" in finding["peer 198.19.7.0/24 at 198.18.2.2 (tunnelled)"].reason
    assert "direct route 198.19.7.0/24 via 198.18.2.2" in finding["stale entries"].reason


def test_a_node_with_direct_and_tunnelled_peers_passes_and_says_which_is_which():
    findings = {f.item: f for f in doctor.run_checks(direct_node())}
    assert all(f.ok for f in findings.values()), [f for f in findings.values() if not f.ok]
    assert findings["peer 198.19.7.0/24 at 198.18.2.2 (direct)"].reason == (
        "route via 198.18.2.2 dev ul0 in place, no tunnel entries needed")
    assert "peer 198.19.9.0/24 at 198.18.3.2 (tunnelled)" in findings


def test_the_tunnel_probe_refuses_a_direct_peer_and_says_why():
    plan = doctor.plan_probe(direct_node(), IPv4Address("198.19.7.5"))
    assert isinstance(plan, Unavailable) and "direct peer (198.18.2.2)" in plan.reason
    assert isinstance(doctor.plan_probe(direct_node(), IPv4Address("198.19.9.5")), doctor.ProbePlan)


# --- IPv6 (issue 11) ---

from ipaddress import IPv6Address, IPv6Interface, IPv6Network  # noqa: E402

from vxlan_net.core.desired import desired_by_vtep  # noqa: E402

DUAL = build_config("198.19.0.0/16", ipv6_network="fd19::/56")
OWN6 = dataclasses.replace(OWN, ipv6_subnet=IPv6Network("fd19:0:0:3::/64"), public_ipv6=IPv6Address("fd18:0:0:1::2"),
                           vtep_mac_v6="02:00:00:00:06:01")
PEER6 = dataclasses.replace(PEER, ipv6_subnet=IPv6Network("fd19:0:0:7::/64"), public_ipv6=IPv6Address("fd18:0:0:2::2"),
                            vtep_mac_v6="02:00:00:00:06:02")
# A dual-stack node whose underlay has IPv4 only: both pod families reach it through vxnet.1.
OTHER4 = dataclasses.replace(OTHER, ipv6_subnet=IPv6Network("fd19:0:0:9::/64"))
DUAL_FILE = SUBNET_FILE.replace("VXLAN_NET_MTU=1450", "VXLAN_NET_IPV6_NETWORK=fd19::/56\n"
                                "VXLAN_NET_IPV6_SUBNET=fd19:0:0:3::1/64\nVXLAN_NET_MTU=1430")
VTEP_ADDRESSES = (IPv4Interface("198.19.3.0/32"), IPv6Interface("fd19:0:0:3::/128"))


def dual_node(**changes) -> NodeFacts:
    """Dual-stack pods over a dual-stack underlay: vxnet.1 (MTU 1450) and vxnet6.1 (MTU 1430)."""
    entries = desired_by_vtep([PEER6, OTHER4], own_underlays=(4, 6), own_families=(4, 6))
    facts = healthy(
        config=DUAL, leases={s.subnet: s for s in (OWN6, PEER6, OTHER4)},
        vtep=vtep(addresses=VTEP_ADDRESSES), entries=entries[4],
        vtep6_name="vxnet6.1",
        vtep6=Link("vxnet6.1", "vxlan", 1430, OWN6.vtep_mac_v6, True, VTEP_ADDRESSES,
                   VxlanAttrs(1, 8472, OWN6.public_ipv6, "ul0", False)),
        entries6=entries[6], ip6_forward=True, subnet_file=DUAL_FILE,
        nft6=nft_listing("fd19::/56", family="ip6", peers=(PEER6.public_ipv6,)),
        bridge=dataclasses.replace(healthy().bridge, addresses=(IPv4Interface("198.19.3.1/24"),
                                                                IPv6Interface("fd19:0:0:3::1/64"))),
        state={"VtepMAC": OWN.vtep_mac, "VtepMACv6": OWN6.vtep_mac_v6, "Subnet": "198.19.3.0/24",
               "IPv6Subnet": "fd19:0:0:3::/64"})
    return dataclasses.replace(facts, **changes)


def test_link_from_info_reads_an_ipv6_vtep_without_crashing():
    """`ip -d link` of vxnet6.<VNI>: the local address is IPv6 (IPv4Address() of it raised)."""
    link = Link.from_info({"name": "vxnet6.1", "kind": "vxlan", "mtu": 1430, "mac": "02:00:00:00:06:01", "up": True,
                           "addresses": ["198.19.3.0/32"], "ipv6_addresses": ["fd19:0:0:3::/128"],
                           "vxlan": {"vni": 1, "port": 8472, "local": "fd18:0:0:1::2", "underlay": "ul0",
                                     "learning": False}})
    assert link.vxlan.local == IPv6Address("fd18:0:0:1::2")
    assert link.addresses == VTEP_ADDRESSES


def test_a_healthy_dual_stack_node_passes_and_checks_both_vteps_and_ipv6_forwarding():
    findings = doctor.run_checks(dual_node())
    assert all(f.ok for f in findings), [f for f in findings if not f.ok]
    items = [f.item for f in findings]
    assert items == ["config", "own lease 198.19.3.0/24 + fd19:0:0:3::/64", "state /var/lib/vxlan-net/node.json",
                     "device vxnet.1", "device vxnet6.1", "peer 198.19.7.0/24 + fd19:0:0:7::/64 at 198.18.2.2, "
                     "fd18:0:0:2::2", "peer 198.19.9.0/24 + fd19:0:0:9::/64 at 198.18.3.2", "stale entries",
                     "bridge cni0", "subnet file /run/vxlan-net/subnet.env", "nftables table ip vxlan-net",
                     "masquerade", "nftables table ip6 vxlan-net", "ipv6 masquerade", "ip_forward",
                     "ipv6 forwarding"]
    reasons = {f.item: f.reason for f in findings}
    assert "IPv6Network fd19::/56, IPv6SubnetLen 64" in reasons["config"]
    assert "PublicIPv6 fd18:0:0:1::2, BackendV6Data.VtepMAC 02:00:00:00:06:01" in reasons[items[1]]
    assert "local fd18:0:0:1::2 on ul0" in reasons["device vxnet6.1"] and "MTU 1430" in reasons["device vxnet6.1"]
    assert "IPv6 subnet fd19:0:0:3::1/64" in reasons["subnet file /run/vxlan-net/subnet.env"]


def test_a_missing_ipv6_neighbour_is_named_on_the_vtep_that_must_hold_it_with_the_command():
    entries6 = dual_node().entries6
    gone = Neighbour(IPv6Address("fd19:0:0:7::"), PEER6.vtep_mac_v6)
    finding = only_failure(dual_node(entries6=dataclasses.replace(entries6, neighbours=entries6.neighbours - {gone})))
    assert finding.item.startswith("peer 198.19.7.0/24 + fd19:0:0:7::/64")
    assert finding.reason == "vxnet6.1: missing neighbour fd19:0:0:7:: lladdr 02:00:00:00:06:02"
    assert "ip neigh replace fd19:0:0:7:: lladdr 02:00:00:00:06:02 dev vxnet6.1 nud permanent" in finding.fix
    assert "ip route replace fd19:0:0:7::/64 via fd19:0:0:7:: dev vxnet6.1 onlink proto 157" in finding.fix


def test_ipv6_entries_on_the_wrong_vtep_are_missing_on_one_and_stale_on_the_other():
    """A dual-stack underlay carries IPv6 pods over vxnet6.1; the same entries on vxnet.1 are wrong."""
    facts = dual_node()
    moved = dataclasses.replace(facts.entries, neighbours=facts.entries.neighbours | facts.entries6.neighbours,
                                fdb=facts.entries.fdb | facts.entries6.fdb,
                                routes=facts.entries.routes | facts.entries6.routes)
    failed = failures(dual_node(entries=moved, entries6=OverlayEntries()))
    assert set(failed) == {"peer 198.19.7.0/24 + fd19:0:0:7::/64 at 198.18.2.2, fd18:0:0:2::2", "stale entries"}
    stale = failed["stale entries"].reason
    assert "vxnet.1: neighbour fd19:0:0:7:: lladdr 02:00:00:00:06:02" in stale
    assert "vxnet.1: FDB entry 02:00:00:00:06:02 dst fd18:0:0:2::2" in stale
    assert "vxnet.1: route fd19:0:0:7::/64 via fd19:0:0:7::" in stale


def test_a_dual_stack_peer_over_an_ipv4_only_underlay_has_its_ipv6_entries_on_vxnet():
    facts = dual_node()
    assert Neighbour(IPv6Address("fd19:0:0:9::"), OTHER4.vtep_mac) in facts.entries.neighbours
    assert FdbEntry(OTHER4.vtep_mac, OTHER4.public_ip) in facts.entries.fdb
    entries = dataclasses.replace(facts.entries, routes=facts.entries.routes - {
        Route(IPv6Network("fd19:0:0:9::/64"), IPv6Address("fd19:0:0:9::"))})
    finding = only_failure(dual_node(entries=entries))
    assert finding.reason == "vxnet.1: missing route fd19:0:0:9::/64 via fd19:0:0:9::"


@pytest.mark.parametrize("change, expected", [
    (dict(vxlan=VxlanAttrs(1, 8472, IPv6Address("fd18:0:0:1::9"), "ul0", False)),
     "local fd18:0:0:1::9, the lease's PublicIPv6 is fd18:0:0:1::2"),
    (dict(mtu=1450), "MTU 1450, expected 1430 (underlay ul0 MTU 1500 - 70)"),
    (dict(addresses=VTEP_ADDRESSES[:1]), "lacks address fd19:0:0:3::/128"),
    (dict(addresses=VTEP_ADDRESSES + (IPv6Interface("fd19:0:0:5::/128"),)), "extra addresses fd19:0:0:5::/128"),
    (dict(vxlan=VxlanAttrs(1, 8472, IPv6Address("fd18:0:0:1::2"), "ul0", True)), "learning is on"),
])
def test_each_wrong_attribute_of_the_ipv6_vtep_is_named(change, expected):
    failed = failures(dual_node(vtep6=dataclasses.replace(dual_node().vtep6, **change)))
    assert expected in failed["device vxnet6.1"].reason, failed


def test_an_ipv6_vtep_whose_mac_is_not_the_leases_backend_v6_data_is_named():
    facts = dual_node(vtep6=dataclasses.replace(dual_node().vtep6, mac="02:00:00:00:06:99"))
    failed = failures(facts)
    assert ("BackendV6Data.VtepMAC 02:00:00:00:06:01 but vxnet6.1 has MAC 02:00:00:00:06:99"
            in failed["own lease 198.19.3.0/24 + fd19:0:0:3::/64"].reason)
    assert "persisted VtepMACv6 02:00:00:00:06:01 but vxnet6.1 has 02:00:00:00:06:99" in \
        failed["state /var/lib/vxlan-net/node.json"].reason


def test_a_missing_ipv6_vtep_is_named_when_the_lease_has_a_public_ipv6():
    failed = failures(dual_node(vtep6=Unavailable("no device named vxnet6.1"),
                                entries6=Unavailable("no device named vxnet6.1")))
    assert failed["device vxnet6.1"].reason == "no device named vxnet6.1"
    assert failed["peer entries"].reason == "not checked: no device named vxnet6.1"


def test_a_public_ipv6_no_longer_on_this_node_names_the_ipv6_flag():
    finding = only_failure(dual_node(node_addresses=frozenset({OWN.public_ip})))
    assert "PublicIPv6 fd18:0:0:1::2 is not on this node any more" in finding.reason
    assert "--public-ipv6 <new>" in finding.fix


@pytest.mark.parametrize("text, expected", [
    (SUBNET_FILE.replace("1450", "1430"), "VXLAN_NET_IPV6_NETWORK missing, config says fd19::/56"),
    (DUAL_FILE.replace("fd19:0:0:3::1/64", "fd19:0:0:5::1/64"),
     "VXLAN_NET_IPV6_SUBNET fd19:0:0:5::1/64, our lease is fd19:0:0:3::/64"),
    (DUAL_FILE.replace("VXLAN_NET_IPV6_NETWORK=fd19::/56", "VXLAN_NET_IPV6_NETWORK=fd19::/60"),
     "VXLAN_NET_IPV6_NETWORK fd19::/60, config says fd19::/56"),
    (DUAL_FILE.replace("1430", "1450"), "VXLAN_NET_MTU 1450, expected 1430"),
])
def test_a_subnet_file_whose_ipv6_part_disagrees_is_named(text, expected):
    failed = failures(dual_node(subnet_file=text))
    assert expected in failed["subnet file /run/vxlan-net/subnet.env"].reason, failed


def test_a_bridge_without_its_ipv6_gateway_is_named():
    finding = only_failure(dual_node(bridge=healthy().bridge))
    assert finding.item == "bridge cni0" and "lacks the gateway address fd19:0:0:3::1/64" in finding.reason
    assert "`ip addr replace fd19:0:0:3::1/64 dev cni0`" in finding.fix


def test_ipv6_forwarding_off_is_named_only_when_the_network_has_ipv6():
    finding = only_failure(dual_node(ip6_forward=False))
    assert finding.item == "ipv6 forwarding" and "net.ipv6.conf.all.forwarding=1" in finding.fix
    assert "ipv6 forwarding" not in {f.item for f in doctor.run_checks(healthy(ip6_forward=False))}


V6_ONLY = build_config(None, ipv6_network="fd19::/56")
OWN_V6 = Lease(IPv6Network("fd19:0:0:3::/64"), None, None, public_ipv6=IPv6Address("fd18:0:0:1::2"),
               vtep_mac_v6="02:00:00:00:06:01")
PEER_V6 = Lease(IPv6Network("fd19:0:0:7::/64"), None, None, public_ipv6=IPv6Address("fd18:0:0:2::2"),
                vtep_mac_v6="02:00:00:00:06:02")


def v6_only_node(**changes) -> NodeFacts:
    """An IPv6-only network over an IPv6-only underlay: vxnet6.1 only, an IPv6-only subnet file, no table ip."""
    own_address = (IPv6Interface("fd19:0:0:3::/128"),)
    facts = healthy(
        config=V6_ONLY, leases={OWN_V6.subnet: OWN_V6, PEER_V6.subnet: PEER_V6},
        vtep=Unavailable("no device named vxnet.1"), entries=Unavailable("no device named vxnet.1"),
        vtep6_name="vxnet6.1",
        vtep6=Link("vxnet6.1", "vxlan", 1430, OWN_V6.vtep_mac_v6, True, own_address,
                   VxlanAttrs(1, 8472, OWN_V6.public_ipv6, "ul0", False)),
        entries6=desired_by_vtep([PEER_V6], own_underlays=(6,), own_families=(6,))[6],
        underlay=Link("ul0", "veth", 1500, "0a:00:00:00:00:01", True, (IPv6Interface("fd18:0:0:1::2/64"),)),
        nft6=nft_listing("fd19::/56", ip_masq=False, family="ip6", peers=(PEER_V6.public_ipv6,)),
        ip6_forward=True, subnet_file="VXLAN_NET_IPV6_NETWORK=fd19::/56\nVXLAN_NET_IPV6_SUBNET=fd19:0:0:3::1/64\n"
                                      "VXLAN_NET_MTU=1430\nVXLAN_NET_IPMASQ=false\n",
        nft=nft_listing(ip_masq=False),
        bridge=Link("cni0", "bridge", 1430, "0a:00:00:00:00:02", True, (IPv6Interface("fd19:0:0:3::1/64"),)),
        state={"VtepMACv6": OWN_V6.vtep_mac_v6, "IPv6Subnet": "fd19:0:0:3::/64"},
        node_addresses=frozenset({OWN_V6.public_ipv6}))
    return dataclasses.replace(facts, **changes)


def test_an_ipv6_only_node_checks_only_its_ipv6_vtep_and_passes():
    findings = {f.item: f for f in doctor.run_checks(v6_only_node())}
    assert all(f.ok for f in findings.values()), [f for f in findings.values() if not f.ok]
    assert "device vxnet.1" not in findings and "device vxnet6.1" in findings
    assert findings["peer fd19:0:0:7::/64 at fd18:0:0:2::2"].reason == (
        "route, neighbour fd19:0:0:7:: and FDB entry 02:00:00:00:06:02 in place")
    assert findings["subnet file /run/vxlan-net/subnet.env"].reason.startswith(
        "IPv6 network fd19::/56, IPv6 subnet fd19:0:0:3::1/64, MTU 1430")
    # The IPv4 ingress filter has nothing to say about peers without a PublicIP.
    assert "None" not in findings["nftables table ip vxlan-net"].reason
    assert findings["masquerade"].reason.startswith("no IPv4 pod network")
    assert findings["nftables table ip6 vxlan-net"].reason == "VXLAN accepted only from the 1 peer nodes' addresses"


def test_an_ipv6_only_node_with_an_ipv4_subnet_file_is_named():
    failed = failures(v6_only_node(subnet_file=SUBNET_FILE.replace("=true", "=false")))
    finding = failed["subnet file /run/vxlan-net/subnet.env"]
    assert "VXLAN_NET_NETWORK 198.19.0.0/16, config says the network has no IPv4" in finding.reason
    assert "VXLAN_NET_IPV6_NETWORK missing" in finding.reason


# --- the probe over IPv6 ---

SOURCE6, DEST6 = IPv6Address("fd19:0:0:3::1"), IPv6Address("fd19:0:0:7::2")


def test_probe_plan_over_ipv6_takes_the_ipv6_vtep_and_the_peers_public_ipv6():
    p = doctor.plan_probe(dual_node(), DEST6)
    assert not isinstance(p, Unavailable), p
    assert (p.peer, p.source, p.local, p.peer_address, p.peer_subnet) == (
        PEER6, SOURCE6, OWN6.public_ipv6, PEER6.public_ipv6, IPv6Network("fd19:0:0:7::/64"))
    # IPv6 pods of a node with an IPv4-only underlay ride vxnet.1: outer IPv4.
    p = doctor.plan_probe(dual_node(), IPv6Address("fd19:0:0:9::2"))
    assert (p.local, p.peer_address) == (OWN.public_ip, OTHER4.public_ip)


def frame6(outer_dst="fd18:0:0:2::2", inner_src=SOURCE6, inner_dst=DEST6, icmp_type=128, outer_src="fd18:0:0:1::2"):
    return TunnelFrame(IPv6Address(outer_src), IPv6Address(outer_dst), 1, IPv6Address(inner_src),
                       IPv6Address(inner_dst), icmp_type)


def test_probe_over_ipv6_checks_echo_types_128_and_129_and_the_outer_ipv6_destination():
    p = doctor.plan_probe(dual_node(), DEST6)
    reply = frame6(outer_src="fd18:0:0:2::2", outer_dst="fd18:0:0:1::2", inner_src=DEST6, inner_dst=SOURCE6,
                   icmp_type=129)
    assert [f.ok for f in doctor.check_probe(p, [frame6(), reply], replied=True)] == [True, True]
    assert not doctor.check_probe(p, [frame6(icmp_type=8)], replied=False)[0].ok  # an ICMP type, not ICMPv6
    wrong = doctor.check_probe(p, [frame6(outer_dst="fd18:0:0:3::2")], replied=False)[0]
    assert "outer destination fd18:0:0:3::2, but fd19:0:0:7::/64 is held by fd18:0:0:2::2" in wrong.reason


def test_tunnel_frame_reads_icmpv6_over_an_ipv6_underlay_and_over_an_ipv4_one():
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    inner = (Ether(src="02:00:00:00:06:01", dst="02:00:00:00:06:02") / IPv6(src=str(SOURCE6), dst=str(DEST6))
             / ICMPv6EchoRequest())
    over6 = (Ether() / IPv6(src="fd18:0:0:1::2", dst="fd18:0:0:2::2") / UDP(sport=40000, dport=8472)
             / VXLAN(vni=1, flags=0x08) / inner)
    assert doctor.tunnel_frame(Ether(bytes(over6)), 8472) == frame6()
    assert doctor.tunnel_frame(Ether(bytes(over6)), 4789) is None
    over4 = (Ether() / IP(src="198.18.1.2", dst="198.18.3.2") / UDP(sport=40000, dport=8472)
             / VXLAN(vni=1, flags=0x08) / inner)
    assert doctor.tunnel_frame(Ether(bytes(over4)), 8472) == TunnelFrame(
        IPv4Address("198.18.1.2"), IPv4Address("198.18.3.2"), 1, SOURCE6, DEST6, 128)


def test_ipv6_disabled_on_a_vtep_or_the_bridge_is_named_with_the_sysctl_when_the_network_has_ipv6():
    failed = failures(dual_node(ipv6_disabled=frozenset({"vxnet.1", "cni0"})))
    assert "IPv6 is disabled on it (net.ipv6.conf.vxnet/1.disable_ipv6=1)" in failed["device vxnet.1"].reason
    assert failed["device vxnet.1"].fix.startswith("`sysctl -w net.ipv6.conf.vxnet/1.disable_ipv6=0`")
    assert "net.ipv6.conf.cni0.disable_ipv6=1" in failed["bridge cni0"].reason
    assert set(failed) == {"device vxnet.1", "bridge cni0"}
    assert not failures(healthy(ipv6_disabled=frozenset({"vxnet.1", "cni0"})))  # an IPv4 network needs no IPv6


def test_the_ip6_table_is_checked_for_ipv6_peers_and_ipv6_masquerade():
    listing = nft_listing("fd19::/56", family="ip6", peers=())
    finding = only_failure(dual_node(nft6=listing))
    assert finding.item == "nftables table ip6 vxlan-net"
    assert finding.reason == "ingress filter drops VXLAN from peer nodes fd18:0:0:2::2"
    finding = only_failure(dual_node(nft6=nft_listing("fd19::/56", ip_masq=False, family="ip6",
                                                      peers=(PEER6.public_ipv6,))))
    assert finding.item == "ipv6 masquerade"
    assert finding.reason == "VXLAN_NET_IPMASQ=true but no `ip6 saddr fd19::/56 masquerade` rule"
    failed = failures(dual_node(nft6=Unavailable("the nftables table ip6 vxlan-net does not exist")))
    assert set(failed) == {"nftables table ip6 vxlan-net", "ipv6 masquerade"}


def test_the_ip6_rules_doctor_expects_are_the_ones_the_agent_renders():
    """Guards the hand-built ip6 listing: the same rules as firewall.render_ruleset's ip6 table, in order."""
    text = render_ruleset(IPv4Network("198.19.0.0/16"), True, 8472, [PEER6.public_ipv6],
                          ipv6_network=IPv6Network("fd19::/56"))
    ip6 = text[text.index("table ip6 vxlan-net {"):]
    assert ip6.index("ip6 saddr fd19::/56 ip6 daddr fd19::/56 return") < ip6.index("ip6 daddr ff00::/8 return") \
        < ip6.index("ip6 saddr fd19::/56 masquerade")
    assert "udp dport 8472 ip6 saddr != @vxlan_peers counter drop" in ip6
    assert f"elements = {{ {PEER6.public_ipv6} }}" in ip6


def test_a_dual_stack_peer_direct_over_both_families_has_a_direct_route_per_family():
    routes = SHARED_ROUTES + (MainRoute(IPv6Network("fd18:0:0:2::/64"), None, "ul0", 2, 253),)
    is_direct = lambda ip: ip in (PEER6.public_ip, PEER6.public_ipv6)  # noqa: E731
    entries = desired_by_vtep([PEER6, OTHER4], own_underlays=(4, 6), own_families=(4, 6), is_direct=is_direct)
    findings = {f.item: f for f in doctor.run_checks(dual_node(
        config=build_config("198.19.0.0/16", ipv6_network="fd19::/56", direct_routing=True), main_routes=routes,
        entries=entries[4], entries6=entries[6]))}
    assert all(f.ok for f in findings.values()), [f for f in findings.values() if not f.ok]
    assert findings["peer 198.19.7.0/24 + fd19:0:0:7::/64 at 198.18.2.2, fd18:0:0:2::2 (direct)"].reason == (
        "route via 198.18.2.2, fd18:0:0:2::2 dev ul0 in place, no tunnel entries needed")
    # Only IPv4 reaches it directly: the IPv6 pods go through vxnet6.1.
    mixed = desired_by_vtep([PEER6, OTHER4], own_underlays=(4, 6), own_families=(4, 6),
                            is_direct=lambda ip: ip == PEER6.public_ip)
    findings = {f.item: f for f in doctor.run_checks(dual_node(
        config=build_config("198.19.0.0/16", ipv6_network="fd19::/56", direct_routing=True),
        main_routes=SHARED_ROUTES, entries=mixed[4], entries6=mixed[6]))}
    assert all(f.ok for f in findings.values()), [f for f in findings.values() if not f.ok]
    assert findings["peer 198.19.7.0/24 + fd19:0:0:7::/64 at 198.18.2.2, fd18:0:0:2::2 (4:direct 6:tunnelled)"] \
        .reason == ("route, neighbour fd19:0:0:7:: and FDB entry 02:00:00:00:06:02 on vxnet6.1; "
                    "direct route 198.19.7.0/24 in place")


def test_etcd_unavailable_on_an_ipv6_only_node_still_checks_its_ipv6_data_plane_from_the_subnet_file():
    down = Unavailable("etcd unavailable: connection refused")
    findings = {f.item: f for f in doctor.run_checks(v6_only_node(config=down, leases=Unavailable("not read")))}
    assert {item for item, f in findings.items() if not f.ok} == {"config", "own lease", "peer entries"}
    assert "device vxnet.1" not in findings and "local fd18:0:0:1::2" in findings["device vxnet6.1"].reason
    assert findings["masquerade"].reason.startswith("no IPv4 pod network")
    assert {"ipv6 masquerade", "nftables table ip6 vxlan-net", "ipv6 forwarding"} <= set(findings)
