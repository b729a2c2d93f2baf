"""Which networks this node's underlay occupies, from its addresses and main-table routes (pure)."""

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from vxlan_net.core.config import build_config
from vxlan_net.core.desired import MainRoute
from vxlan_net.core.underlay import NodeAddress, node_underlay

CONFIG = build_config("198.19.0.0/16")
VTEP = "vxnet.1"
KERNEL, STATIC, OURS = 2, 4, 157
LINK = 253


def address(device: str, cidr: str, kind: str | None = None) -> NodeAddress:
    return NodeAddress(device, kind, IPv4Interface(cidr))


def route(dst: str, device: str, gateway: str | None = None, protocol: int = KERNEL, scope: int = 0) -> MainRoute:
    return MainRoute(IPv4Network(dst), IPv4Address(gateway) if gateway else None, device, protocol, scope)


def test_addresses_connected_routes_and_gateways_of_the_underlay_are_claimed():
    claims = node_underlay(
        CONFIG,
        [address("lo", "127.0.0.1/8"), address("eth0", "198.18.0.5/24", "veth"),
         address("eth0", "198.19.5.1/24", "veth"), address("br-ul", "198.18.9.2/24", "bridge")],
        [route("0.0.0.0/0", "eth0", gateway="198.18.0.1", protocol=STATIC),
         route("198.18.0.0/24", "eth0", scope=LINK), route("198.19.5.0/24", "eth0", scope=LINK),
         route("198.19.60.0/22", "eth1", protocol=STATIC, scope=LINK),
         route("198.19.80.0/24", "eth0", gateway="198.18.0.77", protocol=STATIC)],
        vteps=VTEP).networks()
    assert claims == {
        IPv4Network("127.0.0.0/8"): "address 127.0.0.1/8 on lo",
        IPv4Network("198.18.0.0/24"): "address 198.18.0.5/24 on eth0",
        IPv4Network("198.19.5.0/24"): "address 198.19.5.1/24 on eth0",
        IPv4Network("198.18.9.0/24"): "address 198.18.9.2/24 on br-ul",  # a bridge that is no pod bridge
        IPv4Network("198.18.0.1/32"): "gateway 198.18.0.1 of route 0.0.0.0/0 via 198.18.0.1 dev eth0 proto static",
        IPv4Network("198.19.60.0/22"): "connected route 198.19.60.0/22 dev eth1 proto static scope link",
        IPv4Network("198.18.0.77/32"):
            "gateway 198.18.0.77 of route 198.19.80.0/24 via 198.18.0.77 dev eth0 proto static",
    }


def test_our_own_vtep_pod_bridges_and_peer_routes_do_not_block_our_subnet():
    claims = node_underlay(
        CONFIG,
        [address(VTEP, "198.19.3.0/32", "vxlan"), address("cni0", "198.19.3.1/24", "bridge"),
         address("cni-old", "198.19.4.1/24", "bridge"), address("vxnet.7", "198.19.4.0/32", "vxlan"),
         address("eth0", "198.18.0.5/24")],
        [route("198.19.3.0/24", "cni0", scope=LINK), route("198.19.7.0/24", VTEP, gateway="198.19.7.0",
                                                          protocol=OURS),
         route("198.18.0.0/24", "eth0", scope=LINK)],
        vteps=VTEP).networks()
    assert claims == {IPv4Network("198.18.0.0/24"): "address 198.18.0.5/24 on eth0"}


def test_a_bridge_is_only_a_pod_bridge_when_it_holds_nothing_but_pod_gateway_addresses():
    not_pods = [address("br0", "198.19.3.1/24", "bridge"), address("br0", "198.18.0.5/24", "bridge"),  # also underlay
                address("br1", "198.19.8.7/24", "bridge"),  # not the first host
                address("br2", "198.19.3.1/23", "bridge"),  # not a SubnetLen subnet
                address("dummy0", "198.19.6.1/24", "dummy"),  # not a bridge
                address("vx9", "198.19.9.1/32", "vxlan"),  # not a subnet's network address
                address("vx10", "198.19.10.0/24", "vxlan")]  # not /32
    claims = node_underlay(CONFIG, not_pods, [], vteps=VTEP).networks()
    assert set(claims.values()) == {f"address {a.interface} on {a.device}" for a in not_pods}


def test_a_default_route_without_gateway_claims_nothing_but_its_device_stays_underlay():
    claims = node_underlay(CONFIG, [], [route("0.0.0.0/0", "ppp0", protocol=STATIC, scope=LINK)], vteps=VTEP).networks()
    assert claims == {}


def test_an_etcd_endpoint_inside_the_pod_network_is_claimed_so_no_node_leases_around_it():
    claims = node_underlay(CONFIG, [], [], {IPv4Address("198.19.250.10"): "http://198.19.250.10:2379"}, VTEP).networks()
    assert claims == {IPv4Network("198.19.250.10/32"): "etcd endpoint http://198.19.250.10:2379"}


def test_what_a_peer_subnet_must_not_capture_leaves_both_our_vteps_out_and_the_nodes_own_words_win():
    underlay = node_underlay(
        CONFIG,
        [address("vxnet6.1", "198.18.7.7/24", "vxlan"),  # ours by its name alone: the IPv6 VTEP of VNI 1
         address("cni0", "198.19.3.1/24", "bridge"), address("eth0", "198.18.0.5/24", "veth")],
        [route("0.0.0.0/0", "eth0", gateway="198.18.0.1", protocol=STATIC),
         route("198.19.7.0/24", "vxnet.1", gateway="198.19.7.0", protocol=OURS)],
        {IPv4Address("198.18.0.5"): "http://198.18.0.5:2379", IPv4Address("198.18.0.9"): "http://198.18.0.9:2379"})
    assert underlay.protected() == {
        IPv4Address("198.18.0.9"): "etcd endpoint http://198.18.0.9:2379",
        IPv4Address("198.18.0.5"): "this node's address on eth0",
        IPv4Address("198.18.0.1"): "this node's gateway",
    }
    assert set(underlay.networks()) == {IPv4Network("198.18.0.9/32"), IPv4Network("198.18.0.5/32"),
                                        IPv4Network("198.18.0.0/24"), IPv4Network("198.18.0.1/32")}
