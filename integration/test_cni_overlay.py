"""vxlan-net-cni on a multi-node lab: pods the plugin wires, on different nodes, reach each other over VXLAN."""

from __future__ import annotations

import json
import os
import secrets
import subprocess

import pytest

from cni.install import install
from integration.cluster import node_subnet, running_cluster
from integration.cni_pods import run_plugin

pytestmark = pytest.mark.lab


def test_pods_added_by_the_plugin_reach_each_other_across_nodes(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, "--resync-interval", "2")
    plugin = install(str(lab.workdir / "cni-bin"))
    pods = []
    try:
        for node in nodes:
            name = f"vnc-pod-{secrets.token_hex(3)}"
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
            pods.append(name)
            conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "vxlan-net-cni",
                    "subnetFile": str(node.subnet_file), "dataDir": str(node.workdir / "cni")}
            result = run_plugin(plugin, node, "ADD", conf, name, f"/run/netns/{name}")
            address = result["ips"][0]["address"]
            assert address.split("/")[0] in [str(h) for h in node_subnet(node).hosts()]
        ips = [json.loads(subprocess.run(["ip", "-j", "-n", p, "addr", "show", "dev", "eth0"], check=True,
                                         capture_output=True, timeout=10).stdout)[0]["addr_info"] for p in pods]
        ips = [next(a["local"] for a in info if a["family"] == "inet") for info in ips]
        for src, dst in ((pods[0], ips[1]), (pods[1], ips[0])):
            ping = subprocess.run(["ip", "netns", "exec", src, "ping", "-c", "2", "-W", "3", dst],
                                  capture_output=True, text=True, timeout=20)
            assert ping.returncode == 0, ping.stdout + ping.stderr
        for node, name in zip(nodes, pods):
            conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "vxlan-net-cni",
                    "subnetFile": str(node.subnet_file), "dataDir": str(node.workdir / "cni")}
            run_plugin(plugin, node, "DEL", conf, name, f"/run/netns/{name}")
            assert [f for f in os.listdir(node.workdir / "cni" / "podnet") if f[0].isdigit()] == []
    finally:
        for name in pods:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
