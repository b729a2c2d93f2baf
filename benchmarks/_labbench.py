"""Shared by the lab benchmarks: run the probe inside a node, count routes, report results.

Each benchmark prints its own tables and, for `benchmarks/run`'s summary, lines of the form
`RESULT<TAB>benchmark<TAB>metric<TAB>value<TAB>target` (free text; no assertion on times).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from integration.lab import Lab, LabError, Node  # noqa: E402

VTEP = "vxnet.1"
PROBE_TIMEOUT = 120.0


class BenchFailure(Exception):
    """Something did not work (as opposed to: it was slow)."""


def _start_probe(node: Node, command: str, etcd_url: str, *args: object) -> subprocess.Popen:
    """`benchmarks._probe <command>` started inside the node's namespace (its output piped)."""
    return node.popen(sys.executable, "-m", "benchmarks._probe", command, "--etcd", etcd_url,
                      *[str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                      cwd=str(REPO))


def _probe_answer(proc: subprocess.Popen, command: str, timeout: float) -> dict:
    """The JSON answer on a probe's last line; BenchFailure if it fails or outlasts `timeout`."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its PID
        proc.communicate(timeout=10)
        raise BenchFailure(f"probe {command} did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise BenchFailure(f"probe {command} exited {proc.returncode}: {err.strip()[-800:]}")
    return json.loads(out.strip().splitlines()[-1])


def probe(node: Node, command: str, etcd_url: str, *args: object, timeout: float = PROBE_TIMEOUT) -> dict:
    """Run `benchmarks._probe <command>` inside the node's namespace; its JSON answer."""
    return _probe_answer(_start_probe(node, command, etcd_url, *args), command, timeout)


class RoutesUp:
    """The probe's `routes-up` in the node, subscribed before what it times starts: `wait()` gives the
    monotonic time (shared by every namespace) the kernel announced the count-th of the agent's routes."""

    def __init__(self, node: Node, count: int, timeout: float = 90.0):
        self.timeout = timeout
        self.proc = _start_probe(node, "routes-up", "unused", "--count", count, "--timeout", timeout)
        if not self.proc.stdout.readline():  # its "ready" line: subscribed
            raise BenchFailure(f"probe routes-up did not start: {self.proc.communicate(timeout=10)[1][-800:]}")

    def wait(self) -> dict:
        return _probe_answer(self.proc, "routes-up", self.timeout + 30)


def route_count(node: Node) -> int:
    """Routes on the node's VXLAN device, as `ip -j route` sees them (0 without a device)."""
    proc = node.run("ip", "-j", "route", "show", "dev", VTEP, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        return 0
    return len(json.loads(proc.stdout))


def wait_routes(node: Node, count: int, timeout: float, agent=None) -> float:
    """Seconds until the device carries `count` routes; bounded in time and polls."""
    started = time.monotonic()
    for _ in range(int(timeout / 0.05) + 1):
        if route_count(node) == count:
            return time.monotonic() - started
        if agent is not None and not agent.alive():
            raise BenchFailure(f"agent on {node.name} exited: {agent.log_text()[-1500:]}")
        if time.monotonic() - started > timeout:
            break
        time.sleep(0.05)
    raise BenchFailure(f"{node.name}: {route_count(node)} routes on {VTEP} after {timeout:.0f}s, want {count}")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of /proc/PID/status in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith(("Vm", "Rss", "Threads")):
            fields[key] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def result(bench: str, metric: str, value: str, target: str = "") -> None:
    print(f"RESULT\t{bench}\t{metric}\t{value}\t{target}", flush=True)


def against(bench: str, metric: str, value: float, limit: float, unit: str = "ms", baseline: str = "") -> None:
    """A RESULT row for a figure with an upper limit: the value, the limit and value/limit (<= 1 meets it);
    `baseline` names the same-run figure the limit derives from, when it does."""
    scale = 1000 if unit == "ms" else 1  # "ms": value and limit in seconds; any other unit: as given
    shown = f"{value * scale:.1f} {unit}" if unit else f"{value:.2f}"
    verdict = "meets" if value <= limit else "MISSES"
    limit_text = f"{limit * scale:.1f} {unit}" if unit else f"{limit:g}"
    result(bench, metric, shown + (f" ({baseline})" if baseline else ""),
           f"<= {limit_text}: {verdict} (ratio {value / limit:.2f})")


def run_main(main) -> None:
    """Exit with main()'s status; a functional failure prints one line and exits 1."""
    try:
        sys.exit(main())
    except (BenchFailure, LabError, TimeoutError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        sys.exit(1)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


__all__ = ["Lab", "LabError", "BenchFailure", "probe", "route_count", "wait_routes", "proc_status", "cpu_seconds",
           "result", "against", "run_main", "ms", "REPO", "VTEP"]
