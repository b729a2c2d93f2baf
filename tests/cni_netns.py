"""Throw-away network namespaces and a plugin runner for the CNI tests and benchmark.

The "host" side is a namespace we create: the plugin runs with
its network namespace switched in the child between fork and exec, so
nothing is ever added to the root namespace.
"""

import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cni.agent_socket import socket_path  # noqa: E402
from cni.install import install  # noqa: E402
from cni.netns import setns  # noqa: E402

REFERENCE_DIR = "/usr/lib/cni"
SUBNET_ENV = ("VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=198.19.{n}.1/24\n"
              "VXLAN_NET_MTU={mtu}\nVXLAN_NET_IPMASQ=true\n")
IPV6_SUBNET_ENV = "VXLAN_NET_IPV6_NETWORK=fd19::/56\nVXLAN_NET_IPV6_SUBNET=fd19:0:0:{n:x}::1/64\n"


def require_root():
    """Root tests fail (never skip) when not root: a skipped test must not count as a pass."""
    assert os.geteuid() == 0, "this test needs root (network namespaces); run `make test` as root"


def ip_json(netns, *args):
    out = subprocess.run(["ip", "-j", "-n", netns, *args], check=True, capture_output=True, text=True,
                         timeout=10).stdout
    return json.loads(out or "[]")


def sh(*args, netns=None, check=True):
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


class Netns:
    """A named network namespace `vnc-<role>-<random>`; deleted by `delete()`."""

    def __init__(self, role):
        self.name = f"vnc-{role}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=10)
        self.path = f"/run/netns/{self.name}"

    def delete(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


class CniLab:
    """A host namespace, container namespaces on demand, a subnet file and a data dir."""

    def __init__(self, subnet=3, mtu=1450, ipv4=True, ipv6=False):
        self.tmp = tempfile.mkdtemp(prefix="vnc-")
        self.namespaces = []
        try:
            self.host = self.netns("h")
            self.subnet_file = os.path.join(self.tmp, "subnet.env")
            self.write_subnet(subnet, mtu, ipv4, ipv6)
            self.data_dir = os.path.join(self.tmp, "data")
            self.bin_dir = os.path.join(self.tmp, "bin")
            self.plugin = install(self.bin_dir)
            self._host_fd = os.open(self.host.path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    def write_subnet(self, n=3, mtu=1450, ipv4=True, ipv6=False):
        """Node subnet 198.19.<n>.0/24 and/or fd19:0:0:<n>::/64 (IPv6-only: ipv4=False, ipv6=True)."""
        text = SUBNET_ENV.format(n=n, mtu=mtu)
        if not ipv4:
            text = text.split("\n", 2)[2]
        with open(self.subnet_file, "w") as fh:
            fh.write((IPV6_SUBNET_ENV.format(n=n) if ipv6 else "") + text)

    def netns(self, role="c"):
        ns = Netns(role)
        self.namespaces.append(ns)
        return ns

    def close(self):
        for ns in reversed(self.namespaces):
            ns.delete()
        if getattr(self, "_host_fd", None) is not None:
            os.close(self._host_fd)
            self._host_fd = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def store(self):
        return os.path.join(self.data_dir, "podnet")

    def reserved(self):
        """ip -> file content, as host-local's tools would see the store."""
        if not os.path.isdir(self.store):
            return {}
        out = {}
        for name in os.listdir(self.store):
            if name[0].isdigit() or ":" in name:  # IPv4 or IPv6 reservations
                with open(os.path.join(self.store, name), newline="") as fh:
                    out[name] = fh.read()
        return out

    def conf(self, **extra):
        conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "vxlan-net-cni",
                "subnetFile": self.subnet_file, "dataDir": self.data_dir}
        conf.update(extra)
        return conf

    def in_host(self):
        setns(self._host_fd)

    def run(self, command, conf=None, cid="c1", netns=None, ifname="eth0", plugin=None, env=None, stdin=None,
            timeout=30):
        """Run a plugin in the host namespace; returns (exit code, parsed stdout or None, stderr)."""
        proc = self.spawn(command, conf, cid, netns, ifname, plugin, env)
        data = stdin if stdin is not None else json.dumps(conf if conf is not None else self.conf()).encode()
        out, err = proc.communicate(data, timeout=timeout)
        parsed = json.loads(out) if out.strip() else None
        return proc.returncode, parsed, err.decode(errors="replace")

    def spawn(self, command, conf=None, cid="c1", netns=None, ifname="eth0", plugin=None, env=None):
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
                "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_PATH": f"{self.bin_dir}:{REFERENCE_DIR}",
                "CNI_NETNS": netns.path if isinstance(netns, Netns) else (netns or "")}
        full.update(env or {})
        full = {k: v for k, v in full.items() if v is not None}
        return subprocess.Popen([plugin or self.plugin], env=full, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=self.in_host)

    def links(self, netns=None, kind=None):
        args = ["link", "show"] + (["type", kind] if kind else [])
        return {link["ifname"]: link for link in ip_json((netns or self.host).name, "-d", *args)}

    def addresses(self, netns, ifname, family="inet"):
        """(address, prefix) of `family` ("inet", or "inet6" without link-local ones) on ifname."""
        return [(a["local"], a["prefixlen"]) for link in ip_json(netns.name, "addr", "show", "dev", ifname)
                for a in link.get("addr_info", []) if a.get("family") == family and a.get("scope") != "link"]

    def routes(self, netns, family="-4"):
        return [(r["dst"], r.get("gateway"), r.get("dev")) for r in ip_json(netns.name, family, "route", "show")]

    def wait_link_gone(self, name, timeout):
        """True once the host namespace has no link `name` (a DEL handed it to the agent), False after timeout."""
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            if name not in self.links():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return False


class AgentService:
    """The agent's CNI socket service (`python -m vxlan_net.agent.cni_service`) in the lab's host namespace,
    serving the socket the plugin looks for next to the subnet file; `stop()` returns its log."""

    def __init__(self, lab, log_level="info"):
        self.path = socket_path(lab.subnet_file)
        self.log = ""
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.host.name, sys.executable, "-m", "vxlan_net.agent.cni_service",
             "--socket", self.path, "--log-level", log_level],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        if not ready or not self.proc.stdout.readline().startswith(b"serving"):
            self.stop()
            raise AssertionError(f"the CNI socket service did not start: {self.log}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        self.log = err.decode(errors="replace")
        return self.log
