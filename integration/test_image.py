"""The image, built and run as examples/kubernetes/'s DaemonSet runs it, beside native agents.

Everything the containers get (command, arguments, environment, mounts, capabilities, read-only
root, probe paths and ports) is read from the DaemonSet YAML itself, so the example cannot drift
from what ran here; a field this translation does not know fails the test instead of being
dropped. Host paths land under a per-node directory (the "host" of that node); the lab's etcd
speaks mutual TLS, with the client certificate in the Secret's volume as the YAML mounts it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from integration.cluster import http_get, node_subnet, overlay_routes, start_agents, wait_converged, write_config
from integration.cni_pods import add_pod_via_cni
from integration.image import ULIMITS, Podman, built_image, load, mounted
from integration.lab import LabError, Node
from integration.test_etcd_tls import TlsEtcd, tls_flags, tls_flags_for_etcdctl

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[1]
DAEMONSET = ROOT / "examples" / "kubernetes" / "vxlan-net-daemonset.yaml"
FAST = ("--resync-interval", "2")
STOPPED = "stopping; kernel entries and the lease stay in place"


def manifests() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(DAEMONSET.read_text()) if doc}


def pod_spec() -> dict:
    spec = manifests()["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True, "the agent programs the node's own network"
    return spec


def container(name: str) -> dict:
    spec = pod_spec()
    (found,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    return found


def _size(limit: str) -> str:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", limit).groups()
    return number + unit[0].lower()


class NodeHost:
    """What the kubelet would give the containers on one lab node: host paths, ConfigMap and Secret files."""

    def __init__(self, node: Node, secrets: dict[str, dict[str, bytes]], overrides: dict[str, str]):
        self.node = node
        self.root = node.workdir / "host"
        self.secrets = secrets
        self.overrides = overrides  # ConfigMap keys that name this cluster (the etcd endpoints)
        self.configmap = manifests()["ConfigMap"]["data"]

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def run_args(self, spec: dict) -> list[str]:
        """`podman run` arguments for one container of the DaemonSet, in this node's network namespace."""
        known = {"name", "image", "command", "args", "env", "ports", "readinessProbe", "livenessProbe",
                 "securityContext", "resources", "volumeMounts"}
        assert set(spec) <= known, f"the test does not know how to run {set(spec) - known}: teach it"
        grace = pod_spec().get("terminationGracePeriodSeconds", 30)
        args = ["--network", f"ns:/run/netns/{self.node.name}", "--runtime", "runc", *ULIMITS,
                "--stop-timeout", str(grace), "--entrypoint", json.dumps(spec["command"])]
        args += self._security(spec.get("securityContext", {}))
        args += [f"--env={key}={value}" for key, value in self._env(spec.get("env", []))]
        for mount in spec.get("volumeMounts", []):
            args += self._mount(mount)
        return args

    def _security(self, context: dict) -> list[str]:
        assert set(context) <= {"readOnlyRootFilesystem", "capabilities"}, context
        args = ["--read-only", "--read-only-tmpfs=false"] if context.get("readOnlyRootFilesystem") else []
        caps = context.get("capabilities", {})
        args += [f"--cap-drop={c.lower()}" for c in caps.get("drop", [])]
        return args + [f"--cap-add={c}" for c in caps.get("add", [])]

    def _env(self, entries: list[dict]) -> list[tuple[str, str]]:
        out = []
        for entry in entries:
            if "value" in entry:
                out.append((entry["name"], entry["value"]))
                continue
            source = entry["valueFrom"]
            if "configMapKeyRef" in source:
                key = source["configMapKeyRef"]["key"]
                out.append((entry["name"], self.overrides.get(key, self.configmap[key])))
            else:
                assert source["fieldRef"]["fieldPath"] == "status.hostIP", source
                out.append((entry["name"], self.node.public_ip))
        return out

    def _mount(self, mount: dict) -> list[str]:
        (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
        target, read_only = mount["mountPath"], mount.get("readOnly", False)
        suffix = ":ro" if read_only else ""
        if "hostPath" in volume:
            host_path = self.path(volume["hostPath"]["path"])
            host_path.mkdir(parents=True, exist_ok=True)  # DirectoryOrCreate (/lib/modules: empty here)
            return ["--volume", f"{host_path}:{target}{suffix}"]
        if "configMap" in volume:
            folder = self.root / "configmaps" / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for item in volume["configMap"]["items"]:
                (folder / item["path"]).write_text(self.configmap[item["key"]])
            return ["--volume", f"{folder}:{target}{suffix}"]
        if "secret" in volume:
            folder = self.root / "secrets" / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in self.secrets[volume["secret"]["secretName"]].items():
                (folder / name).write_bytes(data)
                os.chmod(folder / name, volume["secret"].get("defaultMode", 0o644))
            return ["--volume", f"{folder}:{target}{suffix}"]
        empty = volume["emptyDir"]
        assert empty.get("medium") == "Memory", empty
        return ["--mount", f"type=tmpfs,destination={target},tmpfs-size={_size(empty['sizeLimit'])}"]


def health_port_and_paths(spec: dict) -> tuple[int, dict[str, str]]:
    """The port the probes use (also the listen port in VXLAN_NET_HEALTHZ_ADDR and containerPort)."""
    probes = {kind: spec[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    ports = {probe["port"] for probe in probes.values()} | {p["containerPort"] for p in spec["ports"]}
    (listen,) = [e["value"] for e in spec["env"] if e["name"] == "VXLAN_NET_HEALTHZ_ADDR"]
    ports.add(int(listen.rpartition(":")[2]))
    assert len(ports) == 1, f"probes, containerPort and VXLAN_NET_HEALTHZ_ADDR disagree: {ports}"
    return ports.pop(), {kind: probe["path"] for kind, probe in probes.items()}


@pytest.fixture(scope="session")
def image(request):
    built = built_image()
    how = "from the cache" if built.cached else "built now"
    line = (f"vxlan-net image ({how}; a cold build took {built.build_seconds:.0f} s): "
            f"{built.size / 2**20:.0f} MiB on the mmdebstrap bookworm base")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown in every run, not only on failure
            reporter.write_line("\n" + line)
    return built


def probe(node: Node, port: int, path: str) -> int | None:
    """The HTTP status the kubelet would get on the node's address; None while nothing answers."""
    try:
        return http_get(node, f"http://{node.public_ip}:{port}{path}")[0]
    except LabError:
        return None


def vtep_mac(node: Node) -> str:
    (link,) = node.ip_json("link", "show", "vxnet.1")
    return link["address"]


def test_the_translation_refuses_what_it_does_not_know(tmp_path):
    class Stub:
        workdir, name, public_ip = tmp_path, "none", "198.18.1.2"

    host = NodeHost(Stub(), {}, {})
    with pytest.raises(AssertionError, match="teach it"):
        host.run_args({**container("agent"), "stdin": True})
    with pytest.raises(AssertionError):
        host._security({"privileged": True})
    with pytest.raises(AssertionError, match="disagree"):
        spec = container("agent")
        health_port_and_paths({**spec, "ports": [{"containerPort": 9999}]})


def test_the_image_runs_as_the_daemonset_says_beside_native_agents(lab, image):
    etcd = TlsEtcd()
    lab = lab(nodes=3, etcd=etcd)
    pki = etcd.pki
    node, natives = lab.nodes[0], lab.nodes[1:]
    write_config(lab, *tls_flags(pki))
    start_agents(lab, natives, *FAST, *tls_flags(pki))
    node.sysctl("net.ipv4.ip_forward", 1)  # the DaemonSet's prerequisite 4: the agent cannot set it
    secrets = {"vxlan-net-etcd-tls": {"ca.crt": (pki.dir / "ca.pem").read_bytes(),
                                      "tls.crt": (pki.dir / "node.pem").read_bytes(),
                                      "tls.key": (pki.dir / "node.key").read_bytes()}}
    host = NodeHost(node, secrets, {"etcd-endpoints": lab.etcd_url})
    node.subnet_file = host.path("/run/vxlan-net/subnet.env")  # the agent's default, on the hostPath
    agent, installer = container("agent"), container("install-cni")
    port, paths = health_port_and_paths(agent)
    podman = Podman(node.workdir / "podman")
    tag = load(podman, image)
    try:
        # The init container: plugin and conflist into the host's directories. Here the host's
        # bin dir is not /opt/cni/bin, so the launcher must be told where the host sees it.
        bin_dir = host.path("/opt/cni/bin")
        podman("run", "--rm", "--name", "install-cni", *host.run_args(installer), tag, *installer["args"],
               f"--host-cni-bin-dir={bin_dir}", timeout=120)
        launcher = bin_dir / "vxlan-net-cni"
        assert os.access(launcher, os.X_OK) and "/usr/bin/python3" in launcher.read_text()
        conflist = host.path("/etc/cni/net.d/10-vxlan-net.conflist").read_text()
        assert conflist == manifests()["ConfigMap"]["data"]["10-vxlan-net.conflist"]

        podman("run", "--detach", "--name", "agent", *host.run_args(agent), tag, *agent["args"])
        caps = podman("inspect", "--format", "{{json .EffectiveCaps}}", "agent").stdout
        assert sorted(json.loads(caps)) == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
        lab.wait_for(lambda: node_subnet(node), timeout=30, message="the agent container wrote no subnet file")
        wait_converged(lab, lab.nodes, timeout=30)
        for kind, path in paths.items():  # as the kubelet probes: the node's address, the probe's port
            lab.wait_for(lambda: probe(node, port, path) == 200, timeout=15,
                         message=f"{kind} {path} on port {port} did not answer 200")
        assert podman("healthcheck", "run", "agent", check=False).returncode == 0
        # The same check where nothing listens (a network of its own, no agent) must fail.
        podman("run", "--detach", "--name", "no-agent", "--network", "none", "--runtime", "runc", *ULIMITS,
               "--entrypoint", '["sleep", "60"]', tag)
        assert podman("healthcheck", "run", "no-agent", check=False).returncode != 0
        podman("rm", "--force", "--time", "0", "no-agent")

        lab._cni_plugin = str(launcher)  # pods wired by the launcher the image installed
        pods = [add_pod_via_cni(lab, n, f"p{n.index}") for n in lab.nodes]
        for other in pods[1:]:
            assert pods[0].ping(other.ip, count=1, timeout=3), f"{pods[0].ip} -> {other.ip}"
            assert other.ping(pods[0].ip, count=1, timeout=3), f"{other.ip} -> {pods[0].ip}"

        subnet, mac, routes = node_subnet(node), vtep_mac(node), overlay_routes(node)
        key = f"/vxlan-net/subnets/{subnet.network_address}-{subnet.prefixlen}"
        lease_of = lambda: [kv.get("lease") for kv in json.loads(lab.etcdctl(  # noqa: E731
            *tls_flags_for_etcdctl(pki), "get", key, "-w", "json").stdout).get("kvs", [])]
        lease = lease_of()
        assert lease and lease[0]

        podman("stop", "agent", timeout=60)  # SIGTERM, as the kubelet stops it
        state = json.loads(podman("inspect", "--format", "{{json .State}}", "agent").stdout)
        logs = podman("logs", "agent").stdout + podman("logs", "agent").stderr
        assert state["ExitCode"] == 0 and STOPPED in logs, (state, logs[-2000:])
        assert overlay_routes(node) == routes and vtep_mac(node) == mac
        assert lease_of() == lease, "the lease must outlive the container"
        assert pods[0].ping(pods[1].ip, count=1, timeout=3), "pods lost the overlay when the agent stopped"

        podman("rm", "agent")
        podman("run", "--detach", "--name", "agent-2", *host.run_args(agent), tag, *agent["args"])
        lab.wait_for(lambda: probe(node, port, paths["readinessProbe"]) == 200, timeout=30,
                     message="the new container did not get ready")
        assert node_subnet(node) == subnet and vtep_mac(node) == mac
        assert pods[2].ping(pods[0].ip, count=1, timeout=3)
        write = podman("exec", "agent-2", "touch", "/written", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write
    finally:
        podman.close()
    # Nothing of podman's is left mounted, so the lab can delete its directory.
    assert not mounted(node.workdir / "podman" / "storage" / "overlay")
