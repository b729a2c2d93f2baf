"""Mutual TLS to a lab etcd that demands client certificates: right certs join; wrong ones are named and retried."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from integration.cluster import add_pod, node_subnet, start_agents, wait_converged
from integration.etcd_server import EtcdServer
from integration.lab import Lab, Node

pytestmark = pytest.mark.lab

FAST = ("--resync-interval", "2")
# The certificates are made with the openssl CLI: the `cryptography` package is not in the venv.
CA_CONFIG = """[ca]
default_ca = lab_ca
[lab_ca]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any_name
unique_subject = no
[any_name]
commonName = supplied
"""


class ThrowAwayPki:
    """A CA, etcd's server certificate and client certificates, made in `directory` with openssl."""

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.cnf").write_text(CA_CONFIG)
        (directory / "index.txt").write_text("")
        (directory / "serial").write_text("01\n")

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.dir, capture_output=True, check=True, timeout=30)

    def key(self, name: str) -> Path:
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")
        return self.dir / f"{name}.key"

    def ca(self, name: str) -> Path:
        self.key(name)
        self._openssl("req", "-x509", "-new", "-key", f"{name}.key", "-days", "2", "-subj", f"/CN={name}",
                      "-out", f"{name}.pem")
        return self.dir / f"{name}.pem"

    def issue(self, name: str, ca: str, extensions: str, start: str | None = None,
              end: str | None = None) -> tuple[Path, Path]:
        """A certificate for `name` signed by CA `ca`: (cert, key). `start`/`end` as YYYYMMDDHHMMSSZ."""
        self.key(name)
        (self.dir / f"{name}.ext").write_text(extensions + "\n")
        self._openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr")
        dates = ["-startdate", start, "-enddate", end] if start and end else ["-days", "2"]
        self._openssl("ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", f"{ca}.pem", "-keyfile", f"{ca}.key",
                      "-extfile", f"{name}.ext", *dates, "-in", f"{name}.csr", "-out", f"{name}.pem")
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"


class TlsEtcd:
    """An etcd factory for `Lab(etcd=...)`: https only, `--client-cert-auth`; its PKI is kept in `.pki`."""

    pki: ThrowAwayPki

    def __call__(self, lab: Lab) -> EtcdServer:
        pki = self.pki = ThrowAwayPki(lab.workdir / "pki")
        pki.ca("ca")
        pki.ca("other-ca")
        server = pki.issue("etcd", "ca", f"subjectAltName=IP:{lab.etcd_host.public_ip}\n"
                                         "extendedKeyUsage=serverAuth")
        client = pki.issue("node", "ca", "extendedKeyUsage=clientAuth")
        pki.issue("expired", "ca", "extendedKeyUsage=clientAuth", start="20200101000000Z", end="20200102000000Z")
        etcd_dir = lab.workdir / "etcd"
        return EtcdServer(host=lab.etcd_host.public_ip, netns=lab.etcd_host.name, data_dir=etcd_dir / "data",
                          log_path=etcd_dir / "etcd.log", cert_file=server[0], key_file=server[1],
                          trusted_ca_file=pki.dir / "ca.pem", client_cert_file=client[0],
                          client_key_file=client[1]).start()


def tls_flags(pki: ThrowAwayPki, ca: str = "ca", client: str | None = "node") -> list[str]:
    flags = ["--etcd-cafile", str(pki.dir / f"{ca}.pem")]
    if client:
        flags += ["--etcd-certfile", str(pki.dir / f"{client}.pem"), "--etcd-keyfile", str(pki.dir / f"{client}.key")]
    return flags


def rejections(lab: Lab, node: Node) -> int:
    """TLS connections etcd turned away from `node`, from etcd's own log."""
    text = lab.etcd.log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if f'rejected connection from "{node.public_ip}:' in line)


def test_agents_with_the_right_certs_join_and_bad_certs_are_named_and_retried(lab):
    etcd = TlsEtcd()
    lab = lab(nodes=4, etcd=etcd)
    pki = etcd.pki
    good, wrong_ca, expired, no_cert = lab.nodes
    assert lab.etcd_url.startswith("https://")
    good.run(lab.agent_exe, "config", "set", "--etcd-endpoints", lab.etcd_url, "--network", "198.19.0.0/16",
             *tls_flags(pki), check=True)
    # etcd demands a client certificate: etcdctl without one is refused, with one it reads the config
    bare = lab.etcdctl("--cacert", str(pki.dir / "ca.pem"), "get", "/vxlan-net/config", timeout=3, check=False)
    assert bare.returncode != 0
    assert "198.19.0.0/16" in lab.etcdctl(*tls_flags_for_etcdctl(pki), "get", "/vxlan-net/config").stdout

    start_agents(lab, [good], *FAST, *tls_flags(pki))
    cases = {
        wrong_ca: (tls_flags(pki, ca="other-ca"),
                   f"etcd's server certificate does not verify against the CA certificate {pki.dir / 'other-ca.pem'}"),
        expired: (tls_flags(pki, client="expired"),
                  f"etcd refused the client certificate {pki.dir / 'expired.pem'}: it expired on Jan  2 00:00:00 2020"),
        no_cert: (tls_flags(pki, client=None),
                  "etcd refused the connection: it requires a client certificate and none was given"),
    }
    started = time.monotonic()
    for node, (flags, _) in cases.items():
        lab.start_agent(node, *FAST, *flags)
    for node, (_, expected) in cases.items():
        lab.wait_for(lambda: expected in node.agent.log_text(), timeout=10,
                     message=f"{node.name}: no {expected!r} in its log")
    seen = {node: rejections(lab, node) for node in cases}
    time.sleep(max(0.0, 5.0 - (time.monotonic() - started)) + 2.0)  # alive after 5 s, still retrying
    for node, (_, expected) in cases.items():
        log = node.agent.log_text()
        assert node.agent.alive(), f"{node.name} exited: {log[-1500:]}"
        assert "Traceback" not in log
        lines = [line for line in log.splitlines() if expected in line]
        assert 1 <= len(lines) <= 3, lines  # once per distinct message, not once per retry
        assert " WARNING " in lines[0] and "TLS: " in lines[0]
        assert rejections(lab, node) > seen[node], f"{node.name} stopped trying"  # etcd's view: still knocking
        assert node_subnet(node) is None

    for node in cases:  # fixed: the right certificates, and every node joins
        node.agent.stop()
    start_agents(lab, cases, *FAST, *tls_flags(pki))
    wait_converged(lab, lab.nodes, timeout=20)
    pods = [add_pod(lab, node, 1) for node in lab.nodes]
    for pod in pods[1:]:
        assert pods[0].ping(pod.ip, count=1, timeout=3), f"{pods[0].ip} -> {pod.ip}"


def tls_flags_for_etcdctl(pki: ThrowAwayPki) -> list[str]:
    return ["--cacert", str(pki.dir / "ca.pem"), "--cert", str(pki.dir / "node.pem"), "--key", str(pki.dir / "node.key")]
