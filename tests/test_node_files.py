"""Subnet file and state dir (pure file I/O in a temp dir, no root)."""

from ipaddress import IPv4Network

from cni import subnet_file
from vxlan_net.doors.state import NodeState, remembered_subnet


def test_subnet_file_has_the_cni_contract(tmp_path):
    path = tmp_path / "run" / "subnet.env"
    subnet_file.write(path, "198.19.0.0/16", "198.19.3.0/24", 1450, True)
    assert path.read_text() == (
        "VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=198.19.3.1/24\nVXLAN_NET_MTU=1450\nVXLAN_NET_IPMASQ=true\n"
    )
    assert remembered_subnet(path) == IPv4Network("198.19.3.0/24")
    assert [p.name for p in path.parent.iterdir()] == ["subnet.env"]  # no temp file left
    node = subnet_file.parse(path.read_text())
    assert (node.network, node.network_prefix, node.gateway, node.prefix, node.mtu, node.ipmasq) == (
        0xC6130000, 16, 0xC6130301, 24, 1450, True)


def test_vtep_mac_is_created_once_and_kept(tmp_path):
    first = NodeState(tmp_path).vtep_mac()
    assert NodeState(tmp_path).vtep_mac() == first
    assert int(first[:2], 16) & 0b11 == 0b10  # locally administered unicast
    NodeState(tmp_path).remember_subnet(IPv4Network("198.19.4.0/24"))
    assert NodeState(tmp_path).last_subnet() == IPv4Network("198.19.4.0/24")
    assert NodeState(tmp_path).vtep_mac() == first


def test_corrupt_state_file_gets_a_fresh_mac_instead_of_a_crash(tmp_path):
    (tmp_path / "node.json").write_text("{garbage")
    assert len(NodeState(tmp_path).vtep_mac()) == 17
    assert remembered_subnet(tmp_path / "missing.env") is None


def test_the_subnet_file_remembers_each_family_and_the_state_dir_both_subnets(tmp_path):
    from ipaddress import IPv6Network

    from cni.subnet_file import write
    from vxlan_net.doors.state import remembered_subnet

    path = tmp_path / "subnet.env"
    write(path, "198.19.0.0/16", "198.19.4.0/24", 1430, False, ipv6_network="fd19::/56", ipv6_subnet="fd19:0:0:4::/64")
    assert remembered_subnet(path) == IPv4Network("198.19.4.0/24")
    assert remembered_subnet(path, 6) == IPv6Network("fd19:0:0:4::/64")
    write(path, None, None, 1430, False, ipv6_network="fd19::/56", ipv6_subnet="fd19:0:0:5::/64")
    assert remembered_subnet(path) is None and remembered_subnet(path, 6) == IPv6Network("fd19:0:0:5::/64")
    path.write_text("VXLAN_NET_IPV6_NETWORK=fd19::/56\nVXLAN_NET_IPV6_SUBNET=nonsense\n")
    assert remembered_subnet(path, 6) is None  # a damaged file remembers nothing
    state = NodeState(tmp_path)
    state.remember_subnet(IPv4Network("198.19.4.0/24"), IPv6Network("fd19:0:0:4::/64"))
    assert state.last_subnet() == IPv4Network("198.19.4.0/24") and state.last_subnet(6) == IPv6Network("fd19:0:0:4::/64")
    assert state.vtep_mac(6) != state.vtep_mac(4) and state.vtep_mac(6) == NodeState(tmp_path).vtep_mac(6)


def test_hostile_ipv6_fields_in_the_state_file_are_ignored_not_trusted(tmp_path):
    from ipaddress import IPv6Network

    state = NodeState(tmp_path)
    (tmp_path / "node.json").write_text(
        '{"VtepMAC": "0a:00:00:00:00:01", "VtepMACv6": "ff:ff:ff:ff:ff:ff", "IPv6Subnet": "198.19.4.0/24",'
        ' "Subnet": "fd19:0:0:4::/64"}')
    assert state.last_subnet(6) is None and state.last_subnet(4) is None  # each family's field, its family only
    mac6 = state.vtep_mac(6)
    assert mac6 not in ("ff:ff:ff:ff:ff:ff", "0a:00:00:00:00:01") and state.vtep_mac(6) == mac6  # fresh, then kept
    assert state.vtep_mac(4) == "0a:00:00:00:00:01"
    (tmp_path / "node.json").write_text('{"IPv6Subnet": ["fd19:0:0:4::/64"], "VtepMACv6": 7}')
    assert state.last_subnet(6) is None and state.vtep_mac(6) != 7
    (tmp_path / "node.json").write_text('{"IPv6Subnet": "fd19:0:0:4::/64"}')
    assert state.last_subnet(6) == IPv6Network("fd19:0:0:4::/64")
