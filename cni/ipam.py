"""Address allocation: a pure round-robin allocator and a host-local-compatible store.

The disk layout is host-local's, so operators' habits and tools carry over:
`<dataDir>/<network name>/<ip>` (IPv4 or IPv6 text, both families in one
directory) created exclusively, holding `<containerID>\\r\\n<ifname>`;
`last_reserved_ip.<i>` per range set i (a dual-stack pod: set 0 IPv4, set 1
IPv6); and `lock`, held with flock(2) for every read-modify-write. A reservation is complete as soon as its
file exists, so a killed ADD leaves at most a reservation DEL/GC can release.
Nothing in the store is followed if it is a link (see `DiskStore`).
"""

import posix  # not os or stat: the plugin's start-up budget
from _stat import S_ISLNK, S_ISREG
from errno import EISDIR, EOPNOTSUPP
from fcntl import LOCK_EX, flock

from . import errors as E
from .config import addr_text, any_ip_to_int, family_name, is_ipv6, join_path
from .errors import CniError

LINE_BREAK = "\r\n"
LAST_RESERVED = "last_reserved_ip."  # + the range set's index, as host-local names it


def pick_address(start: int, end: int, gateway: int, taken, last):
    """Next free address after `last`, wrapping from `end` to `start`; None when full.

    Each candidate passed over is the gateway or in `taken`, so a free one comes within
    len(taken) + 2 steps when there is one: a /64 is never walked.
    """
    size = end - start + 1
    first = last + 1 if last is not None and start <= last < end else start
    for step in range(min(size, len(taken) + 2)):
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
        self.last = {}  # range set index -> address

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def reservations(self):
        return dict(self.owners)

    def last_reserved(self, index: int = 0):
        return self.last.get(index)

    def reserve(self, ip: int, container_id: str, ifname: str, index: int = 0) -> bool:
        if ip in self.owners:
            return False
        self.owners[ip] = (container_id, ifname)
        self.last[index] = ip
        return True

    def release(self, ip: int) -> None:
        self.owners.pop(ip, None)


# Nothing under the network's directory is ever followed: a link planted there
# (to /etc/shadow, say) is never read, written or deleted through. O_NONBLOCK:
# a FIFO planted there cannot hang an open.
_NO_LINKS = posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_CLOEXEC


def _is_link(path: str) -> bool:
    """os.path.islink, without importing os."""
    try:
        return S_ISLNK(posix.lstat(path).st_mode)
    except OSError:
        return False


def _refusal(path: str, exc: OSError) -> CniError:
    if _is_link(path):
        return CniError(E.IO_FAILURE, f"{path} is a symlink; the IPAM store never follows one (remove it)")
    return CniError(E.IO_FAILURE, f"cannot open {path}: {exc.strerror}")


class DiskStore:
    """host-local's disk backend; use as a context manager to hold the lock.

    `dataDir` is the operator's path and may pass through links (a volume
    mounted elsewhere); `<dataDir>/<network>` and every file in it are the
    plugin's: the directory is opened with O_NOFOLLOW and every file relative
    to that descriptor, so nothing is re-resolved between a check and a use.
    An entry named like an address that is not a regular file (a link, a FIFO,
    a directory) is someone else's: its address counts as taken, it has no
    owner (None), and nothing releases it.
    """

    def __init__(self, data_dir: str, network: str, create: bool = True):
        self.data_dir = data_dir
        self.dir = join_path(data_dir, network)
        self.create = create
        self._dir_fd = None
        self._lock_fd = None

    def _path(self, name: str) -> str:
        return join_path(self.dir, name)

    def _open(self, name: str, flags: int, mode: int = 0o600) -> int:
        return posix.open(name, flags | _NO_LINKS, mode, dir_fd=self._dir_fd)

    def __enter__(self):
        try:
            if self.create:
                self._make_dirs()
            self._dir_fd = posix.open(self.dir, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_NOFOLLOW | posix.O_CLOEXEC)
        except FileNotFoundError:
            return None  # no store yet: nothing is reserved
        except OSError as exc:
            raise _refusal(self.dir, exc) from None
        try:
            fd = self._open("lock", posix.O_RDONLY | (posix.O_CREAT if self.create else 0))
        except FileNotFoundError:
            self.__exit__()
            return None
        except OSError as exc:
            self.__exit__()
            raise _refusal(self._path("lock"), exc) from None
        self._lock_fd = fd
        if not S_ISREG(posix.fstat(fd).st_mode):
            self.__exit__()
            raise CniError(E.IO_FAILURE, f"{self._path('lock')} is not a regular file (remove it)")
        flock(fd, LOCK_EX)
        return self

    def _make_dirs(self) -> None:
        try:
            posix.mkdir(self.dir, 0o755)
        except FileExistsError:
            pass
        except OSError:  # no data dir yet (the node's first ADD), or something odd: create the parents
            import os

            os.makedirs(self.data_dir, mode=0o755, exist_ok=True)
            try:
                posix.mkdir(self.dir, 0o755)
            except FileExistsError:
                pass

    def __exit__(self, *exc):
        for fd in (self._lock_fd, self._dir_fd):
            if fd is not None:
                posix.close(fd)  # closing the lock drops the flock
        self._lock_fd = self._dir_fd = None
        return False

    def _read(self, name: str, limit: int):
        """The first `limit` bytes of a regular file; None for anything else or nothing there."""
        try:
            fd = self._open(name, posix.O_RDONLY)
        except OSError:  # ELOOP: a link; ENOENT: released meanwhile
            return None
        try:
            return posix.read(fd, limit) if S_ISREG(posix.fstat(fd).st_mode) else None
        finally:
            posix.close(fd)

    def reservations(self) -> dict:
        """ip -> (container ID, ifname) for every address file; ip -> None for a foreign entry."""
        owners = {}
        with posix.scandir(self._dir_fd) as entries:
            for entry in entries:
                name = entry.name
                if not name[:1].isdigit() and ":" not in name:  # lock, last_reserved_ip.<i>
                    continue
                try:
                    ip = any_ip_to_int(name)
                except ValueError:
                    continue
                if name != addr_text(ip):  # not the canonical text: not a name we create
                    owners[ip] = None
                    continue
                # The type comes with the listing: a link, device or FIFO is never opened.
                if not entry.is_file(follow_symlinks=False):
                    owners[ip] = None
                    continue
                content = self._read(name, 4096)
                if content is None:  # released meanwhile, or swapped for something that is not a file
                    if self._exists(name):
                        owners[ip] = None
                    continue
                cid, _, ifname = content.decode(errors="replace").strip().partition(LINE_BREAK)
                owners[ip] = (cid, ifname)
        return owners

    def _exists(self, name: str) -> bool:
        try:
            posix.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def last_reserved(self, index: int = 0):
        try:
            return any_ip_to_int((self._read(f"{LAST_RESERVED}{index}", 64) or b"").decode().strip())
        except ValueError:  # also UnicodeError
            return None

    def reserve(self, ip: int, container_id: str, ifname: str, index: int = 0) -> bool:
        """Create the address file, whole (never through a link), and record it as range set `index`'s
        last reservation; False when the name exists."""
        name = addr_text(ip)
        try:
            self._create_whole(name, (container_id + LINE_BREAK + ifname).encode())
        except FileExistsError:
            return False
        except OSError as exc:
            raise CniError(E.IO_FAILURE, f"cannot create {self._path(name)}: {exc.strerror}") from None
        try:
            self._write_last(f"{LAST_RESERVED}{index}", name)
        except BaseException:
            self.release(ip)  # no reservation without its record
            raise
        return True

    def _create_whole(self, name: str, content: bytes) -> None:
        """Create `name` holding `content`, or raise FileExistsError.

        The content is written to an unnamed file (O_TMPFILE) that is then linked
        in: an ADD killed at any moment leaves the whole reservation, which DEL
        finds by its owner, or nothing, never the empty file that only GC could
        release. Filesystems without O_TMPFILE get create-then-write.
        """
        try:
            fd = posix.open(".", posix.O_TMPFILE | posix.O_WRONLY | posix.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno not in (EOPNOTSUPP, EISDIR):
                raise
            fd = None
        if fd is None:
            fd = self._open(name, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL)
            try:
                posix.write(fd, content)
            except OSError:
                self.release(any_ip_to_int(name))
                raise
            finally:
                posix.close(fd)
            return
        try:
            posix.write(fd, content)
            # linkat never follows its new name, and fails with EEXIST when anything holds it.
            posix.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=self._dir_fd)
        finally:
            posix.close(fd)

    def _write_last(self, last_file: str, name: str) -> None:
        """Record `name` as the last reservation, the round-robin hint host-local keeps.

        Overwritten in place, then cut to length, never O_TRUNC: ext4 flushes a
        file truncated to zero and rewritten when it is closed (auto_da_alloc),
        ~0.2 ms of every ADD. A process killed in between leaves another address
        or text that is not one: a hint either way (`last_reserved`, `pick_address`).
        """
        try:
            fd = self._open(last_file, posix.O_WRONLY | posix.O_CREAT, 0o644)
        except OSError as exc:
            raise _refusal(self._path(last_file), exc) from None
        try:
            if not S_ISREG(posix.fstat(fd).st_mode):
                raise CniError(E.IO_FAILURE, f"{self._path(last_file)} is not a regular file (remove it)")
            data = name.encode()
            posix.pwrite(fd, data, 0)
            posix.ftruncate(fd, len(data))
        except OSError as exc:
            raise CniError(E.IO_FAILURE, f"cannot write {self._path(last_file)}: {exc.strerror}") from None
        finally:
            posix.close(fd)

    def release(self, ip: int) -> None:
        try:
            # unlink never follows: a link swapped in goes, not its target
            posix.unlink(addr_text(ip), dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass


def allocate(store, plan, container_id: str, ifname: str, requested=None) -> int:
    """Reserve one address of `plan` (a config.FamilyPlan) for (container_id, ifname) in a locked store;
    CniError when impossible, also when the pair already holds an address of the plan's family."""
    owners = store.reservations()
    ipv6 = is_ipv6(plan.gateway)
    held = [ip for ip in held_by(owners, container_id, ifname) if is_ipv6(ip) == ipv6]
    if held:
        raise _duplicate(held[0], container_id, ifname)
    if requested is not None:
        if not plan.start <= requested <= plan.end or requested == plan.gateway:
            raise CniError(E.ADDRESS_UNAVAILABLE, f"requested IP {addr_text(requested)} is outside the range "
                           f"{addr_text(plan.start)}-{addr_text(plan.end)} or is the gateway")
        if requested in owners or not store.reserve(requested, container_id, ifname, plan.index):
            raise CniError(E.ADDRESS_UNAVAILABLE, f"requested IP {addr_text(requested)} is already allocated")
        return requested
    taken = {ip for ip in owners if plan.start <= ip <= plan.end}
    last = store.last_reserved(plan.index)
    for _ in range(8):  # files another writer made without the lock are skipped, a bounded number of times
        ip = pick_address(plan.start, plan.end, plan.gateway, taken, last)
        if ip is None:
            raise CniError(E.EXHAUSTED, f"no IP addresses available in range "
                           f"{addr_text(plan.start)}-{addr_text(plan.end)}")
        if store.reserve(ip, container_id, ifname, plan.index):
            return ip
        taken.add(ip)
    raise CniError(E.TRY_AGAIN_LATER, "IPAM store keeps changing under the lock; try again")


def _duplicate(ip: int, container_id: str, ifname: str) -> CniError:
    return CniError(E.DUPLICATE_ALLOCATION, f"{addr_text(ip)} is already allocated to container "
                    f"{container_id} interface {ifname}; duplicate allocation is not allowed (DEL it first)")


def allocate_all(store, plans, container_id: str, ifname: str, requested=()) -> list:
    """One address per FamilyPlan, in order, in one locked store: all or none (a failure releases the
    ones already reserved). `requested`: at most one address per family (parse_netconf checked)."""
    held = held_by(store.reservations(), container_id, ifname)
    if held:
        raise _duplicate(held[0], container_id, ifname)
    families = {is_ipv6(plan.gateway) for plan in plans}
    for ip in requested:
        if is_ipv6(ip) not in families:
            raise CniError(E.ADDRESS_UNAVAILABLE, f"requested IP {addr_text(ip)} is {family_name(ip)}, and the "
                           f"network assigns no {family_name(ip)} address")
    got = []
    try:
        for plan in plans:
            wanted = next((ip for ip in requested if is_ipv6(ip) == is_ipv6(plan.gateway)), None)
            got.append(allocate(store, plan, container_id, ifname, wanted))
    except BaseException:
        for ip in got:
            store.release(ip)
        raise
    return got


def release_owner(store, container_id: str, ifname: str) -> list:
    """Release every address held by (container_id, ifname), of both families; returns the addresses."""
    released = held_by(store.reservations(), container_id, ifname)
    for ip in released:
        store.release(ip)
    return released
