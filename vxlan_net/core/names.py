"""The names vxlan-net gives what it creates, so that every reader (agent, doors, status, doctor) agrees."""

VTEP_PREFIX = "vxnet."
"""Our VXLAN device over the IPv4 underlay is `vxnet.<VNI>`."""
VTEP6_PREFIX = "vxnet6."
"""Our VXLAN device over the IPv6 underlay is `vxnet6.<VNI>` (flannel's `flannel-v6.<VNI>`)."""

ROUTE_PROTO = 157
"""rtm_protocol of the routes vxlan-net writes (`ip route ... proto 157`): routes with another protocol are
someone else's and are never replaced."""

NFT_TABLE = "vxlan-net"
"""Our nftables table (`table ip vxlan-net`)."""

ENDPOINT_LABEL = {4: "public IP", 6: "public IPv6"}
"""How logs and `status` name this node's tunnel endpoint over each underlay family (PublicIP, PublicIPv6)."""


def vtep_name(vni: int, underlay_family: int = 4) -> str:
    """The VXLAN device whose tunnel runs over the underlay of that IP family (4 or 6): `vxnet.<VNI>` or
    `vxnet6.<VNI>`, at most 15 characters, the kernel's limit."""
    if underlay_family not in (4, 6):
        raise ValueError(f"underlay family must be 4 or 6, not {underlay_family!r}")
    return f"{VTEP_PREFIX if underlay_family == 4 else VTEP6_PREFIX}{vni}"


def vtep_names(vni: int) -> tuple[str, str]:
    """Both VTEP names a VNI may have (over IPv4, over IPv6): the devices that are ours whichever exist."""
    return vtep_name(vni, 4), vtep_name(vni, 6)
