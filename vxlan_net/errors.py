"""Domain exceptions: the type says whether retrying can help."""


class VxlanNetError(Exception):
    """Base of every error vxlan-net raises on purpose."""


class InvalidConfig(VxlanNetError):
    """A network config (from a flag or from etcd) that cannot be used."""


class InvalidLease(VxlanNetError):
    """A subnet lease record from etcd that must not reach the kernel."""


class SubnetsExhausted(VxlanNetError):
    """Every subnet in the configured range is leased by another node."""


class StoreUnavailable(VxlanNetError):
    """etcd cannot be reached now; retrying later may help."""


class KernelError(VxlanNetError):
    """A netlink request failed; the reconciler retries on its next pass."""
