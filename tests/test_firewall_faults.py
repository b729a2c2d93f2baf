"""An `nft` that hangs, fails or prints garbage is a KernelError (which the agent logs and retries), never a crash."""

from __future__ import annotations

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

