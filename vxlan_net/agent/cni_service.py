"""The agent's half of the CNI plugin's DEL fast path: delete the plugin's host veths on request.

A root-only unix stream socket (`cni.sock` next to the subnet file; protocol in
`cni.agent_socket`). One thread answers requests after strict checks: the peer
is root and in our network namespace, the name is one the plugin derives, the
device is a veth whose master (if any) is a bridge. A second thread deletes the
accepted veths through `kernel.delete_link`, so the plugin need not wait for
the kernel's ~20 ms. Both are bounded (request size, queue length) and log
and carry on on any error. `python -m vxlan_net.agent.cni_service --socket PATH` runs
the service alone (benchmarks, tests).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import stat
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from cni import netlink as nl
from cni.agent_socket import LOCK_SUFFIX, MAX_MESSAGE, NETNS_WORD, REQUEST_PREFIX, NameLock, is_host_veth_name

from vxlan_net.doors import kernel

log = logging.getLogger("vxlan_net.agent.cni_service")  # also when run as __main__

QUEUE_LIMIT = 64
"""Accepted deletions waiting for the kernel; beyond it the plugin is told `busy` and deletes itself."""
LOOP_TICK = 0.5
"""Longest wait between checks of the stop flag."""
REQUEST_TIMEOUT = 0.1
"""A connected peer that sends no full request within this is dropped."""
DRAIN_TIMEOUT = 2.0
"""On close, seconds the worker keeps deleting what it already accepted."""
BACKLOG = 32
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class Refused(Exception):
    """A request the service will not act on; `kind` groups them for logging once."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def parse_request(data: bytes) -> tuple[str, int]:
    """`delete host veth NAME netns INODE\\n` -> (NAME, INODE); Refused otherwise."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise Refused("malformed request", "not ASCII") from None
    if not text.startswith(REQUEST_PREFIX) or not text.endswith("\n"):
        raise Refused("malformed request", repr(text[:40]))
    name, sep, netns = text[len(REQUEST_PREFIX):-1].partition(NETNS_WORD)
    if not sep or not netns.isdigit() or not netns.isascii() or len(netns) > 20:
        raise Refused("malformed request", repr(text[:40]))
    if not is_host_veth_name(name):
        raise Refused("name outside the plugin's scheme", repr(name))
    return name, int(netns)


def check_device(link, master) -> None:
    """Refused unless `link` is a veth whose master, if it has one, is a bridge (`master`: None if vanished)."""
    if link.kind != "veth":
        raise Refused("not a veth", f"{link.name} is a {link.kind or 'device without kind'}")
    if link.master and (master is None or master.kind != "bridge"):
        raise Refused("master is not a bridge", f"{link.name} is enslaved to "
                      + (f"{master.name}, a {master.kind or 'device without kind'}" if master else "a vanished device"))


class CniService:
    """`start()` serves `path` in two daemon threads; `close()` stops them and removes the socket."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = str(self.path) + LOCK_SUFFIX
        self._queue: queue.Queue[tuple[str, int]] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._stop = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._threads: list[threading.Thread] = []
        self._logged: dict[str, int] = {}
        self._inode: Optional[int] = None

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> "CniService":
        """Bind and serve; on failure log why and return without serving (the plugin deletes in-process)."""
        try:
            self._listener = self._bind()
        except OSError as exc:
            log.warning("CNI socket %s not served (the plugin deletes veths itself): %s", self.path, exc)
            return self
        if self._listener is None:
            return self
        for target, name in ((self._serve, "cni-service"), (self._work, "cni-service-delete")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("serving CNI veth deletions on %s", self.path)
        return self

    @property
    def serving(self) -> bool:
        return bool(self._threads)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=DRAIN_TIMEOUT + 2 * LOOP_TICK)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                if os.lstat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
        self._threads = []

    def _bind(self) -> Optional[socket.socket]:
        """Bind in a private 0700 directory, chmod 0600, then rename into place: never reachable by others."""
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(directory)
        if info.st_uid != 0 or info.st_mode & 0o022:
            raise OSError(f"directory {directory} must be owned by root and not group/world-writable")
        if self._someone_serves():
            log.warning("CNI socket %s is served by another process; not serving it", self.path)
            return None
        if os.path.lexists(self.path) and not stat.S_ISSOCK(os.lstat(self.path).st_mode):
            raise OSError(f"{self.path} exists and is not a socket")
        private = tempfile.mkdtemp(prefix=".cni-sock-", dir=directory)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            staged = os.path.join(private, "sock")
            sock.bind(staged)
            os.chmod(staged, 0o600)
            sock.listen(BACKLOG)
            sock.settimeout(LOOP_TICK)
            os.replace(staged, self.path)
            self._inode = os.lstat(self.path).st_ino
        except BaseException:
            sock.close()
            raise
        finally:
            try:
                os.rmdir(private)
            except OSError:
                pass
        return sock

    def _someone_serves(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(0.2)
        try:
            probe.connect(str(self.path))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    # -- answering requests ----------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():  # accept() times out every LOOP_TICK
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                self._log_once("accept failed", str(exc))
                self._stop.wait(LOOP_TICK)
                continue
            try:
                with conn:
                    conn.settimeout(REQUEST_TIMEOUT)
                    conn.sendall(self._answer(conn).encode())
            except (BrokenPipeError, ConnectionResetError):
                # The plugin stopped waiting and deletes in-process; if we queued it too, the
                # deletion finds the veth gone (or a newer one under the name, which it spares).
                self._log_once("plugin stopped waiting", "it deleted the veth itself")
            except Exception as exc:  # a peer that sent nothing, or a bug: never the agent
                self._log_once("request failed", repr(exc))

    def _answer(self, conn: socket.socket) -> str:
        try:
            return self._handle(conn)
        except Refused as exc:
            self._log_once(exc.kind, exc.detail)
            return f"refused {exc.kind}\n"

    def _handle(self, conn: socket.socket) -> str:
        pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid != 0:
            raise Refused("peer is not root", f"pid {pid} uid {uid}")
        data = b""
        for _ in range(MAX_MESSAGE):
            chunk = conn.recv(MAX_MESSAGE + 1 - len(data))
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n") or len(data) > MAX_MESSAGE:
                break
        if len(data) > MAX_MESSAGE:
            raise Refused("malformed request", f"longer than {MAX_MESSAGE} bytes")
        name, netns = parse_request(data)
        if netns != nl.netns_id():
            raise Refused("peer in another network namespace", f"{name} from netns {netns}")
        link = self._check_link(name)
        if link is None:
            return "gone\n"
        try:
            self._queue.put_nowait((name, link.index))
        except queue.Full:
            self._log_once("queue full", f"{QUEUE_LIMIT} deletions pending; {name} left to the plugin")
            return "busy\n"
        return "accepted\n"

    @staticmethod
    def _check_link(name: str):
        """The link if the plugin may have it deleted (`check_device`); None if absent."""
        with nl.Netlink() as sock:
            link = sock.get_link(name)
            master = None
            if link is not None and link.master:
                _, replies = sock.call(nl.RTM_GETLINK, 0, nl.ifinfo(link.master), ok=(nl.ENODEV,))
                master = replies[0] if replies else None
        if link is not None:
            check_device(link, master)
        return link

    # -- deleting --------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=LOOP_TICK)
            except queue.Empty:
                continue
            self._delete_logged(*item)
        deadline = time.monotonic() + DRAIN_TIMEOUT  # finish what the plugin was told is accepted
        while time.monotonic() < deadline:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._delete_logged(*item)

    def _delete_logged(self, name: str, index: int) -> None:
        try:
            self._delete(name, index)
        except Exception as exc:  # KernelError, a lock that failed, a bug: log, keep serving
            self._log_once("delete failed", f"{name}: {exc}")

    def _delete(self, name: str, index: int) -> None:
        # The name lock keeps an ADD from creating a new veth under this name between the
        # look-up and the deletion; the index check skips one an ADD created before.
        with NameLock(self.lock_path, name), nl.Netlink() as sock:
            link = sock.get_link(name)
            if link is None or link.index != index or link.kind != "veth":
                return
            kernel.delete_link(name)
        log.debug("deleted host veth %s for the CNI plugin", name)

    def _log_once(self, kind: str, detail: str) -> None:
        """Warn on the first of a kind, then debug: a misbehaving client must not flood the log."""
        count = self._logged.get(kind, 0) + 1
        self._logged[kind] = count
        if count == 1:
            log.warning("CNI socket: %s: %s (further ones at debug level)", kind, detail)
        else:
            log.debug("CNI socket: %s: %s (%d so far)", kind, detail, count)


def main(argv=None) -> int:
    """Serve one socket in the foreground until SIGTERM/SIGINT (no etcd, no agent)."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m vxlan_net.agent.cni_service", description=main.__doc__)
    parser.add_argument("--socket", required=True, type=Path, help="path of the unix socket to serve")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("vxlan_net").setLevel(args.log_level.upper())
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service = CniService(args.socket).start()
    if not service.serving:
        return 1
    print(f"serving {args.socket}", flush=True)
    try:
        while not stop.wait(LOOP_TICK):
            pass
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
