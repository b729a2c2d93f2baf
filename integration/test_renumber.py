"""A node whose own underlay address changes while its agent runs (issue 13), on the 2-node lab.

Node 1's agent runs with --iface only (it follows the interface's address) unless the test says otherwise;
node 1 is renumbered inside its namespace as an operator or a DHCP client would. Every check reads what
independent tools see: `etcdctl`, `ip -j -d link`, `bridge -j fdb`, ping from a pod on node 2.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import subprocess
import time

import pytest

from integration.cluster import (DUAL_STACK_CONFIG, VTEP, add_pod, fdb, node_subnet, put_config, start_agents,
                                 wait_converged, write_config)
from integration.lab import Lab, Node

pytestmark = pytest.mark.lab

SLOW_RESYNC = ("--resync-interval", "120")  # what changes must do so on the address event, not a resync
NEW_HOST = 7
VTEP6 = "vxnet6.1"


def lease_record(lab: Lab, node: Node) -> dict:
    """Node's record as etcd holds it: the value, its etcd lease and its version (puts since creation).
    Found by its IPv4 subnet, the start of its key also when dual-stack (`<v4>-24&<v6>-64`)."""
    key = f"/vxlan-net/subnets/{str(node_subnet(node)).replace('/', '-')}"
    kvs = json.loads(lab.etcdctl("get", "--prefix", key, "-w", "json").stdout)["kvs"]
    assert len(kvs) == 1, [base64.b64decode(kv["key"]) for kv in kvs]
    kv = kvs[0]
    return {"value": json.loads(base64.b64decode(kv["value"])), "lease": kv["lease"], "version": kv["version"]}


def vtep_local(node: Node, vtep: str = VTEP) -> str:
    data = node.ip_json("-d", "link", "show", "dev", vtep)[0]["linkinfo"]["info_data"]
    return data.get("local") or data["local6"]


def vtep_mac(node: Node, vtep: str = VTEP) -> str:
    return node.ip_json("link", "show", "dev", vtep)[0]["address"]


def renumber(node: Node, host: int) -> str:
    """Move node's underlay address to .<host> of its segment, default route restored; returns it."""
    new = str(node.subnet.network_address + host)
    node.ip_batch([f"addr del {node.public_ip}/24 dev {node.underlay_ifname}",
                   f"addr add {new}/24 dev {node.underlay_ifname}",
                   f"route replace default via {node.gateway}"])
    node.public_ip = new
    return new


def allowed_sources(node: Node, family: str = "ip") -> set[str]:
    """The node's nftables set of public IPs (`family` ip6: IPv6) allowed to send it VXLAN frames."""
    doc = json.loads(node.run("nft", "-j", "list", "set", family, "vxlan-net", "vxlan_peers", check=True).stdout)
    return {e for item in doc["nftables"] if "set" in item for e in item["set"].get("elem", [])}


def two_node_cluster(lab, *, follow: bool = True) -> tuple[Lab, Node, Node]:
    lab = lab(nodes=2)
    write_config(lab)
    n1, n2 = lab.nodes
    lab.start_agent(n1, *SLOW_RESYNC, public_ip=not follow)
    start_agents(lab, [n2], *SLOW_RESYNC)
    lab.wait_for(lambda: node_subnet(n1), timeout=20, message="node 1 wrote no subnet file")
    wait_converged(lab, lab.nodes)
    return lab, n1, n2


def reply_times(out: str) -> list[float]:
    """The `ping -D` timestamps of the replies."""
    return [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]


def test_renumbered_node_is_followed_pings_resume_within_5s_and_the_old_address_is_gone(lab):
    lab, n1, n2 = two_node_cluster(lab)
    old, subnet, mac = n1.public_ip, node_subnet(n1), vtep_mac(n1)
    before = lease_record(lab, n1)
    assert before["value"]["PublicIP"] == old
    target, source = add_pod(lab, n1, 1), add_pod(lab, n2, 1)
    assert source.ping(target.ip, count=1, timeout=3)
    ping = source.popen("ping", "-D", "-n", "-i", "0.1", "-W", "1", "-c", "150", target.ip,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2)
    changed_at = time.time()
    new = renumber(n1, NEW_HOST)
    out, _ = ping.communicate(timeout=40)
    replies = reply_times(out)
    after_change = [t for t in replies if t > changed_at]
    assert after_change, f"pings never resumed after the renumbering:\n{out[-600:]}"
    assert after_change[0] - changed_at <= 5.0, f"pings resumed {after_change[0] - changed_at:.1f}s after the change"
    record = lease_record(lab, n1)
    assert record["value"]["PublicIP"] == new
    assert (record["lease"], record["value"]["BackendData"]["VtepMAC"]) == (before["lease"], mac), "same etcd lease, same MAC"
    assert node_subnet(n1) == subnet
    assert (vtep_local(n1), vtep_mac(n1)) == (new, mac)
    assert fdb(n2) == {mac: [new]}, "node 2's FDB: the new destination only, no stale entry"
    assert old not in json.dumps(record) and old not in n2.run("bridge", "-j", "fdb", "show", "dev", VTEP).stdout
    assert allowed_sources(n2) == {new}, "node 2's ingress filter: the new address accepted, the old one dropped"
    status = n1.run(lab.agent_exe, "status", "--etcd-endpoints", lab.etcd_url, check=True).stdout
    assert f"this node's public IP: {new} on {n1.underlay_ifname}\n" in status, status
    log = n1.agent.log_text()
    assert len(re.findall(rf"public IP {re.escape(old)} -> {re.escape(new)}", log)) == 1, log[-2000:]


def test_explicit_public_ip_still_present_after_an_unrelated_change_changes_nothing(lab):
    lab, n1, n2 = two_node_cluster(lab, follow=False)
    before, mac = lease_record(lab, n1), vtep_mac(n1)
    extra = str(n1.subnet.network_address + NEW_HOST)
    n1.ip_batch([f"addr add {extra}/24 dev {n1.underlay_ifname}"])  # unrelated: ours stays, a second appears
    time.sleep(4)  # twice the settle time: a move, if any, would have happened
    assert lease_record(lab, n1) == before
    assert (vtep_local(n1), vtep_mac(n1)) == (n1.public_ip, mac)
    assert fdb(n2) == {mac: [n1.public_ip]}
    assert "->" not in n1.agent.log_text()


def test_explicit_public_ip_that_disappears_is_kept_and_said_once(lab):
    lab, n1, n2 = two_node_cluster(lab, follow=False)
    before, old = lease_record(lab, n1), n1.public_ip
    renumber(n1, NEW_HOST)
    lab.wait_for(lambda: "is no longer on this node" in n1.agent.log_text(), timeout=10,
                 message="the agent did not say its --public-ip is gone")
    n1.ip_batch([f"addr add {n1.subnet.network_address + NEW_HOST + 1}/24 dev {n1.underlay_ifname}"])  # more news
    time.sleep(4)
    assert lease_record(lab, n1) == before
    assert vtep_local(n1) == old
    assert n1.agent.log_text().count("is no longer on this node") == 1
    status = n1.run(lab.agent_exe, "status", "--etcd-endpoints", lab.etcd_url).stdout
    assert f"{old} is not on this node any more" in status, status
    doctor = n1.run(lab.agent_exe, "doctor", "--etcd-endpoints", lab.etcd_url, "--subnet-file", str(n1.subnet_file),
                    "--state-dir", str(n1.state_dir)).stdout
    assert f"PublicIP {old} is not on this node any more" in doctor, doctor


def test_renumbered_twice_quickly_updates_the_lease_at_most_once_per_settle_period(lab):
    lab, n1, n2 = two_node_cluster(lab)
    before, mac = lease_record(lab, n1), vtep_mac(n1)
    renumber(n1, NEW_HOST)
    time.sleep(0.5)  # well inside the agent's settle time (2 s)
    final = renumber(n1, NEW_HOST + 1)
    lab.wait_for(lambda: lease_record(lab, n1)["value"]["PublicIP"] == final, timeout=10,
                 message="the lease never showed the final address")
    time.sleep(3)  # a late second update, if any, would land here
    record = lease_record(lab, n1)
    assert record["version"] == before["version"] + 1, "one lease update for the flap, to the final address"
    assert (vtep_local(n1), vtep_mac(n1), fdb(n2)) == (final, mac, {mac: [final]})
    assert allowed_sources(n2) == {final}


def test_address_removed_and_readded_within_a_second_changes_nothing(lab):
    lab, n1, n2 = two_node_cluster(lab)
    before, mac = lease_record(lab, n1), vtep_mac(n1)
    n1.ip_batch([f"addr del {n1.public_ip}/24 dev {n1.underlay_ifname}"])
    time.sleep(0.5)
    n1.ip_batch([f"addr add {n1.public_ip}/24 dev {n1.underlay_ifname}",
                 f"route replace default via {n1.gateway}"])
    time.sleep(4)  # twice the settle time
    assert lease_record(lab, n1) == before
    assert (vtep_local(n1), fdb(n2)) == (n1.public_ip, {mac: [n1.public_ip]})
    assert "->" not in n1.agent.log_text()


def test_agent_restarted_after_renumbering_keeps_subnet_and_mac(lab):
    """Today's workaround (a restart) after the change: nothing is lost either way."""
    lab, n1, n2 = two_node_cluster(lab)
    subnet, mac, before = node_subnet(n1), vtep_mac(n1), lease_record(lab, n1)
    n1.agent.stop()
    new = renumber(n1, NEW_HOST)
    lab.start_agent(n1, *SLOW_RESYNC, public_ip=False)
    lab.wait_for(lambda: lease_record(lab, n1)["value"]["PublicIP"] == new, timeout=20,
                 message="the restarted agent did not publish its new address")
    assert node_subnet(n1) == subnet
    assert lease_record(lab, n1)["lease"] == before["lease"], "the same etcd lease, re-adopted"
    lab.wait_for(lambda: fdb(n2) == {mac: [new]}, timeout=10, message=f"node 2's FDB: {fdb(n2)}")
    assert (vtep_local(n1), vtep_mac(n1)) == (new, mac)
    target, source = add_pod(lab, n1, 1), add_pod(lab, n2, 1)
    assert source.ping(target.ip, count=3, timeout=3)


def test_a_tcp_stream_through_the_renumbering_resumes_without_a_reset(lab):
    """Proof 2: iperf3 from node 2's pod to node 1's pod across the change; the connection is never reset."""
    lab, n1, n2 = two_node_cluster(lab)
    target, source = add_pod(lab, n1, 1), add_pod(lab, n2, 1)
    server = target.popen("iperf3", "-s", "-1", "-p", "5201", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.wait_for(lambda: ":5201" in target.run("ss", "-ltn").stdout, timeout=5, message="iperf3 is not listening")
    client = source.popen("iperf3", "-c", target.ip, "-p", "5201", "-t", "14", "-b", "2M", "-i", "1", "-J",
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)
    renumber(n1, NEW_HOST)
    out, _ = client.communicate(timeout=40)
    server.wait(timeout=10)
    report = json.loads(out)
    assert "error" not in report, report.get("error")
    intervals = [i["sum"]["bytes"] for i in report["intervals"]]
    assert len(intervals) >= 13 and sum(intervals[-4:]) > 0, f"the stream did not resume: {intervals}"
    assert report["end"]["sum_received"]["bytes"] > 0


def test_an_ipv6_underlay_renumbering_is_followed_the_same_way_on_the_ipv6_vtep(lab):
    """Dual-stack underlay: node 1's IPv6 address changes; PublicIPv6, vxnet6.1's local6, the peer's FDB and
    ip6 ingress set follow; the IPv4 endpoint is left as it was."""
    lab = lab(nodes=2, underlay="dual")
    put_config(lab, DUAL_STACK_CONFIG)
    n1, n2 = lab.nodes
    lab.start_agent(n1, *SLOW_RESYNC, public_ip=False)  # it follows its interface's addresses
    start_agents(lab, [n2], *SLOW_RESYNC)
    wait_converged(lab, lab.nodes)
    old, new = n1.public_ipv6, str(ipaddress.IPv6Address(n1.public_ipv6) + (NEW_HOST - 2))
    before, mac6 = lease_record(lab, n1), vtep_mac(n1, VTEP6)
    assert before["value"]["PublicIPv6"] == old
    target, source = (lab.add_pod_from_subnet_file(node, f"n{node.index}p1") for node in (n1, n2))
    assert source.ping6(target.ip6, count=1, timeout=3)
    ping = source.popen("ping", "-6", "-D", "-n", "-i", "0.1", "-W", "1", "-c", "150", target.ip6,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2)
    changed_at = time.time()
    n1.ip_batch([f"addr del {old}/64 dev {n1.underlay_ifname}",
                 f"addr add {new}/64 dev {n1.underlay_ifname} nodad",
                 f"route replace default via {n1.gateway6}"])
    out, _ = ping.communicate(timeout=40)
    after_change = [t for t in reply_times(out) if t > changed_at]
    assert after_change, f"pings never resumed after the renumbering:\n{out[-600:]}"
    assert after_change[0] - changed_at <= 5.0, f"pings resumed {after_change[0] - changed_at:.1f}s after the change"
    record = lease_record(lab, n1)
    assert (record["value"]["PublicIPv6"], record["value"]["PublicIP"]) == (new, n1.public_ip)
    assert (record["lease"], record["value"]["BackendV6Data"]["VtepMAC"]) == (before["lease"], mac6)
    assert (vtep_local(n1, VTEP6), vtep_mac(n1, VTEP6), vtep_local(n1)) == (new, mac6, n1.public_ip)
    assert fdb(n2, VTEP6) == {mac6: [new]}, "node 2's FDB: the new destination only, no stale entry"
    assert allowed_sources(n2, "ip6") == {new} and allowed_sources(n2) == {n1.public_ip}
    status = n1.run(lab.agent_exe, "status", "--etcd-endpoints", lab.etcd_url, check=True).stdout
    assert f"this node's public IPv6: {new} on {n1.underlay_ifname}\n" in status, status
    log = n1.agent.log_text()
    assert len(re.findall(rf"public IPv6 {re.escape(old)} -> {re.escape(new)}", log)) == 1, log[-2000:]


def test_an_explicit_public_ipv6_that_disappears_is_kept_and_said_once(lab):
    lab = lab(nodes=2, underlay="dual")
    put_config(lab, DUAL_STACK_CONFIG)
    n1, n2 = lab.nodes
    start_agents(lab, lab.nodes, *SLOW_RESYNC)  # with --public-ip and --public-ipv6
    wait_converged(lab, lab.nodes)
    before, old = lease_record(lab, n1), n1.public_ipv6
    n1.ip_batch([f"addr del {old}/64 dev {n1.underlay_ifname}",
                 f"addr add {ipaddress.IPv6Address(old) + NEW_HOST}/64 dev {n1.underlay_ifname} nodad"])
    lab.wait_for(lambda: f"public IPv6 {old} (--public-ipv6) is no longer on this node" in n1.agent.log_text(),
                 timeout=10, message="the agent did not say its --public-ipv6 is gone")
    time.sleep(4)  # twice the settle time: a move, if any, would have happened
    assert lease_record(lab, n1) == before
    assert vtep_local(n1, VTEP6) == old and fdb(n2, VTEP6) == {vtep_mac(n1, VTEP6): [old]}
    assert n1.agent.log_text().count("is no longer on this node") == 1
    doctor = n1.run(lab.agent_exe, "doctor", "--etcd-endpoints", lab.etcd_url, "--subnet-file", str(n1.subnet_file),
                    "--state-dir", str(n1.state_dir)).stdout
    assert f"PublicIPv6 {old} is not on this node any more" in doctor, doctor
