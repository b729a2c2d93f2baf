"""An `nft` that hangs, fails or prints garbage is a KernelError (which the agent logs and retries), never a crash."""

from __future__ import annotations

import threading
import time
from ipaddress import IPv4Address

import pytest

from vxlan_net.core.errors import KernelError
from vxlan_net.doors import firewall

DEVICES = firewall.ForwardDevices("cni0", "vxnet.1")


@pytest.fixture
def nft_on_path(tmp_path, monkeypatch):
    """Install `body` as the `nft` first on PATH."""
    def install(body: str) -> None:
        script = tmp_path / "nft"
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return install


@pytest.mark.parametrize("body, reason", [
    ("echo '{\"nftables\": [' ; exit 0", "not an nft JSON listing"),
    ("echo '[1, 2]' ; exit 0", "not an nft JSON listing"),
    ("echo 'Error: Could not process rule' >&2; exit 1", None),
])
def test_a_broken_nft_is_a_kernel_error(nft_on_path, body, reason):
    nft_on_path(body)
    if reason is None:  # a failing listing means "no such chain": nothing to do
        assert firewall.ensure_forward_rules(DEVICES) is False
        return
    with pytest.raises(KernelError, match=reason):
        firewall.ensure_forward_rules(DEVICES)


def test_a_hanging_nft_is_a_kernel_error_after_the_deadline(nft_on_path, monkeypatch):
    nft_on_path("exec sleep 30")
    monkeypatch.setattr(firewall, "NFT_TIMEOUT", 0.3)
    with pytest.raises(KernelError, match="did not finish within 0.3s"):
        firewall.ensure_forward_rules(DEVICES)



@pytest.fixture
def logging_nft(nft_on_path, tmp_path):
    """An `nft` first on PATH that succeeds and keeps what it was given; returns that file."""
    given = tmp_path / "nft-stdin"
    nft_on_path(f"cat >> {given}")
    return given


@pytest.fixture
def fresh_in_process(monkeypatch):
    """A libnftables path of its own, as at the agent's start; its hung calls are released at the end."""
    released = threading.Event()
    path = firewall._InProcessNft()
    monkeypatch.setattr(firewall, "_in_process", path)
    yield path, released
    released.set()


def test_a_hanging_libnftables_call_is_a_kernel_error_after_the_deadline_then_nft_runs(
        fresh_in_process, logging_nft, monkeypatch):
    path, released = fresh_in_process
    monkeypatch.setattr(path, "_call", lambda text: released.wait(30) and (0, ""))  # stuck in the library
    monkeypatch.setattr(firewall, "NFT_TIMEOUT", 0.3)
    started = time.monotonic()
    with pytest.raises(KernelError, match=r"nft \(libnftables\) did not finish within 0.3s"):
        firewall.change_peers([IPv4Address("198.18.1.2")], [])
    assert time.monotonic() - started < 5
    assert not logging_nft.exists(), "the change was not also forked"
    firewall.change_peers([IPv4Address("198.18.1.3")], [IPv4Address("198.18.1.4")])
    assert logging_nft.read_text() == ("delete element ip vxlan-net vxlan_peers { 198.18.1.4 }\n"
                                       "add element ip vxlan-net vxlan_peers { 198.18.1.3 }\n")


def test_a_refusal_inside_libnftables_is_a_kernel_error_with_nfts_words(fresh_in_process, logging_nft, monkeypatch):
    path, _ = fresh_in_process
    monkeypatch.setattr(path, "_call", lambda text: (1, "Error: Could not process rule: No such file or directory"))
    with pytest.raises(KernelError, match="nft \\(libnftables\\) failed: Error: Could not process rule"):
        firewall.change_peers([], [IPv4Address("198.18.1.2")])
    assert not logging_nft.exists() and path.usable(), "a refusal is no reason to give the library up"


def test_without_libnftables_set_changes_run_the_nft_command(fresh_in_process, logging_nft, monkeypatch):
    import ctypes

    def missing(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    firewall.change_peers(["fd18::5"], [])
    assert logging_nft.read_text() == "add element ip6 vxlan-net vxlan_peers { fd18::5 }\n"
    assert not fresh_in_process[0].usable()


def test_an_empty_change_runs_nothing(fresh_in_process, logging_nft):
    firewall.change_peers([], [])
    assert not logging_nft.exists()
