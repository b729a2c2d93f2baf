"""A throw-away single-member etcd for tests and the lab: temp data dir, free ports, optional netns."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

ETCD_EXE = os.environ.get("VXLAN_NET_ETCD_EXE", "/usr/bin/etcd")
ETCDCTL_EXE = os.environ.get("VXLAN_NET_ETCDCTL_EXE", "/usr/bin/etcdctl")
STOP_TIMEOUT = 5.0


class EtcdServerError(RuntimeError):
    """etcd did not start, or not in time (the message names its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel picks; a race with others is unlikely)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd process we started: `start()`, `stop()` (graceful), `kill()`, `start()` again on the same data.

    With `netns`, etcd runs via `ip netns exec` and `host` must be an address of that namespace;
    ports then default to 2379/2380 (free-port probing only works in our own namespace).
    With `cert_file`/`key_file`, clients talk TLS (`https://`); the peer port stays plain.
    With `trusted_ca_file` too, etcd demands client certificates signed by that CA (`--client-cert-auth`);
    its own health checks then present `client_cert_file`/`client_key_file`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        client_port: Optional[int] = None,
        peer_port: Optional[int] = None,
        data_dir: Optional[str | Path] = None,
        netns: Optional[str] = None,
        name: str = "vxlan-net-test",
        ready_timeout: float = 15.0,
        log_path: Optional[str | Path] = None,
        cert_file: Optional[str | Path] = None,
        key_file: Optional[str | Path] = None,
        trusted_ca_file: Optional[str | Path] = None,
        client_cert_file: Optional[str | Path] = None,
        client_key_file: Optional[str | Path] = None,
    ) -> None:
        if (cert_file is None) != (key_file is None):
            raise ValueError("TLS needs both cert_file and key_file")
        if trusted_ca_file and not (cert_file and client_cert_file and client_key_file):
            raise ValueError("client certificate auth needs cert_file/key_file and a client cert for health checks")
        self.cert_file = str(cert_file) if cert_file else None
        self.key_file = str(key_file) if key_file else None
        self.trusted_ca_file = str(trusted_ca_file) if trusted_ca_file else None
        self.client_cert_file = str(client_cert_file) if client_cert_file else None
        self.client_key_file = str(client_key_file) if client_key_file else None
        self.host = host
        self.netns = netns
        self.name = name
        self.ready_timeout = ready_timeout
        default_client, default_peer = (2379, 2380) if netns else (None, None)
        self.client_port = client_port or default_client or free_port(host)
        self.peer_port = peer_port or default_peer or free_port(host)
        self._own_dir = data_dir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="vxlan-net-etcd-")) if data_dir is None else Path(data_dir).parent
        self.data_dir = self.workdir / "data" if data_dir is None else Path(data_dir)
        self.log_path = Path(log_path) if log_path else self.workdir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def client_url(self) -> str:
        scheme = "https" if self.cert_file else "http"
        return f"{scheme}://{self._url_host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self._url_host}:{self.peer_port}"

    @property
    def _url_host(self) -> str:
        """The host as a URL names it: an IPv6 address in brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        argv = [
            ETCD_EXE,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            # a single member: a short election makes start-up and restarts quick
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
        ]
        if self.cert_file and self.key_file:
            argv += ["--cert-file", self.cert_file, "--key-file", self.key_file]
        if self.trusted_ca_file:
            argv += ["--client-cert-auth", "--trusted-ca-file", self.trusted_ca_file]
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start(self) -> "EtcdServer":
        """Start etcd (again, on the same data dir) and wait until it answers; no-op if running."""
        if self.running():
            return self
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}  # no stray ETCD_* settings
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        for _ in range(int(self.ready_timeout / 0.05) + 1):
            if self.proc is None or self.proc.poll() is not None:
                code = self.proc.returncode if self.proc else None
                raise EtcdServerError(f"etcd exited with {code}; see {self.log_path}:\n{self.log_tail()}")
            if self._healthy():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise EtcdServerError(f"etcd not healthy within {self.ready_timeout}s; see {self.log_path}:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        if self.netns:  # not reachable from our namespace: ask etcdctl inside it
            tls = ["--cacert", self.trusted_ca_file or self.cert_file] if self.cert_file else []
            if self.trusted_ca_file:
                tls += ["--cert", self.client_cert_file, "--key", self.client_key_file]
            cmd = ["ip", "netns", "exec", self.netns, ETCDCTL_EXE, "--endpoints", self.client_url, *tls,
                   "--dial-timeout", "1s", "--command-timeout", "1s", "endpoint", "health"]
            env = dict(os.environ, ETCDCTL_API="3")
            proc = subprocess.run(cmd, capture_output=True, timeout=5, env=env, text=True)
            # with auth enabled etcd answers the anonymous probe "user name is empty": it is serving
            return proc.returncode == 0 or "user name is empty" in proc.stdout + proc.stderr
        try:
            context = ssl.create_default_context(cafile=self.trusted_ca_file or self.cert_file) if self.cert_file else None
            if context is not None and self.trusted_ca_file:
                context.load_cert_chain(self.client_cert_file, self.client_key_file)
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1, context=context) as response:
                return b'"health":"true"' in response.read()
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM our etcd by PID, SIGKILL after `timeout` seconds."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL our etcd by PID (a crash: no graceful shutdown)."""
        self._signal(signal.SIGKILL, STOP_TIMEOUT)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> "EtcdServer":
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop etcd and remove the temp dir we created (a data dir given to us stays)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "EtcdServer":
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run: remove the temp dir here
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
