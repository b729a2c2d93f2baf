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


class StoreConfigError(VxlanNetError):
    """The etcd client settings cannot work (bad endpoint URL, TLS files, credentials): fix, do not retry."""


class SubnetTaken(VxlanNetError):
    """Another node created the subnet's lease first (a lost race): pick another subnet."""


class LeaseGone(VxlanNetError):
    """Our etcd lease (or the key it held) no longer exists: acquire a subnet again."""


class WatchLost(StoreUnavailable):
    """The watch stream died (etcd restart, network): watch again from `last_revision + 1`."""

    def __init__(self, message: str, last_revision: int) -> None:
        super().__init__(message)
        self.last_revision = last_revision
        """Every event up to this revision was delivered before the stream died."""


class WatchCompacted(VxlanNetError):
    """The watch's start revision was compacted away: list again, then watch from the new revision."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class KernelError(VxlanNetError):
    """A netlink request failed; the reconciler retries on its next pass."""


class LinkNotFound(KernelError):
    """A network device (or an interface carrying an address) is missing from this namespace."""


class KernelBusy(KernelError):
    """The kernel refused for now (EBUSY, EAGAIN, ENOBUFS, an interrupted dump); a retry soon may help."""
