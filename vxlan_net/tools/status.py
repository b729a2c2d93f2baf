"""`vxlan-net status`: the lease table and this node's drift, rendered from plain data."""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

from vxlan_net.core.desired import OverlayEntries
from vxlan_net.core.lease import Lease
from vxlan_net.core.untrusted import shown


def format_expiry(seconds: Optional[int]) -> str:
    if seconds is None:
        return "never"
    if seconds < 0:
        return "expired"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def render_lease_table(rows: Iterable[tuple[Lease, Optional[int]]], own_subnet=None,
                       modes: Optional[Mapping] = None) -> str:
    """One line per lease: subnet, public IP, VTEP MAC, time to expiry; ours marked with *; with `modes`
    ({subnet: "direct"/"tunnelled"}, this node's view), a MODE column ("-" for ours and for skipped ones)."""
    header = ("SUBNET", "PUBLIC IP", "VTEP MAC", "EXPIRES IN") + (("MODE",) if modes is not None else ())
    lines = [header]
    for lease, ttl in sorted(rows, key=lambda row: row[0].subnet):
        mark = "*" if own_subnet is not None and lease.subnet == own_subnet else ""
        mode = (modes.get(lease.subnet, "-"),) if modes is not None else ()
        lines.append((f"{lease.subnet}{mark}", str(lease.public_ip), lease.vtep_mac, format_expiry(ttl), *mode))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def skipped_lines(skipped: Mapping[str, str]) -> list[str]:
    """One line per record the agent does not program, with the reason."""
    return [f"record skipped: {shown(key)}: {reason}" for key, reason in sorted(skipped.items())]


def describe_drift(desired: OverlayEntries, actual: OverlayEntries) -> list[str]:
    """Human lines for entries missing from or extra in the kernel; empty when in sync."""
    lines = []
    names = {"neighbours": "neighbour", "fdb": "fdb entry", "routes": "route", "direct_routes": "direct route"}
    for kind, name in names.items():
        want, have = getattr(desired, kind), getattr(actual, kind)
        lines += [f"missing {name}: {_show(e)}" for e in sorted(want - have)]
        lines += [f"unexpected {name}: {_show(e)}" for e in sorted(have - want)]
    return lines


def _show(entry) -> str:
    return " ".join(f"{k}={v}" for k, v in vars(entry).items())


def own_address_line(lease_ip, vtep_local, underlay: Optional[str], node_ips) -> str:
    """This node's public IP as its VTEP sends from it, and any disagreement with its lease or its
    interfaces (a renumbered node, issue 13)."""
    line = f"this node's public IP: {vtep_local} on {underlay or '?'}"
    problems = []
    if lease_ip != vtep_local:
        problems.append(f"its lease says {lease_ip}")
    if vtep_local not in node_ips:
        problems.append(f"{vtep_local} is not on this node any more")
    return line + (f" ({'; '.join(problems)}: run `vxlan-net doctor`)" if problems else "")
