"""A running vxlan-net cluster on top of a Lab: config, agents, pods and convergence checks.

Shared by the integration tests, the benchmarks and the demo; every check reads the
kernel with independent tools (`ip -j`, `bridge -j`), never the agent's own view.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from typing import Iterable, Optional

from integration.lab import Lab, Node, Pod

POD_NETWORK = "198.19.0.0/16"
VTEP = "vxnet.1"
# Agents lease only below this, so 198.19.200.0/24 .. 198.19.255.0/24 stay free for records
# a test writes by hand (decoys, hostile records): an agent that drew one of those at random
# would see its own record overwritten and the test would fail by chance.
LAB_SUBNET_MAX = "198.19.199.0"
POD_NETWORK6 = "fd19::/56"
# The network config of a dual-stack cluster (flannel's keys), put straight into etcd.
DUAL_STACK_CONFIG = {"Network": POD_NETWORK, "SubnetMax": LAB_SUBNET_MAX, "EnableIPv6": True,
                     "IPv6Network": POD_NETWORK6, "Backend": {"Type": "vxlan", "VNI": 1}}


def write_config(lab: Lab, *extra: str, network: str = POD_NETWORK) -> None:
    """`vxlan-net config set`, run from the first node against the lab's etcd."""
    if network == POD_NETWORK and "--subnet-max" not in extra:
        extra = (*extra, "--subnet-max", LAB_SUBNET_MAX)
    lab.nodes[0].run(lab.agent_exe, "config", "set", "--etcd-endpoints", lab.etcd_url, "--network", network,
                     *extra, check=True)


def put_config(lab: Lab, doc: dict) -> None:
    """A network config document written to etcd as is (`etcdctl put`), e.g. DUAL_STACK_CONFIG."""
    lab.etcdctl("put", "/vxlan-net/config", json.dumps(doc))


def node_subnet(node: Node) -> Optional[ipaddress.IPv4Network]:
    """The subnet the node's agent wrote to its subnet file, if any."""
    gateway = node.subnet_env().get("VXLAN_NET_SUBNET")
    return ipaddress.IPv4Interface(gateway).network if gateway else None


def node_subnets(node: Node) -> list:
    """The node's subnets of both families from its subnet file (IPv4 first); [] before it is written."""
    env = node.subnet_env()
    return [ipaddress.ip_interface(env[k]).network for k in ("VXLAN_NET_SUBNET", "VXLAN_NET_IPV6_SUBNET") if k in env]


def overlay_routes(node: Node) -> dict[str, str]:
    """{subnet: gateway} of the routes on the node's VXLAN device, from `ip -j route`."""
    routes = node.ip_json("route", "show", "dev", VTEP) if node.has_link(VTEP) else []
    return {r["dst"]: r.get("gateway") for r in routes if r.get("gateway")}


def overlay_routes6(node: Node) -> dict[str, str]:
    """{subnet: gateway} of our IPv6 routes (protocol 157) on either VTEP, from `ip -j -6 route`."""
    routes = node.ip_json("-6", "route", "show", "proto", "157")
    return {r["dst"]: r.get("gateway") for r in routes if r.get("gateway") and r.get("dev", "").startswith("vxnet")}


def direct_routes(node: Node) -> dict[str, str]:
    """{subnet: gateway} of vxlan-net's direct routes (protocol 157 on the underlay device), from `ip -j route`."""
    routes = [r for family in ("-4", "-6")
              for r in node.ip_json(family, "route", "show", "dev", node.underlay_ifname, "proto", "157")]
    return {r["dst"]: r.get("gateway") for r in routes}


def neighbours(node: Node, vtep: str = VTEP) -> dict[str, str]:
    """{ip: lladdr} of permanent neighbours (both families) on a VXLAN device, from `ip -j neigh`."""
    if not node.has_link(vtep):
        return {}
    return {n["dst"]: n.get("lladdr") for n in node.ip_json("neigh", "show", "dev", vtep)
            if "PERMANENT" in n.get("state", [])}


def fdb(node: Node, vtep: str = VTEP) -> dict[str, list[str]]:
    """{mac: [dst, ...]} of a VXLAN device's FDB entries with a remote, from `bridge -j fdb`."""
    if not node.has_link(vtep):
        return {}
    out = node.run("bridge", "-j", "fdb", "show", "dev", vtep, check=True).stdout
    entries: dict[str, list[str]] = {}
    for entry in json.loads(out or "[]"):
        if entry.get("dst"):
            entries.setdefault(entry["mac"], []).append(entry["dst"])
    return entries


def http_get(node: Node, url: str) -> tuple[int, str]:
    """(status, body) of a GET from inside the node's namespace (e.g. the agent's /readyz), 3 s at most."""
    script = ("import sys, urllib.request, urllib.error\n"
              "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=3); print(r.status); print(r.read().decode())\n"
              "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())\n")
    out = node.run(sys.executable, "-c", script, url, check=True).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def start_agents(lab: Lab, nodes: Iterable[Node], *agent_args: str, timeout: float = 20.0) -> None:
    """Start agents on `nodes` and wait until each has written its subnet file."""
    nodes = list(nodes)
    for node in nodes:
        lab.start_agent(node, *agent_args)
    lab.wait_for(lambda: all(node_subnets(n) for n in nodes), timeout=timeout,
                 message="agents did not write their subnet files")


def wait_converged(lab: Lab, nodes: Iterable[Node], timeout: float = 15.0) -> None:
    """Every node has a route to every other node's subnet: via that subnet's VTEP address (tunnelled), or
    via the other node's PublicIP on the underlay (direct routing, nodes on one segment)."""
    nodes = list(nodes)

    def converged() -> bool:
        subnets = {n.name: node_subnets(n) for n in nodes}
        for node in nodes:
            routes, direct = {**overlay_routes(node), **overlay_routes6(node)}, direct_routes(node)
            for other in nodes:
                if not subnets[other.name]:
                    return False
                for subnet in subnets[other.name] if other is not node else ():
                    gateways = {other.public_ip, other.public_ipv6} - {None}
                    if routes.get(str(subnet)) != str(subnet.network_address) \
                            and direct.get(str(subnet)) not in gateways:
                        return False
        return True

    lab.wait_for(converged, timeout=timeout, message="overlay routes did not converge")


def add_pod(lab: Lab, node: Node, index: int, name: Optional[str] = None) -> Pod:
    """A pod on `node` at host number `index + 1` of the node's subnet (`.1` is the bridge)."""
    env = node.subnet_env()
    subnet, mtu = ipaddress.IPv4Interface(env["VXLAN_NET_SUBNET"]).network, int(env["VXLAN_NET_MTU"])
    address = f"{subnet.network_address + index + 1}/{subnet.prefixlen}"
    return lab.add_pod(node, name or f"n{node.index}p{index}", address, str(subnet.network_address + 1), mtu)


def running_cluster(lab: Lab, *agent_args: str, nodes: Optional[list[Node]] = None,
                    config: Optional[dict] = None) -> list[Node]:
    """Config written (`config`, e.g. DUAL_STACK_CONFIG, put as is; default the CLI's IPv4 one), agents
    started on `nodes` (default: all) and converged."""
    nodes = lab.nodes if nodes is None else nodes
    if config is None:
        write_config(lab)
    else:
        put_config(lab, config)
    start_agents(lab, nodes, *agent_args)
    wait_converged(lab, nodes)
    return nodes


class PingStream:
    """A background `ping -i <interval> -c <count>` from a pod; `.lost()` after it ends."""

    def __init__(self, pod: Pod, dst: str, count: int, interval: float = 0.05):
        import subprocess

        self.count = count
        self.proc = pod.popen("ping", "-n", "-i", str(interval), "-c", str(count), "-W", "1", dst,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.timeout = count * interval + 10

    def lost(self) -> int:
        """Packets transmitted minus received, from ping's own summary."""
        import re

        out, _ = self.proc.communicate(timeout=self.timeout)
        match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if not match:
            raise AssertionError(f"ping printed no summary: {out[-500:]}")
        sent, received = int(match.group(1)), int(match.group(2))
        assert sent == self.count, f"ping stopped early: {out[-300:]}"
        return sent - received
