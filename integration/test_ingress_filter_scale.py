"""The VXLAN ingress filter at 5,000 leases: after every join the set (`nft -j list set`) equals the peers'
public IPs, a leave removes exactly one element, and each is one nftables transaction of the agent's that
adds or deletes just that element, as `nft monitor` sees the kernel announce them; the agent sends these
over its own netlink socket, so the wrapper of test_firewall, which logs every `nft` the agent forks, sees
none of them. A delete that nftables refuses (the element was removed by hand) heals through a full
rewrite. Not timed."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._probe import candidate_subnets, lease_value
from integration.cluster import write_config
from integration.lab import REPO
from integration.test_firewall import FirewallNode
from vxlan_net.core.lease import subnet_key_name

pytestmark = pytest.mark.lab

LEASES = 5000
JOINS = 100
SUBNET_LEN = 29  # 8,191 subnets of 198.19.0.0/16: room for the leases, the joins and the agent
JOIN_INDEX = 10_000  # the joins' public IPs, 198.18.201.0 + index, above the filled leases' ones
PEER_SET = ("ip", "vxlan-net", "vxlan_peers")


def allowed(node) -> set[str]:
    """The set's elements; empty while the agent has not made its table yet."""
    listing = node.run("nft", "-j", "list", "set", *PEER_SET)
    if listing.returncode != 0:
        return set()
    doc = json.loads(listing.stdout)
    return {e for item in doc["nftables"] if "set" in item for e in item["set"].get("elem", [])}


def records(lab) -> dict[str, str]:
    """Key name -> PublicIP of every lease record in etcd."""
    doc = json.loads(lab.etcdctl("get", "/vxlan-net/subnets/", "--prefix", "-w", "json", timeout=30).stdout)
    return {base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]:
            json.loads(base64.b64decode(kv["value"]))["PublicIP"] for kv in doc.get("kvs", [])}


class SetMonitor:
    """`nft monitor` in the node: each nft transaction as the kernel announces it, with who made it."""

    GENERATION = re.compile(r"# new generation \d+ by process (\d+) ")

    def __init__(self, lab, node):
        self.path = lab.workdir / "nft-monitor.txt"
        with open(self.path, "wb") as out:
            self.proc = node.popen("nft", "monitor", stdout=out, stderr=subprocess.STDOUT)
        self.seen = 0
        # Listening once it reports a transaction of ours (a table created and deleted, again until seen).
        def probed() -> bool:
            node.run("nft", "add", "table", "ip", "vxlan-net-monitor-probe", check=True)
            node.run("nft", "delete", "table", "ip", "vxlan-net-monitor-probe", check=True)
            return "delete table ip vxlan-net-monitor-probe" in self.path.read_text()
        lab.wait_for(probed, timeout=10, message="nft monitor did not start")
        self.transactions()

    def wait(self, lab, count: int) -> list[tuple[int, list[str]]]:
        """The transactions since the last look, once there are `count` of them (bounded)."""
        lab.wait_for(lambda: self.path.read_text().count("# new generation ", self.seen) >= count, timeout=10,
                     message=f"nft monitor saw fewer than {count} transactions")
        return self.transactions()

    def transactions(self) -> list[tuple[int, list[str]]]:
        """(PID of the thread that made it, its lines) of each complete transaction since the last call."""
        text = self.path.read_text()
        done = text.rfind("\n# new generation ")
        if done < self.seen:
            return []
        end = text.index("\n", done + 1) + 1
        made, lines = [], []
        for line in text[self.seen:end].splitlines():
            generation = self.GENERATION.match(line)
            if generation:
                made.append((int(generation.group(1)), lines))
                lines = []
            elif line.strip():
                lines.append(line.strip())
        self.seen = end
        return made


def in_agent(node, transactions: list[tuple[int, list[str]]]) -> list[list[str]]:
    """The transactions' lines, each made by one of the agent's threads (or the PID itself)."""
    assert all(Path(f"/proc/{node.agent.proc.pid}/task/{pid}").exists() for pid, _ in transactions), transactions
    return [lines for _, lines in transactions]


def set_writes(fw: FirewallNode) -> list[str]:
    """What the agent's `nft -f` runs since the last look fed to nft."""
    return [c["stdin"] for c in fw.calls() if "-f" in c["argv"] and "list" not in c["argv"]]


def test_joins_and_a_leave_at_5000_leases_change_only_their_own_element(lab):
    lab = lab(nodes=1)
    node = lab.nodes[0]
    fw = FirewallNode(lab)
    write_config(lab, "--subnet-len", str(SUBNET_LEN))
    node.run("env", f"PYTHONPATH={REPO}", sys.executable, "-m", "benchmarks._probe", "fill", "--etcd",
             lab.etcd_url, "--count", str(LEASES), "--subnet-len", str(SUBNET_LEN), timeout=60, check=True)
    lab.start_agent(node, "--resync-interval", "3600", env={"PATH": fw.path})
    lab.wait_for(lambda: len(allowed(node)) == LEASES, timeout=60, message="the set never held every peer")
    known = records(lab)
    assert len(known) == LEASES + 1  # the agent's own record is there, and is no peer
    expected = set(known.values()) - {node.public_ip}
    assert allowed(node) == expected
    fw.calls()  # the start-up's full rewrite is not what this test is about
    monitor = SetMonitor(lab, node)

    free = (key for key in map(subnet_key_name, candidate_subnets("198.19.0.0/16", SUBNET_LEN)) if key not in known)
    joined = []
    for i in range(JOINS):
        key = next(free)
        value = json.loads(lease_value(JOIN_INDEX + i))
        lab.etcdctl("put", f"/vxlan-net/subnets/{key}", json.dumps(value))
        expected.add(value["PublicIP"])
        joined.append((key, value["PublicIP"]))
        lab.wait_for(lambda: allowed(node) == expected, timeout=10,
                     message=f"join {i}: the set is not the peers' public IPs")
    assert in_agent(node, monitor.wait(lab, JOINS)) == [[f"add element ip vxlan-net vxlan_peers {{ {ip} }}"]
                                                     for _, ip in joined]
    assert set_writes(fw) == [], "no `nft` forked per event"

    before = allowed(node)
    key, gone = joined[JOINS // 2]
    lab.etcdctl("del", f"/vxlan-net/subnets/{key}")
    lab.wait_for(lambda: allowed(node) != before, timeout=10, message="the leave never reached the set")
    after = allowed(node)
    assert before - after == {gone} and after <= before
    assert after == expected - {gone}
    assert in_agent(node, monitor.wait(lab, 1)) == [[f"delete element ip vxlan-net vxlan_peers {{ {gone} }}"]]
    assert set_writes(fw) == []
    expected.discard(gone)

    # Hostile: an operator deleted a peer's element by hand, then the peer leaves. nft refuses to delete
    # what is not there, so the agent's delete fails; its retry re-applies the table, peers as they are.
    key, hand_deleted = joined[0]
    node.run("nft", "delete", "element", *PEER_SET, f"{{ {hand_deleted} }}", check=True)
    lab.etcdctl("del", f"/vxlan-net/subnets/{key}")
    expected.discard(hand_deleted)
    lab.wait_for(lambda: "firewall: nftables refused the peer set change" in node.agent.log_text(), timeout=10,
                 message="the agent's delete of a missing element did not fail as nft does")
    lab.wait_for(lambda: allowed(node) == expected, timeout=15, message="the set did not heal")
    assert node.agent.alive()

