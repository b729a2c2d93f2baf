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
