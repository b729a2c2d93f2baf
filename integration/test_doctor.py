"""`vxlan-net doctor` on a lab node: all OK on a healthy node, and each item broken by hand is named."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess

import pytest

from integration.cluster import VTEP, add_pod, node_subnet, running_cluster

pytestmark = pytest.mark.lab

LINE = re.compile(r"^(OK|FAIL)\s+(.+?): (.*)$")


class Verdict:
    def __init__(self, proc):
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr
        self.lines = {}
        for line in proc.stdout.splitlines():
            match = LINE.match(line)
            if match:
                self.lines[match.group(2)] = (match.group(1) == "OK", match.group(3))

    @property
    def failed(self) -> dict[str, str]:
        return {item: reason for item, (ok, reason) in self.lines.items() if not ok}

    def __repr__(self) -> str:
        return f"rc={self.rc}\n{self.out}\n{self.err[-1500:]}"


def doctor(lab, node, *extra: str) -> Verdict:
    verdict = Verdict(node.run(lab.agent_exe, "doctor", "--etcd-endpoints", lab.etcd_url,
                               "--subnet-file", str(node.subnet_file), "--state-dir", str(node.state_dir),
                               *extra, timeout=40))
    assert "Traceback" not in verdict.err, verdict
    return verdict


@pytest.fixture
def cluster(lab):
    lab = lab(nodes=2)
    # A resync interval far beyond the test: what is broken by hand stays broken until doctor looks.
    running_cluster(lab, "--ip-masq", "--resync-interval", "3600")
    n1, n2 = lab.nodes
    pods = add_pod(lab, n1, 1), add_pod(lab, n2, 1)
    return lab, n1, n2, pods


def test_doctor_passes_then_names_each_item_broken_by_hand(cluster):
    lab, n1, n2, (pod1, pod2) = cluster
    own, peer = node_subnet(n1), node_subnet(n2)
    gateway = peer.network_address
    peer_item = f"peer {peer} at {n2.public_ip}"
    peer_mac = n2.ip_json("link", "show", "dev", VTEP)[0]["address"]

    healthy = doctor(lab, n1)
    assert healthy.rc == 0 and not healthy.failed, healthy
    assert {"config", f"own lease {own}", "device vxnet.1", peer_item, "bridge cni0", "masquerade",
            "ip_forward", "nftables table ip vxlan-net"} <= set(healthy.lines), healthy
    assert healthy.out.rstrip().endswith("all OK")

    def broken(expected: set[str], *extra: str) -> Verdict:
        verdict = doctor(lab, n1, *extra)
        assert verdict.rc == 1 and set(verdict.failed) == expected, verdict
        assert "      fix: " in verdict.out
        return verdict

    # A peer route deleted: named as the missing route of that peer.
    n1.run("ip", "route", "del", str(peer), "dev", VTEP, check=True)
    assert broken({peer_item}).failed[peer_item] == f"missing route {peer} via {gateway}"
    n1.run("ip", "route", "replace", str(peer), "via", str(gateway), "dev", VTEP, "onlink", "proto", "157",
           check=True)

    # An FDB entry deleted: named, and the probe sees no frame leave for that node.
    n1.run("bridge", "fdb", "del", peer_mac, "dev", VTEP, "dst", n2.public_ip, "self", check=True)
    verdict = broken({peer_item, f"probe {own.network_address + 1} -> {pod2.ip}"},
                     "--probe", pod2.ip, "--probe-timeout", "1")
    assert verdict.failed[peer_item] == f"missing FDB entry {peer_mac} dst {n2.public_ip}"
    n1.run("bridge", "fdb", "append", peer_mac, "dev", VTEP, "dst", n2.public_ip, "self", "permanent", check=True)

    # The VTEP's MTU changed.
    n1.run("ip", "link", "set", VTEP, "mtu", "1400", check=True)
    assert "MTU 1400, expected 1450 (underlay ul0 MTU 1500 - 50)" in broken({"device vxnet.1"}).failed[
        "device vxnet.1"]
    n1.run("ip", "link", "set", VTEP, "mtu", "1450", check=True)

    # The bridge down.
    n1.run("ip", "link", "set", "cni0", "down", check=True)
    assert broken({"bridge cni0"}).failed["bridge cni0"] == "down"
    n1.run("ip", "link", "set", "cni0", "up", check=True)

    # The subnet file corrupted.
    text = n1.subnet_file.read_text()
    n1.subnet_file.write_text("VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=not-an-address\n")
    item = f"subnet file {n1.subnet_file}"
    assert "does not parse" in broken({item, "masquerade"}).failed[item]
    n1.subnet_file.write_text(text)

    assert doctor(lab, n1).rc == 0  # everything put back is seen as put back

    # Our nftables table deleted: the firewall and the masquerade it carried.
    n1.run("nft", "delete", "table", "ip", "vxlan-net", check=True)
    verdict = broken({"nftables table ip vxlan-net", "masquerade"})
    assert "does not exist" in verdict.failed["nftables table ip vxlan-net"]
    assert verdict.failed["masquerade"].startswith("VXLAN_NET_IPMASQ=true but")

    # etcd stopped: the config check says why, the data plane is still checked, no traceback.
    lab.etcd.stop()
    verdict = doctor(lab, n1)
    assert verdict.rc == 1, verdict
    assert verdict.failed["config"].startswith("etcd unavailable:"), verdict
    assert lab.etcd_url.split("//")[1] in verdict.failed["config"]
    assert verdict.lines["device vxnet.1"][0] and verdict.lines["bridge cni0"][0], verdict


def test_doctor_probe_sees_the_frame_leave_for_the_node_holding_the_destination(cluster):
    lab, n1, n2, (pod1, pod2) = cluster
    source = node_subnet(n1).network_address + 1
    verdict = doctor(lab, n1, "--probe", pod2.ip)
    assert verdict.rc == 0 and not verdict.failed, verdict
    ok, reason = verdict.lines[f"probe {source} -> {pod2.ip}"]
    assert ok and reason.startswith(f"outer {n1.public_ip} -> {n2.public_ip} (node of {node_subnet(n2)}), VNI 1, "
                                    f"inner {source} -> {pod2.ip}"), verdict
    assert verdict.lines[f"reply {pod2.ip} -> {source}"][0], verdict

    usage = n1.run(lab.agent_exe, "doctor", "--etcd-endpoints", lab.etcd_url, "--probe", "not-an-ip")
    assert usage.returncode == 2 and usage.stderr.strip().count("\n") == 0, usage.stderr


def test_doctor_node_flag_runs_inside_the_named_namespace(lab):
    from integration.cluster import running_cluster

    lab = lab(nodes=2)
    nodes = running_cluster(lab)
    root_side = subprocess.run([lab.agent_exe, "doctor", "--node", nodes[0].name, "--etcd-endpoints", lab.etcd_url,
                                "--subnet-file", str(nodes[0].subnet_file), "--state-dir", str(nodes[0].state_dir),
                                "--bridge", "none-here"], capture_output=True, text=True, timeout=60)
    assert "device vxnet.1: VNI 1" in root_side.stdout and "local 198.18.1.2" in root_side.stdout
    assert "bridge none-here" in root_side.stdout and root_side.returncode == 1  # no bridge: named, not hidden
    missing = subprocess.run([lab.agent_exe, "doctor", "--node", "no-such-ns"], capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode == 2 and "no such network namespace" in missing.stderr


def test_doctor_on_a_dual_stack_node_checks_both_vteps_names_a_broken_ipv6_entry_and_probes_over_ipv6(lab):
    """Issue 11: dual-stack pods over a dual-stack underlay (vxnet.1 and vxnet6.1), the config written with
    `config set --ipv6-network`."""
    from integration.cluster import node_subnets, start_agents, wait_converged, write_config

    lab = lab(nodes=2, underlay="dual")
    write_config(lab, "--ipv6-network", "fd19::/56")
    start_agents(lab, lab.nodes, "--resync-interval", "3600")  # what is broken by hand stays broken
    wait_converged(lab, lab.nodes, timeout=20)
    n1, n2 = lab.nodes
    lab.add_pod_from_subnet_file(n1, "n1p0")  # the bridge, with a gateway per family
    pod2 = lab.add_pod_from_subnet_file(n2, "n2p0")
    (own4, own6), (peer4, peer6) = node_subnets(n1), node_subnets(n2)
    peer_item = f"peer {peer4} + {peer6} at {n2.public_ip}, {n2.public_ipv6}"

    healthy = doctor(lab, n1)
    assert healthy.rc == 0 and not healthy.failed, healthy
    assert {f"own lease {own4} + {own6}", "device vxnet.1", "device vxnet6.1", peer_item, "ipv6 forwarding",
            "nftables table ip6 vxlan-net", "ipv6 masquerade"} <= set(healthy.lines), healthy
    assert healthy.lines["nftables table ip6 vxlan-net"][1] == "VXLAN accepted only from the 1 peer nodes' addresses"
    assert f"local {n1.public_ipv6} on {n1.underlay_ifname}" in healthy.lines["device vxnet6.1"][1]

    # The peer's IPv6 neighbour deleted from vxnet6.1: named on that VTEP, with the command that restores it.
    mac6 = n2.ip_json("link", "show", "dev", "vxnet6.1")[0]["address"]
    gateway6 = str(peer6.network_address)
    n1.run("ip", "-6", "neigh", "del", gateway6, "dev", "vxnet6.1", check=True)
    verdict = doctor(lab, n1)
    assert verdict.rc == 1 and set(verdict.failed) == {peer_item}, verdict
    assert verdict.failed[peer_item] == f"vxnet6.1: missing neighbour {gateway6} lladdr {mac6}", verdict
    assert f"ip neigh replace {gateway6} lladdr {mac6} dev vxnet6.1 nud permanent" in verdict.out
    n1.run("ip", "neigh", "replace", gateway6, "lladdr", mac6, "dev", "vxnet6.1", "nud", "permanent", check=True)

    # The probe over IPv6: an ICMPv6 echo leaves over the IPv6 underlay for the node holding the pod.
    assert_ipv6_probe(lab, n1, pod2, own6, peer6, (n1.public_ipv6, n2.public_ipv6))

    # status shows both families of each lease and finds the kernel in sync on both VTEPs.
    status = n1.run(lab.agent_exe, "status", "--etcd-endpoints", lab.etcd_url)
    assert status.returncode == 0, status.stdout + status.stderr
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:3]}
    assert rows[f"{own4}*"][1:4] == [str(own6), n1.public_ip, n1.public_ipv6], status.stdout
    assert rows[str(peer4)][1:4] == [str(peer6), n2.public_ip, n2.public_ipv6], status.stdout
    assert f"this node's public IPv6: {n1.public_ipv6} on {n1.underlay_ifname}" in status.stdout
    assert f"this node ({own4} + {own6}): kernel entries match 1 peer" in status.stdout


def assert_ipv6_probe(lab, node, pod, own6, peer6, outer):
    """doctor --probe <pod's IPv6>: passes, the echo leaves with `outer` addresses and our VNI, the reply comes."""
    source6 = own6.network_address + 1
    verdict = doctor(lab, node, "--probe", pod.ip6)
    assert verdict.rc == 0 and not verdict.failed, verdict.out
    ok, reason = verdict.lines[f"probe {source6} -> {pod.ip6}"]
    assert ok and reason == (f"outer {outer[0]} -> {outer[1]} (node of {peer6}), VNI 1, "
                             f"inner {source6} -> {pod.ip6}"), verdict
    assert verdict.lines[f"reply {pod.ip6} -> {source6}"][0], verdict
    return verdict


@pytest.mark.parametrize("underlay, config_flags, vteps", [
    ("v6", ("--no-ipv4", "--ipv6-network", "fd19::/56"), ["vxnet6.1"]),  # IPv6-only over an IPv6-only underlay
    ("v4", ("--network", "198.19.0.0/16", "--subnet-max", "198.19.199.0", "--ipv6-network", "fd19::/56"),
     ["vxnet.1"]),  # dual-stack pods over an IPv4-only underlay: IPv6 rides vxnet.1
])
def test_doctor_probes_ipv6_pods_through_the_one_vtep_a_single_family_underlay_gives(lab, underlay, config_flags,
                                                                                      vteps):
    from integration.cluster import node_subnets, start_agents, wait_converged

    lab = lab(nodes=2, underlay=underlay)
    lab.nodes[0].run(lab.agent_exe, "config", "set", "--etcd-endpoints", lab.etcd_url, *config_flags, check=True)
    start_agents(lab, lab.nodes, "--resync-interval", "3600")
    wait_converged(lab, lab.nodes, timeout=20)
    n1, n2 = lab.nodes
    lab.add_pod_from_subnet_file(n1, "n1p0")
    pod2 = lab.add_pod_from_subnet_file(n2, "n2p0")
    own6, peer6 = node_subnets(n1)[-1], node_subnets(n2)[-1]
    outer = (n1.public_ipv6, n2.public_ipv6) if underlay == "v6" else (n1.public_ip, n2.public_ip)
    verdict = assert_ipv6_probe(lab, n1, pod2, own6, peer6, outer)
    assert [item for item in verdict.lines if item.startswith("device ")] == [f"device {v}" for v in vteps], verdict
    status = n1.run(lab.agent_exe, "status", "--etcd-endpoints", lab.etcd_url)
    assert status.returncode == 0, status.stdout + status.stderr
    subnets = " + ".join(map(str, node_subnets(n1)))
    assert f"this node ({subnets}): kernel entries match 1 peer" in status.stdout, status.stdout
    own_row = next(line.split() for line in status.stdout.splitlines() if line.startswith(f"{node_subnets(n1)[0]}*"))
    assert (n1.public_ipv6 if underlay == "v6" else n1.public_ip) in own_row, status.stdout


def test_doctor_names_ipv6_disabled_on_the_vtep_by_hand(lab):
    """Dual-stack pods over an IPv4-only underlay (the v4 lab turns IPv6 off in its nodes; the agent turns it
    on for its VTEP): IPv6 switched off on vxnet.1 by hand takes its /128 and IPv6 entries with it; doctor
    says why, not only what is missing."""
    from integration.cluster import start_agents, wait_converged, write_config

    lab = lab(nodes=2)
    write_config(lab, "--ipv6-network", "fd19::/56")
    start_agents(lab, lab.nodes, "--resync-interval", "3600")
    wait_converged(lab, lab.nodes, timeout=20)
    n1 = lab.nodes[0]
    assert set(doctor(lab, n1).failed) == {"bridge cni0"}  # no pod yet: no bridge
    n1.run("sysctl", "-q", "-w", "net.ipv6.conf.vxnet/1.disable_ipv6=1", check=True)
    verdict = doctor(lab, n1)
    assert verdict.rc == 1 and "device vxnet.1" in verdict.failed, verdict
    reason = verdict.failed["device vxnet.1"]
    assert "IPv6 is disabled on it (net.ipv6.conf.vxnet/1.disable_ipv6=1)" in reason and "lacks address fd19:" in reason
    assert "`sysctl -w net.ipv6.conf.vxnet/1.disable_ipv6=0`" in verdict.out
    # As `ip` sees it: no IPv6 address left on the VTEP.
    assert not [a for link in n1.ip_json("-6", "addr", "show", "dev", "vxnet.1") for a in link.get("addr_info", [])]


def test_doctor_skips_a_record_claiming_this_nodes_identity_as_the_agent_does(cluster):
    """Records written after node 1's, claiming its PublicIP or its VTEP MAC, are never programmed by node 1's
    agent (the first created wins an identity); doctor must judge the node by the same rule: no peer line
    expecting their entries, and each record named among the skipped ones with the agent's reason."""
    lab, n1, n2, _pods = cluster
    own, peer = node_subnet(n1), node_subnet(n2)
    mac1 = n1.ip_json("link", "show", "dev", VTEP)[0]["address"]
    taken = {own, peer}
    free = [s for s in (ipaddress.ip_network(f"198.19.{i}.0/24") for i in (201, 202)) if s not in taken]
    claims = {free[0]: {"PublicIP": n1.public_ip, "VtepMAC": "0a:58:c6:13:c9:01"},  # our public IP
              free[1]: {"PublicIP": "198.18.9.9", "VtepMAC": mac1}}  # our VTEP's MAC
    for subnet, claim in claims.items():
        value = {"PublicIP": claim["PublicIP"], "BackendType": "vxlan",
                 "BackendData": {"VNI": 1, "VtepMAC": claim["VtepMAC"]}}
        lab.etcdctl("put", f"/vxlan-net/subnets/{subnet.network_address}-{subnet.prefixlen}", json.dumps(value))
    # The agent skips both (and says why) and programs nothing for them.
    lab.wait_for(lambda: n1.agent.log_text().count("is also claimed by") >= 2, timeout=10,
                 message="the agent did not skip the records claiming its identity")
    routes = {r["dst"] for r in n1.ip_json("route", "show", "dev", VTEP)}
    assert not routes & {str(s) for s in claims}, routes

    verdict = doctor(lab, n1)
    assert not [item for item in verdict.lines if any(str(s) in item and item.startswith("peer") for s in claims)], \
        verdict
    assert set(verdict.failed) == {"lease records"}, verdict
    skipped = verdict.failed["lease records"]
    for subnet in claims:
        assert f"'{subnet.network_address}-{subnet.prefixlen}': its " in skipped, verdict
    assert f"its PublicIP {n1.public_ip} is also claimed by" in skipped and f"its VtepMAC {mac1} is also" in skipped
