"""Address allocation: a pure round-robin allocator and a host-local-compatible store.

The disk layout is host-local's, so operators' habits and tools carry over:
`<dataDir>/<network name>/<ip>` created exclusively, holding
`<containerID>\\r\\n<ifname>`; `last_reserved_ip.0`; and `lock`, held with
flock(2) for every read-modify-write. A reservation is complete as soon as its
file exists, so a killed ADD leaves at most a reservation DEL/GC can release.
"""

import os
from fcntl import LOCK_EX, flock

from . import errors as E
from .config import int_to_ip, ip_to_int
from .errors import CniError

LINE_BREAK = "\r\n"
RANGE_ID = "0"  # one range set, index 0, as host-local names it
LAST_RESERVED = "last_reserved_ip." + RANGE_ID


def pick_address(start: int, end: int, gateway: int, taken, last):
    """Next free address after `last`, wrapping from `end` to `start`; None when full."""
    size = end - start + 1
    first = last + 1 if last is not None and start <= last < end else start
    for step in range(size):
        candidate = first + step
        if candidate > end:
            candidate -= size
        if candidate != gateway and candidate not in taken:
            return candidate
    return None


def held_by(owners: dict, container_id: str, ifname: str) -> list:
    """The addresses in `owners` (ip -> (container ID, ifname)) that container_id/ifname holds, lowest first."""
    # Files written before host-local recorded ifnames hold only the container ID.
    return sorted(ip for ip, owner in owners.items() if owner in ((container_id, ifname), (container_id, "")))


class MemoryStore:
    """The store's interface, in memory, for pure tests."""

    def __init__(self):
        self.owners = {}
        self.last = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def reservations(self):
        return dict(self.owners)

    def last_reserved(self):
        return self.last

    def reserve(self, ip: int, container_id: str, ifname: str) -> bool:
        if ip in self.owners:
            return False
        self.owners[ip] = (container_id, ifname)
        self.last = ip
        return True

    def release(self, ip: int) -> None:
        self.owners.pop(ip, None)


class DiskStore:
    """host-local's disk backend; use as a context manager to hold the lock."""

    def __init__(self, data_dir: str, network: str, create: bool = True):
        self.dir = os.path.join(data_dir, network)
        self.create = create
        self._lock_fd = None

    def __enter__(self):
        path = os.path.join(self.dir, "lock")
        try:
            if self.create:
                os.makedirs(self.dir, mode=0o755, exist_ok=True)
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            else:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # no store yet: nothing is reserved
        except OSError as exc:
            raise CniError(E.IO_FAILURE, f"cannot open the IPAM lock {path}: {exc.strerror}") from None
        flock(fd, LOCK_EX)
        self._lock_fd = fd
        return self

    def __exit__(self, *exc):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None
        return False

    def reservations(self) -> dict:
        """ip -> (container ID, ifname) for every address file."""
        owners = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return owners
        for name in names:
            if not name[:1].isdigit():
                continue
            try:
                ip = ip_to_int(name)
            except ValueError:
                continue
            try:
                with open(os.path.join(self.dir, name), encoding="utf-8", errors="replace", newline="") as fh:
                    content = fh.read(4096).strip()
            except FileNotFoundError:
                continue
            cid, _, ifname = content.partition(LINE_BREAK)
            owners[ip] = (cid, ifname)
        return owners

    def last_reserved(self):
        try:
            with open(os.path.join(self.dir, LAST_RESERVED)) as fh:
                return ip_to_int(fh.read(64).strip())
        except (OSError, ValueError):
            return None

    def reserve(self, ip: int, container_id: str, ifname: str) -> bool:
        path = os.path.join(self.dir, int_to_ip(ip))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        except OSError as exc:
            raise CniError(E.IO_FAILURE, f"cannot create {path}: {exc.strerror}") from None
        try:
            os.write(fd, (container_id + LINE_BREAK + ifname).encode())
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise CniError(E.IO_FAILURE, f"cannot write {path}: {exc.strerror}") from None
        os.close(fd)
        last = os.path.join(self.dir, LAST_RESERVED)
        try:
            with open(last, "w") as fh:
                fh.write(int_to_ip(ip))
        except OSError as exc:
            raise CniError(E.IO_FAILURE, f"cannot write {last}: {exc.strerror}") from None
        return True

    def release(self, ip: int) -> None:
        try:
            os.unlink(os.path.join(self.dir, int_to_ip(ip)))
        except FileNotFoundError:
            pass


def allocate(store, plan, container_id: str, ifname: str, requested=None) -> int:
    """Reserve one address for (container_id, ifname) in a locked store; CniError when impossible."""
    owners = store.reservations()
    held = held_by(owners, container_id, ifname)
    if held:
        raise CniError(E.DUPLICATE_ALLOCATION, f"{int_to_ip(held[0])} is already allocated to container "
                       f"{container_id} interface {ifname}; duplicate allocation is not allowed "
                       "(DEL it first)")
    if requested is not None:
        if not plan.start <= requested <= plan.end or requested == plan.gateway:
            raise CniError(E.ADDRESS_UNAVAILABLE, f"requested IP {int_to_ip(requested)} is outside the range "
                           f"{int_to_ip(plan.start)}-{int_to_ip(plan.end)} or is the gateway")
        if requested in owners or not store.reserve(requested, container_id, ifname):
            raise CniError(E.ADDRESS_UNAVAILABLE, f"requested IP {int_to_ip(requested)} is already allocated")
        return requested
    taken = set(owners)
    last = store.last_reserved()
    for _ in range(8):  # files another writer made without the lock are skipped, a bounded number of times
        ip = pick_address(plan.start, plan.end, plan.gateway, taken, last)
        if ip is None:
            raise CniError(E.EXHAUSTED, f"no IP addresses available in range "
                           f"{int_to_ip(plan.start)}-{int_to_ip(plan.end)}")
        if store.reserve(ip, container_id, ifname):
            return ip
        taken.add(ip)
    raise CniError(E.TRY_AGAIN_LATER, "IPAM store keeps changing under the lock; try again")


def release_owner(store, container_id: str, ifname: str) -> list:
    """Release every address held by (container_id, ifname); returns the addresses."""
    released = held_by(store.reservations(), container_id, ifname)
    for ip in released:
        store.release(ip)
    return released
