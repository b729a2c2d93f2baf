"""The deployable examples parse and say what a node needs: manifests, conflist, systemd unit, network config."""

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from vxlan_net.core.config import parse_config
from vxlan_net.tools.install_cni import main as install_cni_main, validate_conflist

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFLIST = EXAMPLES / "cni" / "10-vxlan-net.conflist"
HEALTHZ_PORT = 9473


def manifests() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((EXAMPLES / "kubernetes" / "vxlan-net-daemonset.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs if doc}


def pod_spec() -> dict:
    return manifests()["DaemonSet"]["spec"]["template"]["spec"]


def container(name: str, init: bool = False) -> dict:
    return next(c for c in pod_spec()["initContainers" if init else "containers"] if c["name"] == name)


def mounts(c: dict) -> dict[str, str]:
    """mountPath -> the host path of its hostPath volume (or the volume name for other volumes)."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    return {m["mountPath"]: volumes[m["name"]].get("hostPath", {}).get("path", m["name"]) for m in c["volumeMounts"]}


def test_the_manifest_has_a_service_account_config_and_a_daemonset_on_the_host_network():
    docs = manifests()
    assert {"ServiceAccount", "ConfigMap", "DaemonSet"} <= docs.keys()
    ds = docs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert {"operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert {"operator": "Exists", "effect": "NoExecute"} in spec["tolerations"]


def test_the_agent_runs_with_network_capabilities_and_the_host_directories_it_shares():
    agent = container("agent")
    assert agent["command"] + agent["args"] == ["vxlan-net", "agent"]
    assert {"NET_ADMIN", "NET_RAW"} <= set(agent["securityContext"]["capabilities"]["add"])
    assert not agent["securityContext"].get("privileged", False)
    seen = mounts(agent)
    for path in ("/run/vxlan-net", "/etc/cni/net.d", "/opt/cni/bin", "/var/lib/vxlan-net"):
        assert seen.get(path) == path, f"{path} must be the host's {path}"
    modules = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/lib/modules")
    assert modules["readOnly"] is True and seen["/lib/modules"] == "/lib/modules"


def test_etcd_endpoints_come_from_the_config_map_and_tls_files_from_the_secret():
    agent = container("agent")
    env = {e["name"]: e for e in agent["env"]}
    ref = env["VXLAN_NET_ETCD_ENDPOINTS"]["valueFrom"]["configMapKeyRef"]
    config_map = manifests()["ConfigMap"]
    assert ref["name"] == config_map["metadata"]["name"] and ref["key"] in config_map["data"]
    assert all(url.startswith("https://") for url in config_map["data"][ref["key"]].split(","))
    tls_mount = next(m for m in agent["volumeMounts"] if m["name"] == "etcd-tls")
    secret = next(v for v in pod_spec()["volumes"] if v["name"] == "etcd-tls")["secret"]["secretName"]
    assert secret
    for var in ("VXLAN_NET_ETCD_CAFILE", "VXLAN_NET_ETCD_CERTFILE", "VXLAN_NET_ETCD_KEYFILE"):
        assert env[var]["value"].startswith(tls_mount["mountPath"] + "/")


def test_probes_ask_the_agents_health_endpoints_on_the_port_it_listens_on():
    agent = container("agent")
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": HEALTHZ_PORT}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": HEALTHZ_PORT}
    env = {e["name"]: e.get("value") for e in agent["env"]}
    # Host network: the kubelet probes the node's address, so the agent must not listen on loopback only.
    assert env["VXLAN_NET_HEALTHZ_ADDR"] == f"0.0.0.0:{HEALTHZ_PORT}"


def test_the_init_container_runs_the_images_install_command_into_the_host_cni_dirs():
    init = container("install-cni", init=True)
    label = re.search(r'io\.vxlan-net\.install-cni="([^"]+)"', (ROOT / "Dockerfile").read_text()).group(1)
    assert init["command"] == label.split()
    assert init["image"] == container("agent")["image"]
    args = dict(a.partition("=")[::2] for a in init["args"])
    seen = mounts(init)
    assert seen[args["--cni-bin-dir"]] == "/opt/cni/bin" and seen[args["--cni-conf-dir"]] == "/etc/cni/net.d"
    assert "--copy-plugin" in args  # the image's Python is not on the host
    conflist_dir = os.path.dirname(args["--conflist"])
    assert seen[conflist_dir] == "vxlan-net-cni-conf"


def test_the_init_container_args_work(tmp_path):
    """Its args, with the host paths moved under tmp_path, install a plugin and the ConfigMap's conflist."""
    init = container("install-cni", init=True)
    (tmp_path / "cm").mkdir()
    (tmp_path / "cm" / "10-vxlan-net.conflist").write_text(manifests()["ConfigMap"]["data"]["10-vxlan-net.conflist"])
    moved = {"/opt/cni/bin": tmp_path / "bin", "/etc/cni/net.d": tmp_path / "net.d",
             "/etc/vxlan-net/cni": tmp_path / "cm", "/usr/bin/python3": Path("/usr/bin/python3")}
    args = []
    for arg in init["args"]:
        flag, sep, value = arg.partition("=")
        for old, new in moved.items():
            if value.startswith(old):
                value = str(new) + value[len(old):]
        args.append(flag + sep + value)
    assert install_cni_main(args) == 0
    assert os.access(tmp_path / "bin" / "vxlan-net-cni", os.X_OK)
    assert (tmp_path / "net.d" / "10-vxlan-net.conflist").is_file()


def test_the_config_maps_conflist_is_the_example_conflist():
    inline = manifests()["ConfigMap"]["data"]["10-vxlan-net.conflist"]
    assert json.loads(inline) == json.loads(CONFLIST.read_text())


def test_the_conflist_runs_our_plugin_first_then_portmap():
    conflist = validate_conflist(CONFLIST.read_bytes())
    assert [p["type"] for p in conflist["plugins"]] == ["vxlan-net-cni", "portmap"]
    ours, portmap = conflist["plugins"]
    assert ours["subnetFile"] == "/run/vxlan-net/subnet.env"  # the agent's default --subnet-file
    assert portmap["capabilities"] == {"portMappings": True}
    assert conflist["cniVersion"] in ("0.4.0", "1.0.0", "1.1.0")


def test_our_plugin_accepts_the_conflists_entry():
    from cni.config import parse_env, parse_netconf

    conflist = json.loads(CONFLIST.read_text())
    conf = dict(conflist["plugins"][0], name=conflist["name"], cniVersion=conflist["cniVersion"])
    env = parse_env({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0"})
    parsed = parse_netconf(conf, env)
    assert parsed.subnet_file == "/run/vxlan-net/subnet.env" and parsed.bridge == "cni0"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str
    parser.read(EXAMPLES / "systemd" / "vxlan-net-agent.service")
    return parser


def test_the_systemd_unit_runs_the_agent_restarts_it_and_stops_it_with_sigterm():
    service = unit()["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[1:] == ["agent"] and command[0].endswith("/vxlan-net")
    assert service["Restart"] == "always"
    assert service["KillSignal"] == "SIGTERM"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/vxlan-net/vxlan-net.env"
    assert "network-online.target" in unit()["Unit"]["After"]
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_the_units_install_step_is_the_install_command():
    pre = shlex.split(unit()["Service"]["ExecStartPre"])
    assert pre[1:3] == ["-m", "vxlan_net.install_cni"]
    assert pre[0] == str(Path(shlex.split(unit()["Service"]["ExecStart"])[0]).with_name("python"))
    assert "/etc/cni/net.d" in pre and "/opt/cni/bin" in pre


def test_systemd_accepts_the_unit(tmp_path):
    """systemd-analyze knows every section and key; only the venv is missing on this machine."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing (Debian package systemd)"
    shutil.copy(EXAMPLES / "systemd" / "vxlan-net-agent.service", tmp_path)
    proc = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "vxlan-net-agent.service")],
                          capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if line.strip() and not re.search(r"Command /opt/vxlan-net/bin/\S+ is not executable", line)]
    assert complaints == []


def test_the_env_file_names_only_real_agent_flags():
    helps = [subprocess.run([sys.executable, "-m", "vxlan_net", *args, "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT).stdout for args in ([], ["agent"])]
    flags = set(re.findall(r"--[a-z][a-z-]+", " ".join(helps)))
    env_file = (EXAMPLES / "systemd" / "vxlan-net.env").read_text()
    names = re.findall(r"^#?(VXLAN_NET_[A-Z_]+)=", env_file, re.M)
    assert names
    for name in names:
        flag = "--" + name[len("VXLAN_NET_"):].lower().replace("_", "-")
        assert flag in flags, f"{name}: the agent has no {flag}"


def test_the_sample_network_config_is_accepted():
    config = parse_config((EXAMPLES / "network-config.json").read_bytes())
    assert str(config.network) == "10.244.0.0/16" and config.subnet_len == 24
    assert config.vni == 1 and config.port == 8472


def test_the_lab_cluster_script_wraps_the_demo_and_is_valid_bash():
    script = EXAMPLES / "lab-cluster.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=10).returncode == 0
    assert "-m integration.demo --keep" in script.read_text()


def test_the_operations_guide_links_existing_files_and_names_real_flags():
    guide = (ROOT / "docs" / "operations.md").read_text()
    for target in re.findall(r"\]\((\.\./[^)#]+)\)", guide):
        assert (ROOT / "docs" / target).resolve().exists(), target
    helps = " ".join(subprocess.run([sys.executable, "-m", "vxlan_net", *args, "--help"], capture_output=True,
                                    text=True, timeout=60, cwd=ROOT).stdout
                     for args in ([], ["agent"], ["doctor"], ["inspect"], ["config", "set"]))
    helps += subprocess.run([sys.executable, "-m", "vxlan_net.install_cni", "--help"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT).stdout
    blocks = re.findall(r"```\n(.*?)```", guide, re.S)
    prose = re.sub(r"```\n.*?```", "", guide, flags=re.S)
    codes = re.findall(r"`([^`]+)`", prose) + [b for b in blocks if "etcdctl" not in b]
    mentioned = {flag for code in codes for flag in re.findall(r"--[a-z][a-z-]+", code)}
    others = {"--entrypoint", "--cluster-cidr", "--allocate-node-cidrs", "--now"}  # docker, kubernetes, systemctl
    assert len(mentioned) > 20
    for flag in sorted(mentioned - others):
        assert flag in helps, f"docs/operations.md names {flag}, which no vxlan-net command has"
