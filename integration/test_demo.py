"""`make demo` is the README's first command: it must work, and leave nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from integration.lab import list_namespaces

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parent.parent


def test_demo_shows_a_working_cluster_and_cleans_up():
    done = subprocess.run([sys.executable, "-m", "integration.demo", "--nodes", "2", "--pods-per-node", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    out = done.stdout
    # the default cluster is dual-stack: a full ping matrix for each family
    assert "all 12 pod pairs reach each other over IPv4" in out and "all 12 pod pairs reach each other over IPv6" in out
    assert "IPv6: pinging every pod from every pod (ping -6" in out and "VXLAN_NET_IPV6_SUBNET=fd19:" in out
    assert "kernel entries match 1 peer" in out
    assert " vni 1 | " in out and "icmp echo-request" in out  # the frames decoded by inspect: IPv4 ...
    assert "> fd18:0:0:2::2[" in out and "icmp6 echo-request" in out  # ... and IPv6 over the IPv6 underlay
    assert "checks, all OK" in out and "doctor: every check holds" in out
    # its own namespaces (other sessions' labs may come and go meanwhile on a shared machine)
    tag = re.search(r"^lab ([a-z0-9]+): ", out, re.M)
    assert tag, out[:500]
    left = [ns for ns in list_namespaces() if ns.startswith(f"vxl-{tag.group(1)}-")]
    assert left == [], f"the demo left namespaces behind: {left}"


def test_demo_with_three_nodes_routes_the_shared_segment_directly_and_tunnels_the_rest():
    done = subprocess.run([sys.executable, "-m", "integration.demo", "--nodes", "3", "--pods-per-node", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    modes = [line.split(": ")[-1] for line in done.stdout.splitlines() if " -> vxl-" in line]
    assert sorted(modes) == ["VXLAN tunnel"] * 4 + ["direct"] * 2, done.stdout
    assert all(f"all 6 pod pairs reach each other over IPv{f}" in done.stdout for f in (4, 6)), done.stdout
    assert "doctor: every check holds" in done.stdout
