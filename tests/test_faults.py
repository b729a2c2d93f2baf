"""Transient faults, unit level: logged once, retried with back-off, in /readyz and the metrics.

Netlink errors (EBUSY, ENOBUFS, EINTR) cannot be injected into a real kernel on demand, so they
come from a fake kernel door here, through the real Reconciler and the agent's reconcile path;
nft faults use a fake `nft` first on PATH against the real firewall door (no root needed).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from ipaddress import IPv4Address, IPv4Network
from types import SimpleNamespace

import pytest

from vxlan_net.agent.faults import Faults, RetriedStep
from vxlan_net.agent.health import AgentMetrics, Readiness
from vxlan_net.agent.loop import Agent, AgentOptions
from vxlan_net.agent.reconciler import Reconciler
from vxlan_net.core.backoff import Backoff
from vxlan_net.core.errors import KernelBusy, KernelError
from vxlan_net.core.lease import Lease
from vxlan_net.core.lease_book import LeaseChange
from vxlan_net.doors import firewall
from cni.atomic_file import write_atomically

from test_reconciler import MemoryKernel


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def sample(metrics: AgentMetrics, name: str, kind: str) -> float:
    return metrics.registry.get_sample_value(name, {"kind": kind}) or 0.0


def test_a_failing_step_warns_once_backs_off_and_reports_until_it_succeeds(caplog):
    readiness, metrics = Readiness(resync_interval=30), AgentMetrics()
    outcomes = [OSError(errno.EROFS, "cannot write /run/x: Read-only file system")] * 3 + [None]
    calls = []

    def write():
        calls.append(1)
        outcome = outcomes[len(calls) - 1]
        if outcome:
            raise outcome

    step = RetriedStep("subnet-file", write, Faults(readiness, metrics), Backoff(1.0, 8.0, random.Random(1)))
    step.request()
    now = 100.0
    assert not step.run_if_due(now)
    assert "subnet-file: [Errno 30] cannot write /run/x: Read-only file system" in readiness.problems(now)
    assert not step.run_if_due(now + 0.1) and len(calls) == 1, "retried before its back-off"
    for _ in range(2):
        now += step.seconds_until_due(now)
        assert not step.run_if_due(now)
    assert len(calls) == 3 and step.seconds_until_due(now) > 3.0, "back-off grows"
    assert sample(metrics, "vxlan_net_fault_active", "subnet-file") == 1
    assert sample(metrics, "vxlan_net_fault_failures_total", "subnet-file") == 3
    assert len([w for w in warnings(caplog) if w.startswith("subnet-file:")]) == 1

    assert step.run_if_due(now + step.seconds_until_due(now))
    assert not any(p.startswith("subnet-file") for p in readiness.problems(now))
    assert sample(metrics, "vxlan_net_fault_active", "subnet-file") == 0
    assert step.seconds_until_due() is None and step.run_if_due() and len(calls) == 4


def test_an_unexpected_exception_is_not_swallowed():
    step = RetriedStep("firewall", lambda: 1 / 0, Faults(Readiness(30), AgentMetrics()))
    step.request()
    with pytest.raises(ZeroDivisionError):
        step.run_if_due()


@pytest.fixture
def fake_nft(tmp_path, monkeypatch):
    """Write `nft` (a shell script) first on PATH; returns the writer."""
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")

    def install(script: str):
        path = tmp_path / "nft"
        path.write_text(script)
        path.chmod(0o755)

    return install


def test_a_hanging_nft_is_killed_after_a_short_timeout_as_a_kernel_error(fake_nft, monkeypatch):
    fake_nft("#!/bin/sh\nexec sleep 20\n")
    monkeypatch.setattr(firewall, "NFT_TIMEOUT", 0.5)
    started = time.monotonic()
    with pytest.raises(KernelError, match=r"did not finish within 0.5s"):
        firewall.update_peers([IPv4Address("198.18.2.2")])
    assert time.monotonic() - started < 5
    with pytest.raises(KernelError):  # also where a failed exit would be tolerated
        firewall.current_peers()


def test_a_failing_or_unrunnable_nft_is_a_kernel_error(fake_nft):
    fake_nft("#!/bin/sh\necho 'Error: injected' >&2\nexit 1\n")
    with pytest.raises(KernelError, match="Error: injected"):
        firewall.update_peers([])
    fake_nft("#!/nonexistent/vxlan-net-test/sh\n")
    with pytest.raises(KernelError, match="cannot run .*nft: No such file or directory"):
        firewall.update_peers([])


def test_a_write_that_cannot_happen_names_the_file_and_keeps_the_old_one(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"cannot write {blocker}/subnet.env: "):
        write_atomically(blocker / "subnet.env", "X=1\n")
    target = tmp_path / "subnet.env"
    target.write_text("OLD=1\n")
    with pytest.raises(TypeError):  # fails half-way through the write
        write_atomically(target, None)
    assert target.read_text() == "OLD=1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir", "subnet.env"], "a temp file was left"

class FlakyKernel(MemoryKernel):
    """The netlink door's contract: it raises KernelBusy for EBUSY/ENOBUFS/EINTR once its own retries ran out."""

    def __init__(self, errors):
        super().__init__()
        self.errors = list(errors)

    def read_overlay_entries(self, ifname, underlay=None):
        if self.errors:
            raise self.errors.pop(0)
        return super().read_overlay_entries(ifname, underlay)


def test_netlink_errors_leave_the_agent_running_report_once_and_clear(tmp_path, caplog):
    agent = Agent(AgentOptions(etcd_endpoints=("http://198.18.0.2:2379",), state_dir=tmp_path,
                               subnet_file=tmp_path / "subnet.env", vxlan_ingress_filter=False), threading.Event())
    peer = Lease(IPv4Network("198.19.2.0/24"), IPv4Address("198.18.2.2"), "0a:00:00:00:00:02")
    kernel = FlakyKernel([KernelBusy(f"dump neighbours: {os.strerror(code)} ({errno.errorcode[code]})")
                          for code in (errno.EBUSY, errno.ENOBUFS, errno.EINTR)])
    agent.reconciler = Reconciler("vxnet.1", kernel)
    agent.book = SimpleNamespace(peers=lambda: [peer], set_protected=lambda addresses: LeaseChange())
    agent._protected_addresses = dict  # a unit test reads nothing of this namespace's kernel
    agent._recheck_forward_rules = lambda: None  # nor touches its firewall
    for _ in range(3):
        agent._reconcile()
        assert any(p.startswith("netlink: dump neighbours:") for p in agent.readiness.problems())
        assert sample(agent.metrics, "vxlan_net_fault_active", "netlink") == 1
    assert sample(agent.metrics, "vxlan_net_fault_failures_total", "netlink") == 3
    assert len(warnings(caplog)) == 1, warnings(caplog)

    agent._reconcile()
    assert kernel.entries.routes and not any(p.startswith("netlink") for p in agent.readiness.problems())
    assert sample(agent.metrics, "vxlan_net_fault_active", "netlink") == 0
