"""podman (CNI backend) on two lab nodes runs containers through vxlan-net-cni; they ping across the overlay.

podman runs with each node's namespace as its host (`nsenter --net`), its own
storage, tmp dir and CNI config dir, and an image imported from a local
busybox rootfs (no registry here); runc (cgroupfs) because crun refuses
this machine's hybrid cgroup v1/v2 mounts. `make test` must install `podman` and
`busybox-static` and `runc`; without them this test fails (it never skips).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from cni.install import install
from cni.subnet_file import write as write_subnet_file
from integration.cluster import running_cluster

pytestmark = pytest.mark.lab

IMAGE = "localhost/vnc-busybox:latest"
APPLETS = ("sh", "sleep", "ping", "ip", "cat", "ls")


def build_rootfs_tar(workdir: Path) -> Path:
    busybox = shutil.which("busybox")
    assert busybox, "busybox missing: apt-get install busybox-static (make test should)"
    tar_path = workdir / "rootfs.tar"
    root = workdir / "rootfs"
    (root / "bin").mkdir(parents=True)
    for name in ("etc", "tmp", "proc", "sys", "dev"):
        (root / name).mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(root, arcname=".")
    return tar_path


class NodePodman:
    """podman bound to one lab node: its netns, storage, state and CNI config."""

    def __init__(self, lab, node, plugin_dir: str):
        self.node = node
        self.dir = node.workdir / "podman"
        netd = self.dir / "net.d"
        netd.mkdir(parents=True)
        self.data_dir = node.workdir / "cni-data"
        conflist = {"cniVersion": "1.0.0", "name": "podnet", "plugins": [
            {"type": "vxlan-net-cni", "subnetFile": str(node.subnet_file), "dataDir": str(self.data_dir)}]}
        (netd / "podnet.conflist").write_text(json.dumps(conflist))
        self.conf = self.dir / "containers.conf"
        self.conf.write_text(
            "[network]\nnetwork_backend = \"cni\"\n"
            f"cni_plugin_dirs = [\"{plugin_dir}\", \"/usr/lib/cni\"]\n"
            f"network_config_dir = \"{netd}\"\n"
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n"
            f"events_logfile_path = \"{self.dir / 'events.log'}\"\n")

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = ["nsenter", f"--net=/run/netns/{self.node.name}", "podman",
                "--root", str(self.dir / "storage"), "--runroot", str(self.dir / "run"),
                "--tmpdir", str(self.dir / "tmp"), "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                *args]
        env = dict(os.environ, CONTAINERS_CONF=str(self.conf))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if check:
            assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc

    def reserved(self):
        folder = self.data_dir / "podnet"
        return sorted(f for f in os.listdir(folder) if f[0].isdigit() or ":" in f) if folder.is_dir() else []


def test_podman_containers_on_two_nodes_ping_each_other(lab):
    assert shutil.which("podman"), "podman missing: apt-get install podman (make test should)"
    lab = lab(nodes=2)
    nodes = running_cluster(lab, "--resync-interval", "2")
    plugin_dir = str(lab.workdir / "cni-bin")
    install(plugin_dir)
    tar_path = build_rootfs_tar(lab.workdir)
    podmans = [NodePodman(lab, node, plugin_dir) for node in nodes]
    try:
        ips = []
        for i, pm in enumerate(podmans):
            pm.run("import", str(tar_path), IMAGE)
            pm.run("run", "-d", "--name", f"c{i}", "--network", "podnet", "--cap-add", "NET_RAW", "--runtime", "runc",
                   "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", IMAGE, "sleep", "600")
            ip = pm.run("inspect", "-f", "{{.NetworkSettings.Networks.podnet.IPAddress}}", f"c{i}").stdout.strip()
            subnet = nodes[i].subnet_env()["VXLAN_NET_SUBNET"].rsplit(".", 1)[0]
            assert ip.startswith(subnet + "."), (ip, subnet)
            assert pm.reserved() == [ip]
            ips.append(ip)
        for i, pm in enumerate(podmans):
            other = ips[1 - i]
            ping = pm.run("exec", f"c{i}", "ping", "-c", "2", "-W", "3", other, check=False, timeout=30)
            assert ping.returncode == 0, ping.stdout + ping.stderr
        for i, pm in enumerate(podmans):
            pm.run("rm", "-f", "-t", "0", f"c{i}")
            assert pm.reserved() == [], "podman rm must release the address (CNI DEL)"
            ports = [link["ifname"] for link in nodes[i].ip_json("link", "show", "master", "cni0")]
            assert ports == []
    finally:
        for pm in podmans:
            pm.run("rm", "-a", "-f", "-t", "0", check=False)


def test_podman_drives_a_dual_stack_conflist_and_removal_releases_both_addresses(lab):
    """Issue 11, proof 7: the node's subnet file has both families (written with the agent's own writer,
    by hand: the plugin's side needs no agent); podman's containers get an IPv4 and an IPv6 address,
    reach each other over IPv6 on the node's bridge, and `podman rm` (CNI DEL) releases both."""
    assert shutil.which("podman"), "podman missing: apt-get install podman (make test should)"
    lab = lab(nodes=1, etcd=False)
    [node] = lab.nodes
    write_subnet_file(node.subnet_file, "198.19.0.0/16", "198.19.7.0/24", 1450, False,
                      ipv6_network="fd19::/56", ipv6_subnet="fd19:0:0:7::/64")
    plugin_dir = str(lab.workdir / "cni-bin")
    install(plugin_dir)
    pm = NodePodman(lab, node, plugin_dir)
    try:
        pm.run("import", str(build_rootfs_tar(lab.workdir)), IMAGE)
        addresses = []
        for i in range(2):
            pm.run("run", "-d", "--name", f"d{i}", "--network", "podnet", "--cap-add", "NET_RAW", "--runtime",
                   "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", IMAGE, "sleep", "600")
            net = "{{.NetworkSettings.Networks.podnet"
            fmt = f"{net}.IPAddress}}}} {net}.GlobalIPv6Address}}}}"
            v4, v6 = pm.run("inspect", "-f", fmt, f"d{i}").stdout.split()
            assert (v4, v6) == (f"198.19.7.{i + 2}", f"fd19:0:0:7::{i + 2}")
            inside = pm.run("exec", f"d{i}", "ip", "-6", "route", "show", "default").stdout
            assert "via fd19:0:0:7::1 dev eth0" in inside, inside
            addresses += [v4, v6]
        assert pm.reserved() == sorted(addresses)
        ping = pm.run("exec", "d0", "ping", "-6", "-c", "2", "-W", "3", "fd19:0:0:7::3", check=False, timeout=30)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        for i in range(2):
            pm.run("rm", "-f", "-t", "0", f"d{i}")
        assert pm.reserved() == [], "podman rm must release both addresses (CNI DEL)"
        assert node.ip_json("link", "show", "master", "cni0") == []
    finally:
        pm.run("rm", "-a", "-f", "-t", "0", check=False)
