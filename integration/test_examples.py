"""The example conflist (vxlan-net-cni, then portmap), installed as the image installs it, wires lab pods
that reach each other across nodes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from integration.cluster import node_subnet, running_cluster
from integration.lab import Netns
from vxlan_net.tools.install_cni import main as install_cni

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from cni_client import ConflistRunner  # noqa: E402  (the tests' tiny CNI runtime)

pytestmark = pytest.mark.lab

REFERENCE_PLUGINS = "/usr/lib/cni"
HOST_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def node_conflist(node) -> dict:
    """examples/cni/10-vxlan-net.conflist, with the node's subnet file and data dir (the lab's nodes share a disk)."""
    conflist = json.loads((node.workdir / "cni-conf" / "10-vxlan-net.conflist").read_text())
    conflist["plugins"][0].update(subnetFile=str(node.subnet_file), dataDir=str(node.workdir / "cni"))
    return conflist


def in_netns(name: str):
    def enter() -> None:
        from cni.netns import setns

        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(fd)
        finally:
            os.close(fd)
    return enter


def test_example_conflist_gives_pods_that_reach_pods_on_other_nodes(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, "--resync-interval", "2")
    bin_dir = lab.workdir / "opt-cni-bin"
    for node in nodes:  # what the DaemonSet's init container does on each node
        assert install_cni(["--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(node.workdir / "cni-conf"),
                            "--conflist", str(ROOT / "examples" / "cni" / "10-vxlan-net.conflist"),
                            "--copy-plugin", "--host-python", HOST_PYTHON]) == 0
    cni_path = f"{bin_dir}:{REFERENCE_PLUGINS}"
    assert os.access(f"{REFERENCE_PLUGINS}/portmap", os.X_OK), "apt-get install containernetworking-plugins"

    pods = []
    for i, node in enumerate(nodes, 1):
        name = f"{lab.prefix}p-ex{i}"
        lab._add_netns(name)  # recorded by the lab: deleted on close even if DEL never runs
        runner = ConflistRunner(node_conflist(node), cni_path, preexec_fn=in_netns(node.name))
        runtime = {"portMappings": [{"hostPort": 18080 + i, "containerPort": 80, "protocol": "tcp"}]}
        result = runner.add(name, f"/run/netns/{name}", runtime_config=runtime,
                            args="IgnoreUnknown=1;K8S_POD_NAME=ex;K8S_POD_NAMESPACE=default")
        address = result["ips"][0]["address"].split("/")[0]
        assert address in {str(h) for h in node_subnet(node).hosts()}
        assert (node.workdir / "cni" / "vxlan-net" / address).exists()  # the plugin's reservation
        pods.append((node, name, address, runner, result, runtime))

    # portmap ran after our plugin: its DNAT to the pod is in the node's own namespace
    for node, _, address, *_ in pods:
        nat = node.run("iptables-save", "-t", "nat", check=True).stdout
        assert f"{address}:80" in nat, nat

    (_, ns1, ip1, *_), (_, ns2, ip2, *_) = pods
    for src, dst in ((ns1, ip2), (ns2, ip1)):
        ping = Netns(lab, src).ping(dst, count=2, timeout=3)
        assert ping.ok, ping.output

    for node, name, address, runner, result, runtime in pods:
        runner.delete(result, name, f"/run/netns/{name}", runtime_config=runtime,
                      args="IgnoreUnknown=1;K8S_POD_NAME=ex;K8S_POD_NAMESPACE=default")
        assert not (node.workdir / "cni" / "vxlan-net" / address).exists()
        assert f"{address}:80" not in node.run("iptables-save", "-t", "nat", check=True).stdout
