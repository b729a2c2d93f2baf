"""The node -> CNI contract: the subnet file, written atomically (DESIGN §4)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Optional


def render_subnet_file(network: IPv4Network, subnet: IPv4Network, mtu: int, ip_masq: bool) -> str:
    """The file's text; the subnet is written as its first host address, as flannel does."""
    gateway = IPv4Interface((int(subnet.network_address) + 1, subnet.prefixlen))
    return (
        f"VXLAN_NET_NETWORK={network}\n"
        f"VXLAN_NET_SUBNET={gateway}\n"
        f"VXLAN_NET_MTU={mtu}\n"
        f"VXLAN_NET_IPMASQ={'true' if ip_masq else 'false'}\n"
    )


def parse_subnet_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and comments ignored."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`.

    On failure (read-only or full file system, a parent that is not a directory) the old file
    stays as it was, no temp file is left, and the OSError names `path` and the reason.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def remembered_subnet(path: Path) -> Optional[IPv4Network]:
    """The node subnet recorded in an existing subnet file, if any and readable."""
    try:
        values = parse_subnet_file(Path(path).read_text())
        return IPv4Interface(values["VXLAN_NET_SUBNET"]).network
    except (OSError, KeyError, ValueError):
        return None
