"""`vxlan-net status`: the lease table and this node's drift, rendered from plain data."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, TypeVar

from vxlan_net.core.desired import OverlayEntries
from vxlan_net.core.direct import TUNNELLED, mode_of
from vxlan_net.core.lease import Lease
from vxlan_net.core.untrusted import shown

T = TypeVar("T")


def format_expiry(seconds: Optional[int]) -> str:
    if seconds is None:
        return "never"
    if seconds < 0:
        return "expired"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def render_lease_table(rows: Iterable[tuple[Lease, Optional[int]]], own_subnet=None,
                       modes: Optional[Mapping] = None, ipv6: bool = False) -> str:
    """One line per lease: subnet, public IP, VTEP MAC, time to expiry; ours marked with *; with `modes`
    ({subnet: "direct"/"tunnelled"}, this node's view), a MODE column ("-" for ours and for skipped ones).

    With `ipv6` (the network has IPv6, or a lease has an IPv6 endpoint) each lease also shows its IPv6
    subnet (a dual-stack lease's second one), PublicIPv6 and the IPv6 VTEP's MAC; "-" where it has none."""
    rows = sorted(rows, key=lambda row: row[0].subnet)
    dual = ipv6 and any(lease.ipv6_subnet is not None for lease, _ in rows)
    columns: list[tuple[str, Callable[[Lease], object]]] = [("SUBNET", lambda lease: lease.subnet)]
    if dual:
        columns.append(("IPV6 SUBNET", lambda lease: lease.ipv6_subnet))
    columns.append(("PUBLIC IP", lambda lease: lease.public_ip))
    if ipv6:
        columns.append(("PUBLIC IPV6", lambda lease: lease.public_ipv6))
    columns.append(("VTEP MAC", lambda lease: lease.vtep_mac))
    if ipv6:
        columns.append(("VTEP MAC V6", lambda lease: lease.vtep_mac_v6))
    header = (*(name for name, _ in columns), "EXPIRES IN") + (("MODE",) if modes is not None else ())
    lines = [header]
    for lease, ttl in rows:
        mark = "*" if own_subnet is not None and lease.subnet == own_subnet else ""
        mode = (modes.get(lease.subnet, "-"),) if modes is not None else ()
        cells = ["-" if value is None else str(value) for value in (get(lease) for _, get in columns)]
        cells[0] += mark
        lines.append((*cells, format_expiry(ttl), *mode))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def lease_mode(reach, lease: Lease, pod_families: Iterable[int]) -> str:
    """How this node reaches a peer, per pod family as the agent decides (desired_by_vtep): "direct" or
    "tunnelled" when every family goes the same way, else e.g. "4:direct 6:tunnelled"."""
    found = {f: mode_of(reach, lease.endpoint(f)[0]) if lease.endpoint(f) else TUNNELLED  # type: ignore[index]
             for f in pod_families if lease.subnet_of(f) is not None}
    if len(set(found.values())) == 1:
        return next(iter(found.values()))
    return " ".join(f"{f}:{mode}" for f, mode in sorted(found.items())) or TUNNELLED


def own_lease_of(leases: Iterable[Lease], vtep_addresses: Iterable) -> Optional[Lease]:
    """This node's lease: the one whose subnet's (either family's) network address a VTEP of ours holds."""
    held = {getattr(a, "ip", a) for a in vtep_addresses}
    return next((lease for lease in leases if any(s.network_address in held for s in lease.subnets)), None)


def skipped_lines(skipped: Mapping[str, str]) -> list[str]:
    """One line per record the agent does not program, with the reason."""
    return [f"record skipped: {shown(key)}: {reason}" for key, reason in sorted(skipped.items())]


def in_order(entries: Iterable[T]) -> list[T]:
    """Kernel entries (Neighbour, FdbEntry, Route, MainRoute) sorted field by field, IPv4 before IPv6 and
    None first: addresses of two families, or an address and None, do not compare, so a dual-stack set
    cannot go to sorted() as it is."""
    def part(value):
        if value is None:
            return (0, 0, 0)
        return (1, value.version, value) if hasattr(value, "version") else (2, 0, value)

    return sorted(entries, key=lambda entry: tuple(part(value) for value in vars(entry).values()))


def describe_drift(desired: OverlayEntries, actual: OverlayEntries) -> list[str]:
    """Human lines for entries missing from or extra in the kernel; empty when in sync."""
    lines = []
    names = {"neighbours": "neighbour", "fdb": "fdb entry", "routes": "route", "direct_routes": "direct route"}
    for kind, name in names.items():
        want, have = getattr(desired, kind), getattr(actual, kind)
        lines += [f"missing {name}: {_show(e)}" for e in in_order(want - have)]
        lines += [f"unexpected {name}: {_show(e)}" for e in in_order(have - want)]
    return lines


def _show(entry) -> str:
    return " ".join(f"{k}={v}" for k, v in vars(entry).items())


def own_address_line(lease_ip, vtep_local, underlay: Optional[str], node_ips, field: str = "public IP") -> str:
    """This node's public IP (`field`: "public IPv6" for the IPv6 VTEP) as its VTEP sends from it, and any
    disagreement with its lease or its interfaces (a renumbered node, issue 13)."""
    line = f"this node's {field}: {vtep_local} on {underlay or '?'}"
    problems = []
    if lease_ip != vtep_local:
        problems.append(f"its lease says {lease_ip}")
    if vtep_local not in node_ips:
        problems.append(f"{vtep_local} is not on this node any more")
    return line + (f" ({'; '.join(problems)}: run `vxlan-net doctor`)" if problems else "")
