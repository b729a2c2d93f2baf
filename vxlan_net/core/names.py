"""The names vxlan-net gives what it creates, so that every reader (agent, doors, status, doctor) agrees."""

VTEP_PREFIX = "vxnet."
"""Our VXLAN devices are `vxnet.<VNI>`."""

ROUTE_PROTO = 157
"""rtm_protocol of the routes vxlan-net writes (`ip route ... proto 157`): routes with another protocol are
someone else's and are never replaced."""

NFT_TABLE = "vxlan-net"
"""Our nftables table (`table ip vxlan-net`)."""


def vtep_name(vni: int) -> str:
    """`vxnet.<VNI>`: at most 14 characters, within the kernel's 15."""
    return f"{VTEP_PREFIX}{vni}"
