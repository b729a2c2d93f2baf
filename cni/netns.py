"""Entering a network namespace, also from Python 3.11, which has no `os.setns`.

Python 3.12+ has `posix.setns`. On 3.11, `_ctypes.call_function` reaches
libc's setns(2) without importing `ctypes` (a few milliseconds of the
plugin's start-up budget; loading `_ctypes` alone costs ~0.35 ms, so it is
only the fallback). The plugin is single threaded, so switching the
process's namespace is safe; the caller always switches back in a `finally`.
"""

import posix
from fcntl import ioctl

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl: which kind of namespace an nsfs fd is

if hasattr(posix, "setns"):
    def setns(fd: int) -> None:
        posix.setns(fd, CLONE_NEWNET)

else:
    import _ctypes

    _SETNS = _ctypes.dlsym(_ctypes.dlopen(None), "setns")

    def setns(fd: int) -> None:
        if _ctypes.call_function(_SETNS, (fd, CLONE_NEWNET)) != 0:
            raise OSError(22, "setns failed: not a network namespace, or not permitted")


def open_netns(path: str) -> int:
    return posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)


def is_netns(fd: int) -> bool:
    try:
        return ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:  # not an nsfs file at all
        return False


class Entered:
    """`with Entered(fd):` runs the block inside the netns of fd, then returns to ours."""

    def __init__(self, fd: int):
        self.fd = fd
        self.home = None

    def __enter__(self):
        self.home = posix.open("/proc/thread-self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC)
        try:
            setns(self.fd)
        except OSError:
            posix.close(self.home)
            raise
        return self

    def __exit__(self, *exc):
        try:
            setns(self.home)
        finally:
            posix.close(self.home)
        return False
