"""Pods wired by the vxlan-net CNI plugin in the lab, as a runtime would: ADD on creation, DEL on removal.

The plugin runs with the node's namespace as its host side and a per-node data dir; the pod
namespace is the lab's (named like its other pods), so the lab deletes it even when DEL fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from typing import Any, Callable, Optional

from integration.lab import Lab, LabError, Node, Pod

NETWORK_NAME = "podnet"
PLUGIN_TIMEOUT = 30.0


def plugin_env(command: str, cid: str, netns: str = "") -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}


def run_plugin(plugin: str, node: Node, command: str, conf: dict, cid: str, netns: str = "") -> Optional[dict]:
    """The plugin with the node's namespace as its host side; its JSON answer (None if it printed none)."""
    from cni.netns import setns  # only the lab side needs it

    fd = os.open(f"/run/netns/{node.name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        proc = subprocess.run([plugin], input=json.dumps(conf).encode(), env=plugin_env(command, cid, netns),
                              capture_output=True, timeout=PLUGIN_TIMEOUT, preexec_fn=lambda: setns(fd))
    finally:
        os.close(fd)
    assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def plugin_conf(node: Node) -> dict:
    """The network config a runtime on `node` would pass: the node's subnet file, a per-node data dir."""
    return {"cniVersion": "1.0.0", "name": NETWORK_NAME, "type": "vxlan-net-cni",
            "subnetFile": str(node.subnet_file), "dataDir": str(node.workdir / "cni")}


def install_plugin(lab: Lab) -> str:
    """The plugin's fast launcher in `<lab.workdir>/cni-bin`, installed once per lab."""
    path = lab.__dict__.get("_cni_plugin")
    if path is None:
        from cni.install import install

        path = lab._cni_plugin = install(str(lab.workdir / "cni-bin"))
    return path


class CniPod(Pod):
    """A lab pod whose `eth0`, address and routes come from the plugin's ADD result."""

    def __init__(self, lab: Lab, name: str, node: Node, pod_name: str, interface: Optional[ipaddress.IPv4Interface],
                 gateway: Optional[str], host_ifname: str, plugin: str, result: dict,
                 interface6: Optional[ipaddress.IPv6Interface] = None, gateway6: Optional[str] = None):
        super().__init__(lab, name, node, pod_name, interface, gateway, host_ifname, interface6, gateway6)
        self.plugin = plugin
        self.result = result
        self.deleted = False

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.name}"

    def delete(self) -> None:
        """DEL through the plugin, then the namespace; safe to call twice."""
        if self.deleted:
            return
        self.deleted = True
        try:
            run_plugin(self.plugin, self.node, "DEL", plugin_conf(self.node), self.name, self.netns_path)
        finally:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=PLUGIN_TIMEOUT)
            self.lab.pods.pop(self.pod_name, None)


def add_pod_via_cni(lab: Lab, node: Node, name: str) -> CniPod:
    """A pod named `name` on `node`, wired by vxlan-net-cni ADD; DEL and the namespace go with the lab."""
    if name in lab.pods:
        raise LabError(f"pod {name} exists")
    plugin = install_plugin(lab)
    netns = f"{lab.prefix}p-{name}"
    lab._add_netns(netns)  # recorded by the lab: deleted on close even if DEL never runs
    result = run_plugin(plugin, node, "ADD", plugin_conf(node), netns, f"/run/netns/{netns}")
    # one address per family the subnet file has (dual-stack: IPv4 and IPv6)
    ips = {ipaddress.ip_interface(ip["address"]).version: ip for ip in result["ips"]}
    v4, v6 = ips.get(4), ips.get(6)
    # interfaces: [bridge, host veth, pod eth0 (with "sandbox")]
    host_ifs = [i["name"] for i in result.get("interfaces", []) if "sandbox" not in i]
    host_if = host_ifs[-1] if len(host_ifs) > 1 else ""
    pod = CniPod(lab, netns, node, name, ipaddress.IPv4Interface(v4["address"]) if v4 else None,
                 v4.get("gateway", "") if v4 else None, host_if, plugin, result,
                 ipaddress.IPv6Interface(v6["address"]) if v6 else None, v6.get("gateway") if v6 else None)
    lab.pods[name] = pod
    _on_close(lab, pod.delete)
    return pod


def _on_close(lab: Lab, cleanup: Callable[[], Any]) -> None:
    """Runs `cleanup` when the lab closes, before its processes and namespaces go (errors ignored:
    the namespaces are deleted regardless, and a leak still fails the lab's own check)."""
    cleanups = lab.__dict__.get("_cni_cleanups")
    if cleanups is None:
        cleanups = lab._cni_cleanups = []
        close = lab.close

        def close_after_cleanups() -> None:
            if not lab._closed:
                for fn in reversed(cleanups):
                    try:
                        fn()
                    except Exception:  # noqa: BLE001 - the namespace goes with the lab anyway
                        pass
            close()

        lab.close = close_after_cleanups
    cleanups.append(cleanup)
