"""A multi-node cluster in network namespaces: router, etcd host, nodes, outside host, pods.

Used by the integration tests, the benchmarks and ``make demo``. Nothing is added to the
root network namespace; every namespace carries the lab's random tag and is deleted on exit.
"""

from __future__ import annotations

import atexit
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from integration.etcd_server import ETCDCTL_EXE, EtcdServer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_AGENT_EXE = os.environ.get("VXLAN_NET_AGENT_EXE", str(REPO / ".venv" / "bin" / "vxlan-net"))

# Address plan (all inside 198.18.0.0/15): 198.18.0.0/24 etcd segment, 198.18.<i>.0/24 node i
# (1..199), 198.18.200.0/24 the outside host. The router is .1 on every segment, the host .2.
# An IPv6 underlay (``underlay="dual"`` or ``"v6"``) adds fd18:0:0:<i>::/64 per segment, the same
# <i> written as the group's digits (router ::1, host ::2); IPv6 pods live in fd19::/16.
UNDERLAY_MTU = 1500
UNDERLAY_IFNAME = "ul0"
ETCD_SEGMENT = 0
OUTSIDE_SEGMENT = 200
MAX_NODES = OUTSIDE_SEGMENT - 1
UNDERLAYS = ("v4", "dual", "v6")
POD_RANGE6 = ipaddress.IPv6Network("fd19::/16")
RUN_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
_POD_NAME = re.compile(r"^[A-Za-z0-9_-]{1,24}$")


def _segment(index: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"198.18.{index}.0/24")


def _host(index: int, host: int) -> str:
    return str(_segment(index).network_address + host)


def _segment6(index: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(f"fd18:0:0:{index}::/64")


def _host6(index: int, host: int) -> str:
    return str(_segment6(index).network_address + host)


def _is_ipv6(ip: str) -> bool:
    return ipaddress.ip_address(ip).version == 6


def _sh(cmd: Sequence[str], *, timeout: float = RUN_TIMEOUT, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Runs a command with a bounded timeout; on failure the error names command and stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _argv(cmd: tuple) -> list[str]:
    """Accepts run("ip", "link"), run(["ip", "link"]) and run("ip link")."""
    if len(cmd) == 1 and isinstance(cmd[0], (list, tuple)):
        cmd = tuple(cmd[0])
    if len(cmd) == 1 and isinstance(cmd[0], str) and " " in cmd[0]:
        return shlex.split(cmd[0])
    return [str(c) for c in cmd]


def _stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT,
                  sig: int = signal.SIGTERM) -> int | None:
    """Signals one process we started (by its PID), waits bounded, then SIGKILLs."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=timeout)
    except ProcessLookupError:
        return proc.poll()


class LabError(RuntimeError):
    """The lab could not be built or a lab command failed."""


@dataclass(frozen=True)
class PingResult:
    """Truthy when at least one reply came back; carries the rtt (ms) and TTL of the first."""

    ok: bool
    rtt_ms: float | None
    ttl: int | None
    output: str

    def __bool__(self) -> bool:
        return self.ok


class Netns:
    """One network namespace of the lab, addressed by name with ``ip -n`` / ``ip netns exec``."""

    def __init__(self, lab: "Lab", name: str):
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def argv(self, *cmd: Any) -> list[str]:
        return ["ip", "netns", "exec", self.name, *_argv(cmd)]

    def run(self, *cmd: Any, timeout: float = RUN_TIMEOUT, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Runs a command inside the namespace; text output captured, bounded by ``timeout``."""
        return _sh(self.argv(*cmd), timeout=timeout, check=check, input=input)

    def popen(self, *cmd: Any, **kwargs: Any) -> subprocess.Popen:
        """Starts a command inside the namespace; the lab stops it (by PID) on exit."""
        proc = subprocess.Popen(self.argv(*cmd), **kwargs)
        self.lab._processes.append(proc)
        return proc

    def ip_json(self, *args: str) -> Any:
        """``ip -j -n <ns> <args>`` parsed, e.g. ``ns.ip_json("route", "get", "198.18.2.2")``."""
        out = _sh(["ip", "-j", "-n", self.name, *args]).stdout
        return json.loads(out) if out.strip() else []

    def has_link(self, ifname: str) -> bool:
        return self.run("ip", "link", "show", "dev", ifname).returncode == 0

    def ip_batch(self, lines: Iterable[str]) -> None:
        _sh(["ip", "-n", self.name, "-batch", "-"], input="\n".join(lines) + "\n")

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-q", "-w", f"{key}={value}", check=True)

    def ping(self, ip: str, count: int = 1, timeout: float = 2.0, *, size: int | None = None,
             dont_fragment: bool = False, interval: float = 0.2) -> PingResult:
        """``ping`` from this namespace, bounded by ``count`` and ``timeout`` (seconds); an IPv6
        address is pinged with ``ping -6`` (the reply's hop limit is reported as ``ttl``)."""
        # -c with -W (not -w): exactly ``count`` requests, also when no reply comes.
        deadline = timeout + interval * (count - 1)
        family = ["-6"] if _is_ipv6(str(ip)) else []
        cmd = ["ping", *family, "-n", "-c", str(count), "-i", str(interval), "-W", str(timeout)]
        if size is not None:
            cmd += ["-s", str(size)]
        if dont_fragment:
            cmd += ["-M", "do"]
        proc = self.run(*cmd, str(ip), timeout=deadline + 5)
        reply = re.search(r"ttl=(\d+) time=([\d.]+) ms", proc.stdout)
        return PingResult(
            ok=proc.returncode == 0 and reply is not None,
            rtt_ms=float(reply.group(2)) if reply else None,
            ttl=int(reply.group(1)) if reply else None,
            output=proc.stdout + proc.stderr,
        )

    def ping6(self, ip: str, count: int = 1, timeout: float = 2.0, **kwargs: Any) -> PingResult:
        """``ping -6``; refuses an IPv4 address rather than silently pinging over IPv4."""
        if not _is_ipv6(str(ip)):
            raise ValueError(f"ping6: {ip} is not an IPv6 address")
        return self.ping(ip, count, timeout, **kwargs)


class Router(Netns):
    """Forwards between every segment; the only path between nodes, etcd and outside."""

    def ip_on(self, segment: int) -> str:
        return _host(segment, 1)

    def ip6_on(self, segment: int) -> str:
        return _host6(segment, 1)


class Host(Netns):
    """A single-homed namespace on its own /24 behind the router (node, etcd host, outside), or with
    others on one shared L2 segment (``host`` > 2: the second, third ... host there)."""

    def __init__(self, lab: "Lab", name: str, segment: int, host: int = 2):
        super().__init__(lab, name)
        self.segment = segment
        # None for a family the lab's underlay does not have (no IPv4 with "v6", no IPv6 with "v4").
        has4, has6 = lab.underlay != "v6", lab.underlay != "v4"
        self.subnet = _segment(segment) if has4 else None
        self.public_ip = _host(segment, host) if has4 else None
        self.gateway = _host(segment, 1) if has4 else None
        self.subnet6 = _segment6(segment) if has6 else None
        self.public_ipv6 = _host6(segment, host) if has6 else None
        self.gateway6 = _host6(segment, 1) if has6 else None
        self.underlay_ifname = UNDERLAY_IFNAME
        # The router's end of this host's link (capture there to see this host's traffic).
        self.router_ifname = {ETCD_SEGMENT: "to-etcd", OUTSIDE_SEGMENT: "to-out"}.get(
            segment, f"to-n{segment}")


class Node(Host):
    """A cluster node. ``index`` is 1-based; ``lab.nodes[0]`` is node 1 on 198.18.1.0/24."""

    def __init__(self, lab: "Lab", name: str, index: int, workdir: Path, segment: int | None = None,
                 host: int = 2):
        super().__init__(lab, name, segment=index if segment is None else segment, host=host)
        self.router_ifname = f"to-n{index}"
        self.index = index
        self.workdir = workdir
        self.subnet_file = workdir / "subnet.env"
        self.state_dir = workdir / "state"
        self.agent_log = workdir / "agent.log"
        self.agent: Agent | None = None

    @property
    def underlay_ipv6(self) -> str | None:
        """The node's fd18 underlay address (None in an IPv4-only lab)."""
        return self.public_ipv6

    def subnet_env(self) -> dict[str, str]:
        """The agent's subnet file (``VXLAN_NET_SUBNET=...`` lines) as a dict; {} if absent."""
        try:
            text = self.subnet_file.read_text()
        except FileNotFoundError:
            return {}
        return dict(line.split("=", 1) for line in text.split() if "=" in line)


class Pod(Netns):
    """A pod namespace whose ``eth0`` is a veth into the node's ``cni0`` bridge."""

    def __init__(self, lab: "Lab", name: str, node: Node, pod_name: str,
                 interface: ipaddress.IPv4Interface | None, gateway: str | None, host_ifname: str,
                 interface6: ipaddress.IPv6Interface | None = None, gateway6: str | None = None):
        super().__init__(lab, name)
        self.node = node
        self.pod_name = pod_name
        self.interface = interface
        self.ip = str(interface.ip) if interface is not None else None
        self.gateway = gateway
        self.interface6 = interface6
        self.ip6 = str(interface6.ip) if interface6 is not None else None
        self.gateway6 = gateway6
        self.ifname = "eth0"
        self.host_ifname = host_ifname


@dataclass(eq=False)
class Agent:
    """One ``vxlan-net agent`` process started by the lab inside a node namespace."""

    node: Node
    proc: subprocess.Popen
    argv: list[str]
    log_offset: int  # where this start's output begins in ``node.agent_log``

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status."""
        return _stop_process(self.proc, timeout)

    def kill(self) -> int | None:
        return _stop_process(self.proc, STOP_TIMEOUT, signal.SIGKILL)

    def log_text(self) -> str:
        """What this agent wrote to stdout/stderr (the node's log, from this start on)."""
        try:
            with open(self.node.agent_log, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


EtcdFactory = Callable[["Lab"], Any]


def lab_etcd(lab: "Lab") -> EtcdServer:
    """The default etcd: started in the lab's etcd namespace, listening on its lab address
    (its IPv6 one in an IPv6-only lab)."""
    etcd_dir = lab.workdir / "etcd"
    return EtcdServer(host=lab.etcd_host.public_ip or lab.etcd_host.public_ipv6, netns=lab.etcd_host.name,
                      data_dir=etcd_dir / "data", log_path=etcd_dir / "etcd.log").start()


class Capture:
    """A background tcpdump in a lab namespace, bounded by packet count and time."""

    def __init__(self, ns: Netns, pcap_path: Path, iface: str, bpf: str, count: int,
                 timeout: float):
        self.ns = ns
        self.pcap_path = pcap_path
        self.deadline = time.monotonic() + timeout
        cmd = ["tcpdump", "-Z", "root", "-i", iface, "-nn", "-U", "-c", str(count),
               "-w", str(pcap_path), *shlex.split(bpf)]
        self._stderr_path = pcap_path.with_suffix(".log")
        self._stderr = open(self._stderr_path, "wb")
        self.proc = ns.popen(*cmd, stdout=subprocess.DEVNULL, stderr=self._stderr,
                             stdin=subprocess.DEVNULL)
        self._wait_listening(min(timeout, 5.0))

    def _wait_listening(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 1):
            if b"listening on" in self._stderr_path.read_bytes():
                return
            if self.proc.poll() is not None or time.monotonic() > end:
                break
            time.sleep(0.02)
        self.stop()
        raise LabError(f"tcpdump in {self.ns.name} did not start: "
                       f"{self._stderr_path.read_text(errors='replace').strip()}")

    def wait(self) -> "Capture":
        """Waits until ``count`` packets were seen or the time is up, then stops tcpdump."""
        remaining = self.deadline - time.monotonic()
        try:
            self.proc.wait(timeout=max(0.0, remaining))
        except subprocess.TimeoutExpired:
            pass
        return self.stop()

    def stop(self) -> "Capture":
        _stop_process(self.proc, STOP_TIMEOUT, signal.SIGINT)
        self._stderr.close()
        return self

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def lines(self, *tcpdump_args: str) -> list[str]:
        """The packets as tcpdump prints them (``-nn -e`` plus any extra arguments)."""
        self.stop()
        if not self.pcap_path.exists() or self.pcap_path.stat().st_size == 0:
            return []
        out = _sh(["tcpdump", "-nn", "-e", *tcpdump_args, "-r", str(self.pcap_path)]).stdout
        return [line for line in out.splitlines() if line.strip()]

    def packets(self) -> list:
        """The packets decoded by scapy (UDP 8472 is decoded as VXLAN)."""
        self.stop()
        # Slow imports, only when asked for; the layer modules register the link types.
        import scapy.layers.inet  # noqa: F401
        import scapy.layers.inet6  # noqa: F401
        import scapy.layers.l2  # noqa: F401
        import scapy.layers.vxlan  # noqa: F401
        from scapy.utils import rdpcap

        if not self.pcap_path.exists() or self.pcap_path.stat().st_size == 0:
            return []
        return list(rdpcap(str(self.pcap_path)))


class Lab:
    """``with Lab(nodes=3) as lab:`` builds the topology; leaving the block tears it all down.

    Topology: router ``vxl-<tag>-r``; etcd host ``vxl-<tag>-e`` (198.18.0.2); node i
    ``vxl-<tag>-n<i>`` (198.18.i.2/24, i = 1..N); outside host ``vxl-<tag>-o``
    (198.18.200.2); pods ``vxl-<tag>-p-<name>``. Hosts reach each other only via the router,
    except nodes put on one L2 segment with ``shared_segments=[(1, 2)]``: those share the first
    one's 198.18.<first>.0/24 (.2, .3, ... in the order given), on a bridge ``sw<first>`` in the
    router's namespace that holds the router's .1.

    ``underlay``: "v4" (the above), "dual" (every segment also gets fd18:0:0:<i>::/64, router
    ::1, hosts ::2, ::3 ...; IPv6 default routes via ::1; the router forwards IPv6) or "v6"
    (only the IPv6 addresses; etcd listens on its IPv6 one). Addresses are added ``nodad``
    and DAD is off, so nothing waits for it. ``pod_network6`` (e.g. "fd19::/56") gives the
    helper pods an IPv6 address too; ``pod_network=None`` leaves them without IPv4.
    """

    def __init__(self, nodes: int = 3, pods_per_node: int = 0, tag: str | None = None,
                 etcd: bool | EtcdFactory = True, *, agent_exe: str | None = None,
                 pod_network: str | None = "198.19.0.0/16", pod_mtu: int = 1450,
                 workdir_root: str | None = None, keep_workdir: bool | None = None,
                 shared_segments: Sequence[Sequence[int]] = (), underlay: str = "v4",
                 pod_network6: str | None = None):
        if underlay not in UNDERLAYS:
            raise ValueError(f"underlay: one of {', '.join(UNDERLAYS)}")
        self.underlay = underlay
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be 1..{MAX_NODES}")
        grouped = [i for group in shared_segments for i in group]
        if (any(len(group) < 2 for group in shared_segments) or len(grouped) != len(set(grouped))
                or not all(isinstance(i, int) and 1 <= i <= nodes for i in grouped)):
            raise ValueError("shared_segments: groups of two or more distinct node numbers 1..nodes")
        self.shared_segments = [tuple(group) for group in shared_segments]
        self.tag = tag or secrets.token_hex(3)
        if not re.fullmatch(r"[a-z0-9]{1,8}", self.tag):
            raise ValueError("tag: 1-8 lowercase letters or digits")
        self.prefix = f"vxl-{self.tag}-"
        self.node_count = nodes
        self.pods_per_node = pods_per_node
        self.etcd_factory: EtcdFactory | None = (
            lab_etcd if etcd is True else (etcd or None))
        self.agent_exe = agent_exe or DEFAULT_AGENT_EXE
        self.pod_network = ipaddress.IPv4Network(pod_network) if pod_network is not None else None
        self.pod_network6 = ipaddress.IPv6Network(pod_network6) if pod_network6 is not None else None
        if self.pod_network is None and self.pod_network6 is None:
            raise ValueError("pod_network and pod_network6: at least one")
        if self.pod_network6 is not None and not self.pod_network6.subnet_of(POD_RANGE6):
            raise ValueError(f"pod_network6: inside {POD_RANGE6}")
        self.pod_mtu = pod_mtu
        self._workdir_root = workdir_root
        self.keep_workdir = (os.environ.get("VXLAN_LAB_KEEP") == "1"
                             if keep_workdir is None else keep_workdir)
        self.workdir: Path = Path()
        self.router = Router(self, self.prefix + "r")
        self.etcd_host = Host(self, self.prefix + "e", ETCD_SEGMENT)
        self.outside = Host(self, self.prefix + "o", OUTSIDE_SEGMENT)
        self.nodes: list[Node] = []
        self.extra_hosts: list[Host] = []
        self.pods: dict[str, Pod] = {}
        self.agents: list[Agent] = []
        self.etcd: Any = None
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self._captures = 0
        self._closed = True
        self._old_sigterm: Any = None

    # -- life cycle -------------------------------------------------------------------------

    @property
    def etcd_url(self) -> str | None:
        return self.etcd.client_url if self.etcd is not None else None

    def __enter__(self) -> "Lab":
        self._closed = False
        atexit.register(self.close)
        self._install_sigterm()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _install_sigterm(self) -> None:
        # A SIGTERM to the test run would otherwise skip every finally block and atexit.
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._old_sigterm = signal.SIG_DFL
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    def _build(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"vxlan-lab-{self.tag}-",
                                             dir=self._workdir_root))
        hosts: list[Host] = [self.etcd_host, self.outside]
        placed = {i: (group[0], 2 + position) for group in self.shared_segments
                  for position, i in enumerate(group)}
        for i in range(1, self.node_count + 1):
            node_dir = self.workdir / f"node{i}"
            (node_dir / "state").mkdir(parents=True)
            segment, host = placed.get(i, (i, 2))
            node = Node(self, f"{self.prefix}n{i}", i, node_dir, segment, host)
            self.nodes.append(node)
            hosts.append(node)
        for ns in [self.router, *hosts]:
            self._add_netns(ns.name)
        self.router.ip_batch(["link set lo up"])
        self.router.sysctl("net.ipv4.ip_forward", 1)
        if self.underlay != "v4":
            self.router.sysctl("net.ipv6.conf.all.forwarding", 1)
        self._wire(hosts)

        if self.etcd_factory is not None:
            self.etcd = self.etcd_factory(self)
        for node in self.nodes:
            for j in range(self.pods_per_node):
                v4 = self.pod_address(node, j + 1) if self.pod_network is not None else (None, None)
                v6 = self.pod_address6(node, j + 1) if self.pod_network6 is not None else (None, None)
                self.add_pod(node, f"n{node.index}p{j + 1}", *v4, mtu=self.pod_mtu,
                             ipv6=v6[0], gateway6=v6[1])

    def _router_addrs(self, segment: int) -> list[str]:
        """The router's address(es) on a segment, per the lab's underlay families."""
        return ([f"{_host(segment, 1)}/24"] if self.underlay != "v6" else []) + \
            ([f"{_host6(segment, 1)}/64 nodad"] if self.underlay != "v4" else [])

    def _wire(self, hosts: Sequence[Host]) -> None:
        """A veth from the router to each host, .1 (::1) on the router's end, .2 (::2) and a default route
        per family on the host's; the router's ends of hosts sharing a segment are ports of one bridge,
        which holds the .1 (::1)."""
        router_cmds = []
        shared = {h.segment for h in hosts if sum(o.segment == h.segment for o in hosts) > 1}
        for segment in sorted(shared):
            router_cmds += [f"link add sw{segment} mtu {UNDERLAY_MTU} type bridge",
                            *(f"addr add {a} dev sw{segment}" for a in self._router_addrs(segment)),
                            f"link set sw{segment} up"]
        for host in hosts:
            r_if = host.router_ifname
            router_cmds += [
                f"link add {r_if} mtu {UNDERLAY_MTU} type veth peer name {host.underlay_ifname}"
                f" mtu {UNDERLAY_MTU} netns {host.name}",
                *([f"link set {r_if} master sw{host.segment}"] if host.segment in shared
                  else [f"addr add {a} dev {r_if}" for a in self._router_addrs(host.segment)]),
                f"link set {r_if} up",
            ]
        self.router.ip_batch(router_cmds)
        for host in hosts:
            cmds = ["link set lo up"]
            if host.public_ip is not None:
                cmds.append(f"addr add {host.public_ip}/24 dev {host.underlay_ifname}")
            if host.public_ipv6 is not None:
                cmds.append(f"addr add {host.public_ipv6}/64 dev {host.underlay_ifname} nodad")
            cmds.append(f"link set {host.underlay_ifname} up")
            if host.gateway is not None:
                cmds.append(f"route add default via {host.gateway}")
            if host.gateway6 is not None:
                cmds.append(f"route add default via {host.gateway6} dev {host.underlay_ifname}")
            host.ip_batch(cmds)

    def add_host(self, suffix: str, segment: int) -> Host:
        """One more host (e.g. another etcd member) at 198.18.<segment>.2 on a segment of its own
        behind the router; a segment above the outside host's, so it never meets a node's."""
        if not OUTSIDE_SEGMENT < segment <= 255 or any(h.segment == segment for h in self.extra_hosts):
            raise ValueError(f"segment {segment}: must be free and in {OUTSIDE_SEGMENT + 1}..255")
        if not re.fullmatch(r"[a-z0-9]{1,6}", suffix):
            raise ValueError("suffix: 1-6 lowercase letters or digits")
        host = Host(self, self.prefix + suffix, segment)
        self._add_netns(host.name)
        self.extra_hosts.append(host)
        self._wire([host])
        return host

    def _add_netns(self, name: str, ipv6: bool | None = None) -> None:
        """``ipv6``: IPv6 on in the namespace (default: when the lab has an IPv6 underlay)."""
        # Recorded first, so a half-made namespace is still deleted.
        self._namespaces.append(name)
        _sh(["ip", "netns", "add", name])
        if ipv6 or (ipv6 is None and self.underlay != "v4"):
            _enable_ipv6(name)
        else:
            # IPv4 only: no router solicitations or MLD reports in the captures.
            _sh(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
                 "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])

    def close(self) -> None:
        """Stops every process the lab started and deletes every namespace it made."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        try:
            self.stop_agents()
            for proc in reversed(self._processes):
                _stop_process(proc)
            if self.etcd is not None:
                self.etcd.stop()
        except BaseException as exc:  # keep going: namespaces must go regardless
            errors.append(f"stopping processes: {exc!r}")
        for name in reversed(self._namespaces):
            proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT)
            if proc.returncode != 0 and name in list_namespaces():
                errors.append(f"ip netns del {name}: {proc.stderr.strip()}")
        left = [ns for ns in list_namespaces() if ns.startswith(self.prefix)]
        if self.workdir != Path() and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.close)
        if self._old_sigterm is not None and signal.getsignal(signal.SIGTERM) is \
                _raise_keyboard_interrupt:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        if left:
            errors.append(f"namespaces left behind: {left}")
        if errors:
            raise LabError("lab cleanup incomplete: " + "; ".join(errors))

    # -- helpers ----------------------------------------------------------------------------

    def namespaces(self) -> list[str]:
        """The lab's namespaces that exist now, from ``ip netns list``."""
        return [ns for ns in list_namespaces() if ns.startswith(self.prefix)]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0,
                 interval: float = 0.1, message: str = "") -> Any:
        return wait_for(predicate, timeout, interval, message)

    def etcdctl(self, *args: str, timeout: float = 10.0,
                check: bool = True) -> subprocess.CompletedProcess:
        """``etcdctl`` (API v3) against the lab's etcd, run in the etcd host namespace."""
        if self.etcd_url is None:
            raise LabError("this lab has no etcd")
        cmd = ["env", "ETCDCTL_API=3", ETCDCTL_EXE, "--endpoints", self.etcd_url,
               "--dial-timeout", "2s", "--command-timeout", f"{int(timeout)}s", *args]
        return self.etcd_host.run(*cmd, timeout=timeout + 5, check=check)

    def capture(self, ns: Netns | str, iface: str = "any", bpf: str = "", count: int = 100,
                timeout: float = 10.0) -> Capture:
        """Starts tcpdump in ``ns`` (returns once it listens); ``.wait()``/``.stop()`` end it,
        ``.lines()``, ``.packets()`` and ``.pcap_path`` give the result."""
        if isinstance(ns, str):
            ns = self._netns_by_name(ns)
        self._captures += 1
        path = self.workdir / f"capture-{self._captures}-{ns.name}.pcap"
        return Capture(ns, path, iface, bpf, count, timeout)

    def _netns_by_name(self, name: str) -> Netns:
        for ns in [self.router, self.etcd_host, self.outside, *self.extra_hosts, *self.nodes,
                   *self.pods.values()]:
            if ns.name == name:
                return ns
        raise LabError(f"no lab namespace {name}")

    # -- agents -----------------------------------------------------------------------------

    def agent_argv(self, node: Node, *extra_args: str, public_ip: bool = True) -> list[str]:
        """`public_ip=False`: no --public-ip/--public-ipv6, the agent follows its --iface's addresses.
        With an IPv6 underlay the node's fd18 address goes in as --public-ipv6 (issue 11's flag)."""
        public = []
        if public_ip and node.public_ip is not None:
            public += ["--public-ip", node.public_ip]
        if public_ip and node.public_ipv6 is not None:
            public += ["--public-ipv6", node.public_ipv6]
        argv = [self.agent_exe, "agent", "--iface", node.underlay_ifname,
                *public, "--subnet-file", str(node.subnet_file),
                "--state-dir", str(node.state_dir)]
        if self.etcd_url is not None:
            argv[2:2] = ["--etcd-endpoints", self.etcd_url]
        return argv + [str(a) for a in extra_args]

    def start_agent(self, node: Node, *extra_args: str, env: dict[str, str] | None = None,
                    public_ip: bool = True) -> Agent:
        """Starts the agent inside ``node``'s namespace; output goes to ``node.agent_log``."""
        argv = self.agent_argv(node, *extra_args, public_ip=public_ip)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(node.agent_log, "ab") as log:
            offset = log.tell()
            proc = subprocess.Popen(node.argv(*argv), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=full_env)
        agent = Agent(node, proc, argv, offset)
        node.agent = agent
        self.agents.append(agent)
        return agent

    def stop_agents(self, timeout: float = STOP_TIMEOUT) -> None:
        for agent in self.agents:
            agent.stop(timeout)

    # -- pods -------------------------------------------------------------------------------

    def pod_address(self, node: Node, n: int) -> tuple[str, str]:
        """A static pod address for helper pods: (``198.19.<node>.<n+1>/24``, gateway ``.1``),
        i.e. the subnet the lab assumes for node i when no agent chose one."""
        subnets = list(self.pod_network.subnets(new_prefix=24))
        subnet = subnets[node.index]
        return f"{subnet.network_address + n + 1}/24", str(subnet.network_address + 1)

    def pod_address6(self, node: Node, n: int) -> tuple[str, str]:
        """The IPv6 twin of ``pod_address``: (``<node's /64>::<n+1>/64``, gateway ``::1``), the
        node's /64 being the ``node.index``-th /64 of ``pod_network6`` (fd19:0:0:<index hex>::/64)."""
        if self.pod_network6 is None:
            raise LabError("this lab has no pod_network6")
        subnet = ipaddress.IPv6Network((int(self.pod_network6.network_address) + (node.index << 64), 64))
        if not subnet.subnet_of(self.pod_network6):
            raise LabError(f"node {node.index}: no /64 left in {self.pod_network6}")
        return f"{subnet.network_address + n + 1}/64", str(subnet.network_address + 1)

    def add_pod(self, node: Node, name: str, ip_cidr: str | None, gateway: str | None,
                mtu: int | None = None, bridge: str = "cni0", *, ipv6: str | None = None,
                gateway6: str | None = None) -> Pod:
        """A pod as the CNI bridge plugin would make it: veth ``eth0`` in the pod namespace,
        host end on ``bridge`` (created with the gateways if missing), a default route per family.
        ``ipv6``/``gateway6`` (e.g. "fd19:0:0:1::2/64", "fd19:0:0:1::1") give it an IPv6 address
        too (``ip_cidr``/``gateway`` None: IPv6 only); DAD is off as the bridge plugin does. Like the
        reference plugin, it turns on forwarding (per family the pod has) in the node namespace."""
        if not _POD_NAME.match(name):
            raise ValueError(f"pod name {name!r}: 1-24 of [A-Za-z0-9_-]")
        if name in self.pods:
            raise LabError(f"pod {name} exists")
        if (ip_cidr is None) != (gateway is None) or (ipv6 is None) != (gateway6 is None):
            raise ValueError("add_pod: an address and its gateway go together")
        if ip_cidr is None and ipv6 is None:
            raise ValueError("add_pod: an IPv4 or an IPv6 address (or both)")
        mtu = mtu or self.pod_mtu
        iface = ipaddress.IPv4Interface(ip_cidr) if ip_cidr is not None else None
        iface6 = ipaddress.IPv6Interface(ipv6) if ipv6 is not None else None
        if iface6 is not None and not (iface6.network.subnet_of(POD_RANGE6)
                                       and ipaddress.IPv6Address(gateway6) in POD_RANGE6):
            raise ValueError(f"add_pod: IPv6 pod addresses must be inside {POD_RANGE6}")
        host_if = "vh" + hashlib.sha1(f"{node.name}/{name}".encode()).hexdigest()[:10]
        pod = Pod(self, f"{self.prefix}p-{name}", node, name, iface, gateway, host_if, iface6, gateway6)
        self._add_netns(pod.name, ipv6=iface6 is not None or None)
        self.pods[name] = pod
        if iface6 is not None:
            _enable_ipv6(node.name)
        if not node.has_link(bridge):
            node.ip_batch([f"link add {bridge} type bridge", f"link set {bridge} up"])
        node.ip_batch([
            *([f"addr replace {gateway}/{iface.network.prefixlen} dev {bridge}"] if iface else []),
            *([f"addr replace {gateway6}/{iface6.network.prefixlen} dev {bridge} nodad"] if iface6 else []),
            f"link add {host_if} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {pod.name}",
            f"link set {host_if} master {bridge}",
            f"link set {host_if} up",
        ])
        if iface is not None:
            node.sysctl("net.ipv4.ip_forward", 1)
        if iface6 is not None:
            node.sysctl("net.ipv6.conf.all.forwarding", 1)
        pod.ip_batch([
            "link set lo up",
            *([f"addr add {iface} dev eth0"] if iface else []),
            *([f"addr add {iface6} dev eth0 nodad"] if iface6 else []),
            "link set eth0 up",
            *([f"route add default via {gateway} dev eth0"] if iface else []),
            *([f"route add default via {gateway6} dev eth0"] if iface6 else []),
        ])
        return pod

    def add_pod_from_subnet_file(self, node: Node, name: str) -> Pod:
        """A pod addressed from the subnet the agent wrote to ``node.subnet_file`` (gateway
        and MTU from the file, the next free host address), as the CNI plugin would do."""
        env = node.subnet_env()
        if "VXLAN_NET_SUBNET" not in env and "VXLAN_NET_IPV6_SUBNET" not in env:
            raise LabError(f"{node.subnet_file}: no VXLAN_NET_SUBNET or VXLAN_NET_IPV6_SUBNET yet")
        picked: dict[str, tuple[str | None, str | None]] = {}
        for key, attr in (("VXLAN_NET_SUBNET", "interface"), ("VXLAN_NET_IPV6_SUBNET", "interface6")):
            if key not in env:
                picked[key] = (None, None)
                continue
            gateway = ipaddress.ip_interface(env[key])
            taken = {getattr(p, attr).ip for p in self.pods.values()
                     if p.node is node and getattr(p, attr) is not None}
            free = (h for _, h in zip(range(len(taken) + 2), gateway.network.hosts())
                    if h != gateway.ip and h not in taken)
            address = next(free, None)
            if address is None:
                raise LabError(f"no free address left in {gateway.network}")
            picked[key] = (f"{address}/{gateway.network.prefixlen}", str(gateway.ip))
        v6 = picked["VXLAN_NET_IPV6_SUBNET"]
        return self.add_pod(node, name, *picked["VXLAN_NET_SUBNET"],
                            mtu=int(env.get("VXLAN_NET_MTU", self.pod_mtu)), ipv6=v6[0], gateway6=v6[1])

    def remove_pod(self, pod: Pod) -> None:
        """Deletes the pod namespace (its veth pair goes with it)."""
        _sh(["ip", "netns", "del", pod.name], check=False)
        self.pods.pop(pod.pod_name, None)


def _enable_ipv6(netns: str) -> None:
    """IPv6 on in a lab namespace without DAD, router advertisements or solicitations, so an
    address is usable at once and no autoconfiguration adds anything the lab did not ask for."""
    settings = [f"net.ipv6.conf.{scope}.{key}={value}" for scope in ("all", "default")
                for key, value in (("accept_dad", 0), ("accept_ra", 0), ("router_solicitations", 0),
                                   ("disable_ipv6", 0))]
    _sh(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *settings])


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def list_namespaces() -> list[str]:
    """Names from ``ip netns list`` (the ``(id: N)`` suffix dropped)."""
    out = _sh(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1,
             message: str = "") -> Any:
    """Polls ``predicate`` until it returns something truthy (returned) or ``timeout`` passes
    (``TimeoutError``). Bounded both in time and in the number of calls."""
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / max(interval, 0.001)) + 2):
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise TimeoutError(message or f"condition not met within {timeout}s (last value {last!r})")


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Builds a lab, prints its plan, tears it down.")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--pods-per-node", type=int, default=0)
    parser.add_argument("--no-etcd", action="store_true")
    parser.add_argument("--underlay", choices=UNDERLAYS, default="v4")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep it up")
    args = parser.parse_args()
    with Lab(args.nodes, args.pods_per_node, etcd=not args.no_etcd, underlay=args.underlay) as lab:
        print(f"lab {lab.tag}: router {lab.router.name}, etcd {lab.etcd_url}, "
              f"outside {lab.outside.public_ip or lab.outside.public_ipv6}")
        for node in lab.nodes:
            addresses = " ".join(a for a in (node.public_ip, node.public_ipv6) if a)
            print(f"  {node.name}: {addresses} dev {node.underlay_ifname}")
        for pod in lab.pods.values():
            print(f"  {pod.name}: {pod.interface} on {pod.node.name}")
        time.sleep(max(0.0, min(args.hold, 3600.0)))


if __name__ == "__main__":
    _main()
