"""The node's state dir: what must survive agent restarts (VTEP MAC, last subnet)."""

from __future__ import annotations

import json
import ipaddress
from ipaddress import IPv4Network
from pathlib import Path
from typing import Optional

from cni import subnet_file
from cni.atomic_file import write_atomically
from cni.config import addr_text, format_mac, random_mac

from vxlan_net.core.errors import InvalidLease
from vxlan_net.core.families import IPNetwork
from vxlan_net.core.lease import normalize_mac


class NodeState:
    """`<state-dir>/node.json`: the persisted VTEP MAC and the last subnet held."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "node.json"

    def _load(self) -> dict:
        try:
            doc = json.loads(self.path.read_text())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def _store(self, **changes) -> None:
        doc = self._load()
        doc.update(changes)
        write_atomically(self.path, json.dumps(doc, sort_keys=True) + "\n", mode=0o600)

    def vtep_mac(self, underlay_family: int = 4) -> str:
        """The persisted MAC of the VTEP over that underlay family, created (and persisted) on first use.

        A MAC change would make every peer's FDB and neighbour entries stale,
        so it is chosen once per node and kept across restarts.
        """
        field = "VtepMAC" if underlay_family == 4 else "VtepMACv6"
        try:
            return normalize_mac(self._load().get(field))
        except InvalidLease:
            mac = format_mac(random_mac())
            self._store(**{field: mac})
            return mac

    def last_subnet(self, version: int = 4) -> Optional[IPNetwork]:
        """The last subnet of that family held (an IPv6-only node's is its IPv6 one)."""
        try:
            subnet = ipaddress.ip_network(self._load()["Subnet" if version == 4 else "IPv6Subnet"])
        except (KeyError, TypeError, ValueError):
            return None
        return subnet if subnet.version == version else None

    def remember_subnet(self, *subnets: IPNetwork) -> None:
        """Remember the subnets held (one per family)."""
        wanted = {("Subnet" if s.version == 4 else "IPv6Subnet"): str(s) for s in subnets}
        doc = self._load()
        if any(doc.get(k) != v for k, v in wanted.items()):
            self._store(**wanted)


def remembered_subnet(path: Path, version: int = 4) -> Optional[IPNetwork]:
    """The node subnet of that family recorded in an existing subnet file, if it is there, readable and valid."""
    try:
        node = subnet_file.parse(Path(path).read_text())
    except (OSError, UnicodeError, ValueError):
        return None
    if version == 4:
        return None if node.subnet is None else IPv4Network((node.subnet, node.prefix))
    if node.ipv6_subnet is None:
        return None
    return ipaddress.ip_network((addr_text(node.ipv6_subnet), node.ipv6_prefix))
