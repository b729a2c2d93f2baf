"""`vxlan-net inspect` run inside a lab node: live frames, pcap round trip, a forged frame flagged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from integration.cluster import add_pod, node_subnet, running_cluster

pytestmark = pytest.mark.lab

OUTSIDE_IP = "198.18.200.2"

# Sent from the outside host with a plain UDP socket: a VXLAN frame no node would send.
FORGE = """
import socket, sys
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
frame = bytes(VXLAN(vni=42) / Ether(src="02:00:00:00:00:99", dst="02:00:00:00:00:98")
              / IP(src=sys.argv[2], dst=sys.argv[3]) / ICMP())
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    for _ in range(3):
        sock.sendto(frame, (sys.argv[1], 8472))
"""


def without_time(frame: dict) -> dict:
    return {key: value for key, value in frame.items() if key != "time"}


class Inspect:
    """`vxlan-net inspect` started in a namespace; stdout collected, stderr in a file."""

    def __init__(self, lab, ns, tmp_path: Path, *args: str):
        self.stderr_path = tmp_path / f"inspect-{len(list(tmp_path.glob('inspect-*')))}.err"
        self._stderr = open(self.stderr_path, "w")
        self.proc = ns.popen(lab.agent_exe, "inspect", *map(str, args), stdout=subprocess.PIPE,
                             stderr=self._stderr, stdin=subprocess.DEVNULL, text=True)
        lab.wait_for(lambda: "listening on" in self.stderr() or self.proc.poll() is not None, timeout=15,
                     message="inspect did not start listening")
        assert self.proc.poll() is None, self.stderr()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def lines(self, timeout: float = 15) -> list[str]:
        out, _ = self.proc.communicate(timeout=timeout)
        self._stderr.close()
        assert self.proc.returncode == 0, self.stderr()
        return out.splitlines()


def test_inspect_on_a_node_shows_pod_frames_with_nodes_and_flags_a_forged_frame(lab, tmp_path):
    lab = lab(nodes=2)
    nodes = running_cluster(lab)
    pod_a, pod_b = add_pod(lab, nodes[0], 1), add_pod(lab, nodes[1], 1)
    node_1, node_2 = nodes[0].public_ip, nodes[1].public_ip
    subnet_1, subnet_2 = str(node_subnet(nodes[0])), str(node_subnet(nodes[1]))
    pcap = tmp_path / "frames.pcap"

    inspect = Inspect(lab, nodes[0], tmp_path, "--iface", "ul0", "--count", 4, "--timeout", 15, "--json",
                      "--filter", f"pod {pod_b.ip}", "--write", pcap, "--etcd-endpoints", lab.etcd_url)
    assert pod_a.ping(pod_b.ip, count=2, timeout=3)
    frames = [json.loads(line) for line in inspect.lines()]
    assert len(frames) == 4, inspect.stderr()
    assert {(f["outer_src"], f["outer_dst"]) for f in frames} == {(node_1, node_2), (node_2, node_1)}
    assert {f["vni"] for f in frames} == {1} and {f["outer_dport"] for f in frames} == {8472}
    assert {(f["inner_src"], f["inner_dst"]) for f in frames} == {(pod_a.ip, pod_b.ip), (pod_b.ip, pod_a.ip)}
    assert {f["icmp_type"] for f in frames} == {8, 0}
    resolved = {(f["outer_src"], f["outer_src_subnet"], f["inner_src"], f["inner_src_node"]) for f in frames}
    assert resolved == {(node_1, subnet_1, pod_a.ip, node_1), (node_2, subnet_2, pod_b.ip, node_2)}
    assert all(f["anomalies"] == [] for f in frames)
    assert inspect.stderr().count("2 nodes known from etcd") == 1

    # tcpdump reads what --write wrote, and --read decodes the same frames again
    dumped = subprocess.run(["tcpdump", "-nn", "-r", str(pcap), "udp dst port 8472"], capture_output=True,
                            text=True, timeout=10, check=True).stdout
    assert dumped.count(f"{node_1}.") == 4 and dumped.count(f"> {pod_b.ip}: ICMP echo request") == 2
    again = nodes[0].run(lab.agent_exe, "inspect", "--read", pcap, "--json", "--etcd-endpoints", lab.etcd_url,
                         check=True)
    reread = [json.loads(line) for line in again.stdout.splitlines()]
    assert [without_time(f) for f in reread] == [without_time(f) for f in frames]
    assert all(abs(r["time"] - f["time"]) < 1e-5 for r, f in zip(reread, frames))  # pcap keeps microseconds

    # a frame from a host that is no node, with a VNI that is not ours, is flagged
    inspect = Inspect(lab, nodes[0], tmp_path, "--iface", "ul0", "--count", 1, "--timeout", 15,
                      "--filter", f"node {OUTSIDE_IP}", "--etcd-endpoints", lab.etcd_url)
    lab.outside.run(sys.executable, "-c", FORGE, node_1, pod_a.ip, pod_b.ip, check=True)
    [line] = inspect.lines()
    assert f"{OUTSIDE_IP} > {node_1}[{subnet_1}] vni 42 |" in line
    assert f"{pod_a.ip} > {pod_b.ip} icmp echo-request" in line
    assert "foreign-vni: VNI 42 is not ours (1)" in line and f"unknown-outer-src: outer source {OUTSIDE_IP}" in line


def _one_frame_pcap(path: Path) -> None:
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import wrpcap

    wrpcap(str(path), [Ether() / IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=40000, dport=8472)
                       / VXLAN(vni=1) / Ether() / IP(src="198.19.5.2", dst="198.19.9.2") / ICMP()])


def test_inspect_without_etcd_still_decodes_and_bad_input_exits_2(lab, tmp_path):
    lab = lab(nodes=1, etcd=False)
    node = lab.nodes[0]
    pcap, junk = tmp_path / "one.pcap", tmp_path / "junk.pcap"
    _one_frame_pcap(pcap)
    junk.write_text("not a capture\n")
    no_etcd = ("--etcd-endpoints", "http://127.0.0.1:9")

    read = node.run(lab.agent_exe, "inspect", "--read", pcap, "--json", *no_etcd)
    assert read.returncode == 0, read.stderr
    [frame] = [json.loads(line) for line in read.stdout.splitlines()]
    assert (frame["outer_src"], frame["inner_dst"], frame["vni"], frame["outer_src_subnet"]) == (
        "198.18.1.2", "198.19.9.2", 1, None)
    assert read.stderr.count("etcd not usable") == 1

    idle = node.run(lab.agent_exe, "inspect", "--iface", "ul0", "--timeout", 1, *no_etcd)
    assert idle.returncode == 0 and idle.stdout == "" and "0 frames" in idle.stderr

    for args, said in [(("--read", junk), "--read"), (("--read", tmp_path / "missing.pcap"), "--read"),
                       (("--iface", "eth9"), "no interface 'eth9'"),
                       (("--iface", "ul0", "--filter", "host ("), "--filter"),
                       (("--iface", "ul0", "--filter", "pod 198.19"), "--filter")]:
        bad = node.run(lab.agent_exe, "inspect", *args, "--timeout", 1, *no_etcd)
        assert bad.returncode == 2 and bad.stdout == "", (args, bad.stderr)
        assert said in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
