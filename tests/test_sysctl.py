"""cni.sysctl: the one /proc/sys writer of the plugin and the agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from cni.sysctl import ensure_sysctl

READ_ONLY = "/proc/sys/kernel/ngroups_max"  # mode 0444: not writable, even for root (a read-only /proc/sys)


def test_a_read_only_key_holding_another_value_is_an_os_error() -> None:
    with pytest.raises(OSError):
        ensure_sysctl(READ_ONLY, "1")


def test_a_missing_key_is_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        ensure_sysctl("/proc/sys/net/ipv6/conf/no-such-device-here/disable_ipv6", "0")


def test_a_read_only_key_already_right_is_no_error() -> None:
    ensure_sysctl(READ_ONLY, Path(READ_ONLY).read_text().strip())


def test_a_key_is_written_only_when_its_value_differs(tmp_path: Path) -> None:
    key = tmp_path / "ip_forward"
    key.write_text("1")  # a rewrite would add the newline
    ensure_sysctl(str(key), "1")
    assert key.read_text() == "1"
    ensure_sysctl(str(key), "0")
    assert key.read_text() == "0\n"
