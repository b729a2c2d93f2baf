"""The one writer of /proc/sys keys, for the plugin and the agent (stdlib only, like all of cni/).

A key already holding the value is left alone, not rewritten: where /proc/sys is mounted read-only (a
container whose runtime set the keys beforehand), a setting that is already right is no error.
"""

from __future__ import annotations


def ensure_sysctl(key: str, value: str) -> None:
    """Give the /proc/sys `key` of the current network namespace `value`; OSError as the kernel says."""
    with open(key) as fh:
        if fh.read(64).strip() == value:
            return
    with open(key, "w") as fh:
        fh.write(value + "\n")
