"""`vxlan-net` as a user runs it, against a real etcd on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from ipaddress import IPv4Address
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from integration.etcd_server import ETCDCTL_EXE, EtcdServer  # noqa: E402

EXE = str(Path(sys.executable).with_name("vxlan-net"))


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.fixture
def prefix():
    return f"/cli-{uuid.uuid4().hex[:8]}"


def vxlan_net(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def etcd_get(etcd: EtcdServer, key: str) -> str:
    out = subprocess.run([ETCDCTL_EXE, "--endpoints", etcd.client_url, "get", key, "--print-value-only"],
                         capture_output=True, text=True, timeout=10, env={**os.environ, "ETCDCTL_API": "3"})
    return out.stdout.strip()


def test_config_set_writes_flannel_json_and_get_prints_it(etcd, prefix):
    result = vxlan_net("config", "set", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix,
                       "--network", "198.19.0.0/16", "--subnet-len", "26", "--vni", "7", "--port", "4789")
    assert result.returncode == 0, result.stderr
    stored = json.loads(etcd_get(etcd, f"{prefix}/config"))
    assert stored == {"Network": "198.19.0.0/16", "SubnetLen": 26, "SubnetMin": "198.19.0.64",
                      "SubnetMax": "198.19.255.192", "Backend": {"Type": "vxlan", "VNI": 7, "Port": 4789}}
    shown = vxlan_net("config", "get", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix)
    assert json.loads(shown.stdout) == stored


def test_config_set_direct_routing_writes_flannels_key(etcd, prefix):
    result = vxlan_net("config", "set", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix,
                       "--network", "198.19.0.0/16", "--direct-routing")
    assert result.returncode == 0, result.stderr
    assert json.loads(etcd_get(etcd, f"{prefix}/config"))["Backend"]["DirectRouting"] is True
    shown = vxlan_net("config", "get", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix)
    assert json.loads(shown.stdout)["Backend"]["DirectRouting"] is True


@pytest.mark.parametrize("flags", [
    ["--network", "198.19.0.1/16"],
    ["--network", "198.19.0.0/16", "--subnet-len", "31"],
    ["--network", "198.19.0.0/16", "--subnet-min", "198.19.0.128"],
    ["--network", "198.19.0.0/16", "--subnet-max", "198.20.0.0"],
    ["--network", "198.19.0.0/16", "--vni", "16777216"],
    ["--network", "198.19.0.0/16", "--vni", "0"],
])
def test_invalid_config_exits_2_with_one_line_and_writes_nothing(etcd, prefix, flags):
    result = vxlan_net("config", "set", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix, *flags)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr
    assert "Traceback" not in result.stderr
    assert etcd_get(etcd, f"{prefix}/config") == ""


@pytest.mark.parametrize("network, reason", [
    ("0.0.0.0/0", 'cannot be a pod network: it overlaps 0.0.0.0/8 ("this network")'),
    ("127.0.0.0/8", "cannot be a pod network: it overlaps loopback 127.0.0.0/8"),
    ("169.254.0.0/16", "cannot be a pod network: it overlaps link-local 169.254.0.0/16"),
    ("224.0.0.0/4", "cannot be a pod network: it overlaps multicast 224.0.0.0/4"),
    ("240.0.0.0/4", "cannot be a pod network: it overlaps reserved 240.0.0.0/4"),
    ("198.19.0.0/29", "is too small: it must hold at least two /30 subnets"),
])
def test_a_network_that_cannot_carry_pods_exits_2_naming_why(etcd, prefix, network, reason):
    result = vxlan_net("config", "set", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix,
                       "--network", network)
    assert result.returncode == 2
    assert result.stderr.startswith(f"vxlan-net: error: Network {network} {reason}")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert etcd_get(etcd, f"{prefix}/config") == ""


def test_flags_come_from_the_environment_too(etcd, prefix):
    env = {"VXLAN_NET_ETCD_ENDPOINTS": etcd.client_url, "VXLAN_NET_ETCD_PREFIX": prefix,
           "VXLAN_NET_NETWORK": "198.19.0.0/20"}
    assert vxlan_net("config", "set", env=env).returncode == 0
    assert json.loads(etcd_get(etcd, f"{prefix}/config"))["SubnetLen"] == 24


def test_status_prints_the_lease_table_and_flags_garbage(etcd, prefix):
    vxlan_net("config", "set", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix,
              "--network", "198.19.0.0/16")
    value = json.dumps({"PublicIP": "198.18.4.2", "BackendType": "vxlan",
                        "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:04"}})
    subprocess.run([ETCDCTL_EXE, "--endpoints", etcd.client_url, "put", f"{prefix}/subnets/198.19.4.0-24", value],
                   check=True, capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10)
    thief = value.replace("198.18.4.2", "198.18.6.2")  # the same VtepMAC, written later
    for name, raw in (("198.19.5.0-24", "{"), ("198.19.6.0-24", thief), ("198.19.7.0-24", "[" * 3000),
                      ("198.19.8.0-24", "x" * (1 << 20))):
        subprocess.run([ETCDCTL_EXE, "--endpoints", etcd.client_url, "put", f"{prefix}/subnets/{name}"], input=raw,
                       text=True, check=True, capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10)
    result = vxlan_net("status", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SUBNET", "PUBLIC", "IP", "VTEP", "MAC", "EXPIRES", "IN"]
    assert lines[1].split() == ["198.19.4.0/24", "198.18.4.2", "0a:00:00:00:00:04", "never"]
    skipped = {line.split("'")[1]: line for line in lines if line.startswith("record skipped: ")}
    assert "not valid JSON" in skipped["198.19.5.0-24"] and "not valid JSON" in skipped["198.19.7.0-24"]
    assert "created first" in skipped["198.19.6.0-24"] and "more than the 4096" in skipped["198.19.8.0-24"]
    assert "direct routing: off" in lines
    assert all(len(line) < 250 for line in lines)


def test_unreachable_etcd_is_a_clear_error_not_a_traceback():
    result = vxlan_net("config", "get", "--etcd-endpoints", "http://127.0.0.1:9")
    assert result.returncode == 1 and "etcd unavailable" in result.stderr and "Traceback" not in result.stderr


def test_bad_agent_flags_exit_2_before_touching_anything():
    for flags in (["--public-ip", "nope"], ["--subnet-lease-ttl", "1"], ["--resync-interval", "0"],
                  ["--cni-bridge", "a/b"], ["--cni-bridge", "x" * 16], ["--public-ip", "127.0.0.1"],
                  ["--public-ipv6", "198.18.1.2"], ["--public-ipv6", "fe80::1"], ["--public-ipv6", "ff02::1"]):
        result = vxlan_net("agent", "--etcd-endpoints", "http://127.0.0.1:9", *flags)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert flags[0] in result.stderr, result.stderr
    assert vxlan_net("agent", env={"VXLAN_NET_IP_MASQ": "maybe"}).returncode == 2


def test_numeric_flags_from_the_environment_are_validated():
    bad = vxlan_net("agent", env={"VXLAN_NET_RESYNC_INTERVAL": "soon"})
    assert bad.returncode == 2 and "VXLAN_NET_RESYNC_INTERVAL='soon' is not a number" in bad.stderr
    bad = vxlan_net("config", "set", env={"VXLAN_NET_VNI": "1.5"})
    assert bad.returncode == 2 and "is not an integer" in bad.stderr


def test_status_own_address_line_names_a_renumbered_node():
    """Issue 13: status shows the address the VTEP sends from, and says when lease or node disagree."""
    from vxlan_net.tools.status import own_address_line

    old, new = IPv4Address("198.18.1.2"), IPv4Address("198.18.1.7")
    assert own_address_line(old, old, "ul0", {new}) == (
        "this node's public IP: 198.18.1.2 on ul0 (198.18.1.2 is not on this node any more: run `vxlan-net doctor`)")
    assert own_address_line(old, new, "ul0", {new}) == (
        "this node's public IP: 198.18.1.7 on ul0 (its lease says 198.18.1.2: run `vxlan-net doctor`)")
    assert own_address_line(new, new, "ul0", {new}) == "this node's public IP: 198.18.1.7 on ul0"


# --- IPv6 (issue 11) ---


@pytest.mark.parametrize("flags, reason", [
    (["--no-ipv4"], "--no-ipv4 needs --ipv6-network"),
    (["--no-ipv4", "--network", "198.19.0.0/16", "--ipv6-network", "fd19::/56"],
     "--no-ipv4 and --network contradict each other"),
    (["--ipv6-network", "fd19::/56"], "--network is required (or --no-ipv4 with --ipv6-network"),
    (["--network", "198.19.0.0/16", "--ipv6-network", "fd19::1/56"], "has host bits set"),
    (["--network", "198.19.0.0/16", "--ipv6-network", "198.19.0.0/16"], "is not a valid IPv6 CIDR"),
    (["--network", "198.19.0.0/16", "--ipv6-network", "fd19::/56", "--ipv6-subnet-len", "121"],
     "IPv6SubnetLen 121 must be longer than the network's /56 and at most /120"),
    (["--network", "198.19.0.0/16", "--ipv6-network", "fd19::/56", "--ipv6-subnet-len", "56"],
     "IPv6SubnetLen 56 must be longer"),
    (["--network", "198.19.0.0/16", "--ipv6-network", "fd19::/56", "--ipv6-subnet-min", "fd19:0:1::"],
     "IPv6SubnetMin fd19:0:1:: is outside the network fd19::/56"),
    (["--network", "198.19.0.0/16", "--ipv6-network", "fd19::/56", "--ipv6-subnet-min", "fd19:0:0:5::1"],
     "IPv6SubnetMin fd19:0:0:5::1 is not aligned to a /64 subnet"),
    (["--network", "198.19.0.0/16", "--ipv6-network", "fd19::/56", "--ipv6-subnet-min", "fd19:0:0:9::",
      "--ipv6-subnet-max", "fd19:0:0:5::"], "IPv6SubnetMin fd19:0:0:9:: is above IPv6SubnetMax fd19:0:0:5::"),
    (["--network", "198.19.0.0/16", "--ipv6-subnet-len", "64"], "IPv6SubnetLen, IPv6SubnetMin and IPv6SubnetMax need"),
    (["--no-ipv4", "--ipv6-network", "fd19::/56", "--subnet-len", "24"], "SubnetLen, SubnetMin and SubnetMax need"),
    (["--no-ipv4", "--ipv6-network", "fe80::/64"], "overlaps link-local fe80::/10"),
    (["--no-ipv4", "--ipv6-network", "ff02::/64"], "overlaps multicast ff00::/8"),
    (["--no-ipv4", "--ipv6-network", "::/0"], "overlaps reserved ::/8"),
    (["--no-ipv4", "--ipv6-network", "::ffff:0:0/96"], "overlaps reserved ::/8"),
    (["--no-ipv4", "--ipv6-network", "fd19::/120"], "IPv6Network fd19::/120 is too small"),
])
def test_invalid_ipv6_config_exits_2_with_one_line_and_writes_nothing(etcd, prefix, flags, reason):
    result = vxlan_net("config", "set", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix, *flags)
    assert result.returncode == 2, result
    assert result.stderr.startswith("vxlan-net: error: ") and reason in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert etcd_get(etcd, f"{prefix}/config") == ""


def test_no_ipv4_from_the_environment_must_be_a_boolean(etcd, prefix):
    result = vxlan_net("config", "set", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix,
                       "--ipv6-network", "fd19::/56", env={"VXLAN_NET_NO_IPV4": "perhaps"})
    assert result.returncode == 2 and "VXLAN_NET_NO_IPV4='perhaps' is not a boolean" in result.stderr
    assert etcd_get(etcd, f"{prefix}/config") == ""


def test_config_set_dual_stack_writes_flannels_ipv6_keys_and_get_prints_them(etcd, prefix):
    result = vxlan_net("config", "set", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix,
                       "--network", "198.19.0.0/16", "--ipv6-network", "fd19::/56", "--ipv6-subnet-min", "fd19:0:0:4::",
                       "--ipv6-subnet-max", "fd19:0:0:f0::")
    assert result.returncode == 0, result.stderr
    stored = json.loads(etcd_get(etcd, f"{prefix}/config"))
    assert stored == {"Network": "198.19.0.0/16", "SubnetLen": 24, "SubnetMin": "198.19.1.0",
                      "SubnetMax": "198.19.255.0", "EnableIPv6": True, "IPv6Network": "fd19::/56",
                      "IPv6SubnetLen": 64, "IPv6SubnetMin": "fd19:0:0:4::", "IPv6SubnetMax": "fd19:0:0:f0::",
                      "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}
    shown = vxlan_net("config", "get", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix)
    assert json.loads(shown.stdout) == stored


def test_config_set_no_ipv4_writes_an_ipv6_only_network(etcd, prefix):
    env = {"VXLAN_NET_ETCD_ENDPOINTS": etcd.client_url, "VXLAN_NET_ETCD_PREFIX": prefix,
           "VXLAN_NET_IPV6_NETWORK": "fd19::/60", "VXLAN_NET_IPV6_SUBNET_LEN": "72"}
    result = vxlan_net("config", "set", "--no-ipv4", env=env)
    assert result.returncode == 0, result.stderr
    stored = json.loads(etcd_get(etcd, f"{prefix}/config"))
    assert stored == {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd19::/60", "IPv6SubnetLen": 72,
                      "IPv6SubnetMin": "fd19::100:0:0:0", "IPv6SubnetMax": "fd19:0:0:f:ff00::",
                      "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}
    assert vxlan_net("config", "set", env={**env, "VXLAN_NET_NO_IPV4": "true"}).returncode == 0
    assert "Network" not in json.loads(etcd_get(etcd, f"{prefix}/config"))


def put_record(etcd: EtcdServer, key: str, value: str) -> None:
    subprocess.run([ETCDCTL_EXE, "--endpoints", etcd.client_url, "put", key], input=value, text=True, check=True,
                   capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10)


def test_status_shows_both_families_of_each_lease_and_skips_garbage_ipv6_records(etcd, prefix):
    assert vxlan_net("config", "set", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix,
                     "--network", "198.19.0.0/16", "--ipv6-network", "fd19::/56").returncode == 0
    dual = json.dumps({"BackendType": "vxlan", "PublicIP": "198.18.4.2", "PublicIPv6": "fd18:0:0:4::2",
                       "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:04"},
                       "BackendV6Data": {"VNI": 1, "VtepMAC": "0a:00:00:00:06:04"}})
    v4_only = json.dumps({"BackendType": "vxlan", "PublicIP": "198.18.5.2",
                          "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:05"}})
    over_v6 = json.dumps({"BackendType": "vxlan", "PublicIPv6": "fd18:0:0:6::2",
                          "BackendV6Data": {"VNI": 1, "VtepMAC": "0a:00:00:00:06:06"}})
    records = {"198.19.4.0-24&fd19:0:0:4::-64": dual,
               "198.19.5.0-24": v4_only,  # a node not yet restarted after IPv6 was added
               "198.19.6.0-24&fd19:0:0:6::-64": over_v6,  # dual-stack pods over an IPv6-only underlay
               "198.19.7.0-24&fd19:0:0:7::-64": dual.replace("fd18:0:0:4::2", "fd19:0:0:9::2"),  # in the pod network
               "198.19.8.0-24&fd19:0:1:8::-64": dual,  # IPv6 subnet outside the network
               "fd19:0:0:9::-64": over_v6}  # an IPv6-only key on a dual-stack network
    for name, value in records.items():
        put_record(etcd, f"{prefix}/subnets/{name}", value)
    result = vxlan_net("status", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SUBNET", "IPV6", "SUBNET", "PUBLIC", "IP", "PUBLIC", "IPV6", "VTEP", "MAC", "VTEP",
                                "MAC", "V6", "EXPIRES", "IN"]
    assert lines[1].split() == ["198.19.4.0/24", "fd19:0:0:4::/64", "198.18.4.2", "fd18:0:0:4::2",
                                "0a:00:00:00:00:04", "0a:00:00:00:06:04", "never"]
    assert lines[2].split() == ["198.19.5.0/24", "-", "198.18.5.2", "-", "0a:00:00:00:00:05", "-", "never"]
    assert lines[3].split() == ["198.19.6.0/24", "fd19:0:0:6::/64", "-", "fd18:0:0:6::2", "-", "0a:00:00:00:06:06",
                                "never"]
    skipped = {line.split("'")[1]: line for line in lines if line.startswith("record skipped: ")}
    assert set(skipped) == {"198.19.7.0-24&fd19:0:0:7::-64", "198.19.8.0-24&fd19:0:1:8::-64", "fd19:0:0:9::-64"}
    assert "inside the pod network fd19::/56" in skipped["198.19.7.0-24&fd19:0:0:7::-64"]
    assert "is not a /64 inside fd19::/56" in skipped["198.19.8.0-24&fd19:0:1:8::-64"]
    assert "has no IPv4 subnet" in skipped["fd19:0:0:9::-64"]
    assert "this node: no vxnet.1 or vxnet6.1 device here (not a node, or the agent has not started)" in lines


def test_status_of_an_ipv6_only_network_keys_leases_by_their_ipv6_subnet(etcd, prefix):
    assert vxlan_net("config", "set", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix,
                     "--no-ipv4", "--ipv6-network", "fd19::/56").returncode == 0
    value = json.dumps({"BackendType": "vxlan", "PublicIPv6": "fd18:0:0:4::2",
                        "BackendV6Data": {"VNI": 1, "VtepMAC": "0a:00:00:00:06:04"}})
    put_record(etcd, f"{prefix}/subnets/fd19:0:0:4::-64", value)
    put_record(etcd, f"{prefix}/subnets/198.19.4.0-24&fd19:0:0:5::-64", value.replace(":04\"", ":05\""))
    result = vxlan_net("status", "--etcd-endpoints", etcd.client_url, "--etcd-prefix", prefix)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SUBNET", "PUBLIC", "IP", "PUBLIC", "IPV6", "VTEP", "MAC", "VTEP", "MAC", "V6",
                                "EXPIRES", "IN"]
    assert lines[1].split() == ["fd19:0:0:4::/64", "-", "fd18:0:0:4::2", "-", "0a:00:00:00:06:04", "never"]
    assert any(line.startswith("record skipped: '198.19.4.0-24&fd19:0:0:5::-64'") and "IPv6-only" in line
               for line in lines), lines


def test_status_marks_the_own_lease_found_by_either_familys_vtep_address_and_modes_per_family():
    from ipaddress import IPv4Network, IPv6Address, IPv6Network

    from vxlan_net.core.desired import MainRoute
    from vxlan_net.core.direct import DirectReach
    from vxlan_net.core.lease import Lease
    from vxlan_net.tools.status import lease_mode, own_lease_of, render_lease_table

    own = Lease(IPv4Network("198.19.3.0/24"), IPv4Address("198.18.1.2"), "02:00:00:00:00:01",
                ipv6_subnet=IPv6Network("fd19:0:0:3::/64"), public_ipv6=IPv6Address("fd18:0:0:1::2"),
                vtep_mac_v6="02:00:00:00:06:01")
    peer = Lease(IPv4Network("198.19.7.0/24"), IPv4Address("198.18.2.2"), "02:00:00:00:00:02",
                 ipv6_subnet=IPv6Network("fd19:0:0:7::/64"), public_ipv6=IPv6Address("fd18:0:0:2::2"),
                 vtep_mac_v6="02:00:00:00:06:02")
    assert own_lease_of([peer, own], [IPv6Address("fd19:0:0:3::")]) == own  # an IPv6 VTEP's /128
    assert own_lease_of([peer, own], [IPv4Address("198.19.3.0")]) == own
    assert own_lease_of([peer, own], [IPv4Address("198.19.3.1"), IPv6Address("fd19:0:0:3::1")]) is None
    # Only the IPv6 public address is on this node's segment: the two families go different ways.
    reach = DirectReach.from_routes([MainRoute(IPv6Network("fd18:0:0:2::/64"), None, "ul0", 2, 253)], "ul0")
    assert lease_mode(reach, peer, (4, 6)) == "4:tunnelled 6:direct"
    assert lease_mode(reach, peer, (4,)) == "tunnelled" and lease_mode(None, peer, (4, 6)) == "tunnelled"
    table = render_lease_table([(own, 60), (peer, None)], own.subnet, {peer.subnet: "4:tunnelled 6:direct"},
                               ipv6=True).splitlines()
    assert table[1].split() == ["198.19.3.0/24*", "fd19:0:0:3::/64", "198.18.1.2", "fd18:0:0:1::2",
                                "02:00:00:00:00:01", "02:00:00:00:06:01", "1m00s", "-"]
    assert table[2].split()[-3:] == ["never", "4:tunnelled", "6:direct"]


def test_in_order_sorts_entries_of_both_families_and_routes_without_gateway_or_device():
    from ipaddress import IPv4Network, IPv6Address, IPv6Network

    from vxlan_net.core.desired import MainRoute, Neighbour
    from vxlan_net.tools.status import in_order

    v4 = Neighbour(IPv4Address("198.19.7.0"), "02:00:00:00:00:02")
    v6 = Neighbour(IPv6Address("fd19::"), "02:00:00:00:00:01")
    assert in_order({v6, v4}) == [v4, v6]
    net = IPv4Network("198.19.7.0/24")
    blackhole, via = MainRoute(net, None, None, 4), MainRoute(net, IPv4Address("198.18.1.1"), "ul0", 4)
    routes = [via, blackhole, MainRoute(IPv6Network("fd19:0:0:7::/64"), None, "ul0", 4)]
    assert in_order(routes) == [blackhole, via, routes[2]]
