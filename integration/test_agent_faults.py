"""Transient faults injected into a real agent: it keeps running, programs the overlay, reports and recovers.

Each fault is really there for a root process: an `nft` first on the agent's PATH (hanging,
failing, or one that cannot be executed), a read-only tmpfs over the subnet file's directory
inside the agent's own mount namespace, the health port bound by another process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from integration.cluster import VTEP, fdb, http_get, neighbours, node_subnet, overlay_routes, start_agents, \
    write_config
from integration.lab import Agent, Lab, Node

pytestmark = pytest.mark.lab

FAST = ("--resync-interval", "1")
HEALTH_ADDR = "127.0.0.1:9181"
# The agent retries failed steps with a back-off capped at 30 s (±20 %); nft may hang 5 s on top.
RECOVERY = 45.0

FAKE_NFT = {
    "fails": "#!/bin/sh\necho 'Error: injected failure' >&2\nexit 1\n",
    "hangs": "#!/bin/sh\nexec sleep 20\n",  # bounded: the agent kills it after its nft timeout
    "cannot be executed": "#!/nonexistent/vxlan-net-test/sh\n",  # ENOENT at exec, like a missing binary
}


def vtep_mac(node: Node) -> str:
    return node.ip_json("link", "show", "dev", VTEP)[0]["address"]


def vtep_address(node: Node) -> str:
    return next(a["local"] for a in node.ip_json("addr", "show", "dev", VTEP)[0]["addr_info"])


def tunnels_to(node: Node, peer: Node) -> bool:
    """`node` has the route, neighbour and FDB entry for `peer`'s subnet and VTEP (ip -j, bridge -j)."""
    if not (node.has_link(VTEP) and peer.has_link(VTEP)):
        return False
    gateway, mac = vtep_address(peer), vtep_mac(peer)
    return (gateway in overlay_routes(node).values() and neighbours(node).get(gateway) == mac
            and peer.public_ip in fdb(node).get(mac, []))


def readyz(node: Node) -> tuple[int, list[str]]:
    status, body = http_get(node, f"http://{HEALTH_ADDR}/readyz")
    return status, json.loads(body)["problems"]


def metric(node: Node, name: str) -> float:
    text = http_get(node, f"http://{HEALTH_ADDR}/metrics")[1]
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def warnings_about(agent_log: str, kind: str) -> int:
    return sum(1 for line in agent_log.splitlines() if " WARNING " in line and f": {kind}: " in line)


def fault_metrics(kind: str) -> tuple[str, str]:
    return f'vxlan_net_fault_active{{kind="{kind}"}}', f'vxlan_net_fault_failures_total{{kind="{kind}"}}'


def peer_table(node: Node) -> dict:
    """Our nft table as `nft -j` (the real nft on the test's PATH) lists it: {"set": ..., "chains": [...]}."""
    proc = node.run("nft", "-j", "list", "table", "ip", "vxlan-net")
    if proc.returncode != 0:
        return {}
    items = json.loads(proc.stdout)["nftables"]
    return {"set": next((i["set"] for i in items if "set" in i), {}),
            "chains": [i["chain"]["name"] for i in items if "chain" in i]}


def mount_namespace_of(lab: Lab, agent: Agent) -> list[str]:
    """`nsenter` argv into the agent's own mount namespace, once it has one: a mount made before
    `ip netns exec` unshared it would land in the test's (the machine's) namespace."""
    ours = os.readlink("/proc/self/ns/mnt")
    lab.wait_for(lambda: agent.log_text() and os.readlink(f"/proc/{agent.pid}/ns/mnt") != ours, timeout=10,
                 message="the agent has no mount namespace of its own")
    return ["nsenter", "--target", str(agent.pid), "--mount", "--"]


def start_first_agent(lab: Lab, env: dict[str, str] | None = None) -> Agent:
    """The first node's agent, started before the config exists (so the fault is in place first)."""
    return lab.start_agent(lab.nodes[0], *FAST, "--healthz-addr", HEALTH_ADDR, env=env)


@pytest.mark.parametrize("fault", sorted(FAKE_NFT))
def test_a_broken_nft_is_reported_once_and_retried_while_the_overlay_works(lab, tmp_path, fault):
    lab = lab(nodes=2)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_nft = fake_bin / "nft"
    fake_nft.write_text(FAKE_NFT[fault])
    fake_nft.chmod(0o755)
    node, peer = lab.nodes
    start_first_agent(lab, env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})
    write_config(lab)
    start_agents(lab, [peer], *FAST)
    lab.wait_for(lambda: node_subnet(node), timeout=20, message="the subnet file waited for nft")
    lab.wait_for(lambda: tunnels_to(node, peer) and tunnels_to(peer, node), timeout=20,
                 message="overlay entries not programmed while nft is broken")
    lab.wait_for(lambda: metric(node, fault_metrics("firewall")[1]) >= 3, timeout=RECOVERY,
                 message="nft not retried")
    status, problems = readyz(node)
    assert status == 503 and any(p.startswith("firewall: ") for p in problems), problems
    assert metric(node, fault_metrics("firewall")[0]) == 1
    assert peer_table(node) == {}, "the fake nft must have been the one the agent ran"
    assert node.agent.alive()
    assert warnings_about(node.agent.log_text(), "firewall") == 1, node.agent.log_text()[-3000:]

    fake_nft.unlink()  # the real nft (later on PATH) from now on
    lab.wait_for(lambda: readyz(node)[0] == 200, timeout=RECOVERY, message="no recovery after nft was fixed")
    table = peer_table(node)
    assert "input" in table["chains"] and peer.public_ip in table["set"].get("elem", []), table
    assert metric(node, fault_metrics("firewall")[0]) == 0
    assert "firewall: recovered" in node.agent.log_text()
    assert node.agent.alive() and tunnels_to(node, peer)


def test_a_read_only_subnet_directory_is_retried_while_the_overlay_works(lab):
    lab = lab(nodes=2)
    node, peer = lab.nodes
    run_dir = node.workdir / "run"
    run_dir.mkdir()
    node.subnet_file = run_dir / "subnet.env"  # a directory of its own, under the read-only mount
    agent = start_first_agent(lab)
    # A read-only tmpfs over the directory in the agent's mount namespace only (`ip netns exec`
    # made one for it): root cannot write there, and the test's own view stays writable.
    in_agent_mounts = mount_namespace_of(lab, agent)
    subprocess.run([*in_agent_mounts, "mount", "-t", "tmpfs", "-o", "ro,size=64k", "vxlan-test-ro", str(run_dir)],
                   check=True, timeout=10)
    write_config(lab)
    start_agents(lab, [peer], *FAST)
    lab.wait_for(lambda: tunnels_to(node, peer) and tunnels_to(peer, node), timeout=20,
                 message="overlay entries not programmed while the subnet file cannot be written")
    lab.wait_for(lambda: metric(node, fault_metrics("subnet-file")[1]) >= 3, timeout=RECOVERY,
                 message="subnet file not retried")
    status, problems = readyz(node)
    assert status == 503 and any(p.startswith("subnet-file: ") and "Read-only file system" in p
                                 for p in problems), problems
    assert node_subnet(node) is None
    assert agent.alive()
    assert warnings_about(agent.log_text(), "subnet-file") == 1, agent.log_text()[-3000:]

    subprocess.run([*in_agent_mounts, "umount", str(run_dir)], check=True, timeout=10)
    lab.wait_for(lambda: readyz(node)[0] == 200, timeout=RECOVERY, message="no recovery after the mount went")
    assert node_subnet(node) is not None
    assert vtep_address(node) == str(node_subnet(node).network_address)
    assert metric(node, fault_metrics("subnet-file")[0]) == 0
    assert agent.alive() and tunnels_to(node, peer)


def test_a_taken_health_port_is_bound_once_it_is_free_and_the_agent_runs_meanwhile(lab):
    lab = lab(nodes=2)
    node, peer = lab.nodes
    host, port = HEALTH_ADDR.split(":")
    holder = node.popen(sys.executable, "-c",
                        "import socket, sys, time\n"
                        "s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
                        "print('bound', flush=True); time.sleep(60)\n", host, port,
                        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "bound"
    agent = start_first_agent(lab)
    write_config(lab)
    start_agents(lab, [peer], *FAST)
    lab.wait_for(lambda: node_subnet(node) and tunnels_to(node, peer) and tunnels_to(peer, node), timeout=20,
                 message="overlay entries not programmed while the health port is taken")
    time.sleep(4)  # a few bind attempts (back-off 1, 2, 4 s)
    log = agent.log_text()
    assert agent.alive()
    assert warnings_about(log, "health-server") == 1 and "Address already in use" in log, log[-3000:]

    holder.kill()
    holder.wait(timeout=5)
    lab.wait_for(lambda: node.run("ss", "-Hltn", f"sport = :{port}").stdout.strip(), timeout=RECOVERY,
                 message="the agent did not bind the port once it was free")
    assert readyz(node) == (200, [])
    assert metric(node, fault_metrics("health-server")[1]) >= 2
    assert metric(node, fault_metrics("health-server")[0]) == 0
    assert agent.alive()

