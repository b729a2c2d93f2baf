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
