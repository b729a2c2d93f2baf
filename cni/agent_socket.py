"""DEL's fast path: the node agent deletes the host veth, asked over a root-only unix socket.

Deleting a veth costs the kernel ~20 ms (synchronize_net); the plugin's DEL
hands that wait to the already-running agent (`vxlan_net.agent.cni_service`) and
returns. The socket is `cni.sock` next to the subnet file. The agent answers
`accepted` only after checking the name and the device; any other answer, or
none within a few ms, and the plugin deletes in-process as before.

Protocol (one request per stream connection): `delete host veth NAME netns INODE\\n`
(INODE: the plugin's network namespace, so an agent in another namespace
refuses instead of deleting a namesake there), answered by one line:
`accepted`, `gone` (no such device: nothing to do), `busy` (queue full) or
`refused <reason>`.

Both sides lock one byte of `<socket>.lock`, chosen by the veth name, while they
touch that name (the plugin around ADD's veth creation, the agent around its
look-up-then-delete), so a deletion queued by a DEL can never hit the veth that
an ADD right after it creates under the same name.
"""

import posix
from _socket import AF_UNIX, SOCK_CLOEXEC, SOCK_STREAM, socket

from .config import join_path, parent_dir
from .netlink import netns_id

SOCKET_NAME = "cni.sock"
LOCK_SUFFIX = ".lock"
REQUEST_PREFIX = "delete host veth "
NETNS_WORD = " netns "
MAX_MESSAGE = 96  # bytes, both ways; a request is at most 17 + 15 + 7 + 20 + 1
REPLY_TIMEOUT = 0.005  # seconds the plugin waits for the agent before deleting in-process
HOST_VETH_PREFIX = "vxn"
HOST_VETH_DIGEST_CHARS = 12
_LOWER_HEX = frozenset("0123456789abcdef")


def is_host_veth_name(name) -> bool:
    """True for names the plugin derives (`host_veth_name`): `vxn` + 12 lower-case hex digits."""
    return (isinstance(name, str) and len(name) == len(HOST_VETH_PREFIX) + HOST_VETH_DIGEST_CHARS
            and name.startswith(HOST_VETH_PREFIX) and set(name[len(HOST_VETH_PREFIX):]) <= _LOWER_HEX)


def socket_path(subnet_file: str) -> str:
    return join_path(parent_dir(subnet_file) or ".", SOCKET_NAME)


def lock_offset(name: str) -> int:
    """The byte of the lock file that guards `name` (one of 65,536)."""
    return int(name[len(HOST_VETH_PREFIX):len(HOST_VETH_PREFIX) + 4], 16)


class NameLock:
    """`with NameLock(lock_path, name):` holds the name's byte of the lock file (POSIX record lock).

    A missing directory means no agent serves there, so there is nothing to
    exclude: the block then runs unlocked. So does a link planted at the
    lock's path: O_CREAT through it would create any file the link names.
    """

    def __init__(self, path: str, name: str):
        self.path, self.offset, self.fd = path, lock_offset(name), None

    def __enter__(self):
        from fcntl import LOCK_EX, lockf

        try:
            flags = posix.O_RDWR | posix.O_CREAT | posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_CLOEXEC
            self.fd = posix.open(self.path, flags, 0o600)
        except OSError:
            return self
        try:
            lockf(self.fd, LOCK_EX, 1, self.offset)
        except BaseException:
            posix.close(self.fd)
            self.fd = None
            raise
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            posix.close(self.fd)  # closing drops the record lock
            self.fd = None
        return False


def ask_agent_to_delete(path: str, name: str, timeout: float = REPLY_TIMEOUT) -> bool:
    """True when the agent took over deleting `name` (or found it gone); False: delete it yourself."""
    try:
        sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)
    except OSError:
        return False
    try:
        netns = netns_id()
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(f"{REQUEST_PREFIX}{name}{NETNS_WORD}{netns}\n".encode())
        reply = sock.recv(MAX_MESSAGE)
    except OSError:  # no socket, nobody listening, backlog full, timed out
        return False
    finally:
        sock.close()
    return reply in (b"accepted\n", b"gone\n")
