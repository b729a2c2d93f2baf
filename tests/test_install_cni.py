"""`python -m vxlan_net.install_cni`: the plugin and a conflist into CNI directories, as an init container does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vxlan_net.tools.install_cni import InstallError, copy_plugin, main, validate_conflist

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFLIST = ROOT / "examples" / "cni" / "10-vxlan-net.conflist"
# A host's own python3 (Debian's, with nothing of ours installed) when there is one.
HOST_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def run_install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vxlan_net.install_cni", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def plugin_version(launcher: Path, cwd: Path) -> dict:
    """VERSION through the launcher, from a directory with no project on any path."""
    proc = subprocess.run([str(launcher)], input=b"{}", env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                          capture_output=True, timeout=30, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_copy_mode_installs_a_self_contained_plugin_run_by_the_given_python(tmp_path):
    bin_dir, conf_dir = tmp_path / "opt-cni-bin", tmp_path / "etc-cni-net.d"
    proc = run_install("--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir),
                       "--conflist", str(EXAMPLE_CONFLIST), "--copy-plugin", "--host-python", HOST_PYTHON)
    assert proc.returncode == 0, proc.stderr
    launcher = bin_dir / "vxlan-net-cni"
    assert os.access(launcher, os.X_OK)
    text = launcher.read_text()
    assert text.startswith(f"#!{HOST_PYTHON} -IS\n")
    copies = list((bin_dir / "vxlan-net-cni.d").iterdir())
    assert len(copies) == 1
    assert f"sys.path.insert(0, {str(copies[0])!r})" in text  # the copy next to it, not this checkout
    assert "1.0.0" in plugin_version(launcher, tmp_path)["supportedVersions"]
    installed = conf_dir / "10-vxlan-net.conflist"
    assert installed.read_bytes() == EXAMPLE_CONFLIST.read_bytes()
    assert json.loads(installed.read_text())["plugins"][0]["type"] == "vxlan-net-cni"


def test_host_bin_dir_is_what_the_launcher_points_at(tmp_path):
    proc = run_install("--cni-bin-dir", str(tmp_path / "host" / "opt" / "cni" / "bin"), "--copy-plugin",
                       "--host-cni-bin-dir", "/opt/cni/bin")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "host" / "opt" / "cni" / "bin" / "vxlan-net-cni").read_text()
    assert text.startswith("#!/usr/bin/python3 -IS\n")
    assert "sys.path.insert(0, '/opt/cni/bin/vxlan-net-cni.d/" in text


def test_reinstall_is_idempotent_and_leaves_an_identical_conflist_untouched(tmp_path):
    args = ["--cni-bin-dir", str(tmp_path / "bin"), "--cni-conf-dir", str(tmp_path / "conf"),
            "--conflist", str(EXAMPLE_CONFLIST), "--copy-plugin", "--host-python", HOST_PYTHON]
    assert run_install(*args).returncode == 0
    installed = tmp_path / "conf" / "10-vxlan-net.conflist"
    before = installed.stat().st_ino
    second = run_install(*args)
    assert second.returncode == 0, second.stderr
    assert "unchanged" in second.stdout
    assert installed.stat().st_ino == before  # not rewritten: runtimes watching the directory see nothing
    assert len(list((tmp_path / "bin" / "vxlan-net-cni.d").iterdir())) == 1


def test_local_mode_points_the_launcher_at_this_interpreter_and_install(tmp_path):
    assert main(["--cni-bin-dir", str(tmp_path)]) == 0
    launcher = tmp_path / "vxlan-net-cni"
    assert launcher.read_text().startswith(f"#!{sys.executable} -IS\n")
    assert "1.0.0" in plugin_version(launcher, tmp_path)["supportedVersions"]


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "not valid JSON"),
    (b"[]", "JSON object"),
    (b'{"cniVersion": "1.0.0", "name": "n"}', "'plugins'"),
    (b'{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}]}', "not 'vxlan-net-cni'"),
    (b'{"name": "n", "plugins": [{"type": "vxlan-net-cni"}]}', "'cniVersion'"),
])
def test_a_bad_conflist_is_refused_with_one_line_and_nothing_is_installed(tmp_path, content, problem):
    bad = tmp_path / "bad.conflist"
    bad.write_bytes(content)
    proc = run_install("--cni-bin-dir", str(tmp_path / "bin"), "--cni-conf-dir", str(tmp_path / "conf"),
                       "--conflist", str(bad))
    assert proc.returncode == 2
    assert problem in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bin").exists() and not (tmp_path / "conf").exists()
    with pytest.raises(InstallError):
        validate_conflist(content)


def test_an_unreadable_conflist_is_a_usage_error(tmp_path):
    proc = run_install("--cni-bin-dir", str(tmp_path / "bin"), "--conflist", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "cannot read conflist" in proc.stderr


def test_upgrades_keep_the_previous_plugin_copy_for_plugins_still_running(tmp_path):
    versions = [copy_plugin(tmp_path, {"main.py": b"v1"})]
    versions.append(copy_plugin(tmp_path, {"main.py": b"v2"}, keep=versions[-1].name))
    versions.append(copy_plugin(tmp_path, {"main.py": b"v3"}, keep=versions[-1].name))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v.name for v in versions[1:])
    assert (versions[2] / "cni" / "main.py").read_bytes() == b"v3"
    assert copy_plugin(tmp_path, {"main.py": b"v3"}, keep=versions[1].name) == versions[2]


def test_it_plugs_into_the_command_line_as_install_cni(tmp_path):
    import argparse

    from vxlan_net.tools import install_cni

    parser = argparse.ArgumentParser()
    install_cni.register(parser.add_subparsers(dest="command"), add_etcd_flags=None)
    args = parser.parse_args(["install-cni", "--cni-bin-dir", str(tmp_path)])
    assert args.handler(args) == 0
    assert os.access(tmp_path / "vxlan-net-cni", os.X_OK)


def imported_modules(launcher: Path, command: str, stdin: bytes, cwd: Path, env=None) -> tuple[set, bytes]:
    """The modules a run of the launcher imports after the interpreter's own start (`-X importtime`), and stdout."""
    python, flags = launcher.read_text().splitlines()[0][2:].split()
    proc = subprocess.run([python, flags, "-X", "importtime", str(launcher)], input=stdin, capture_output=True,
                          env={"CNI_COMMAND": command, "PATH": "/usr/bin:/bin", **(env or {})}, timeout=30, cwd=cwd)
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.decode().splitlines()
             if line.startswith("import time:") and "|" in line}
    return names, proc.stdout


@pytest.mark.parametrize("stdin, stated", [(b"\xff not utf-8", "1.1.0"), (b'{"cniVersion": "9.9.9"}', "1.1.0"),
                                           (b'{"cniVersion": "0.4.0"}', "0.4.0")])
def test_version_imports_only_what_it_prints(tmp_path, stdin, stated):
    """Runtimes call VERSION before anything else: it loads the version list and the JSON codec, not the plugin."""
    proc = run_install("--cni-bin-dir", str(tmp_path), "--copy-plugin", "--host-python", HOST_PYTHON)
    assert proc.returncode == 0, proc.stderr
    names, out = imported_modules(tmp_path / "vxlan-net-cni", "VERSION", stdin, tmp_path)
    assert json.loads(out) == {"cniVersion": stated, "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    assert {n for n in names if n.startswith("cni")} == {"cni", "cni.main", "cni.versions", "cni.jsonfast"}
    assert "os" not in names


def test_add_never_imports_os(tmp_path):
    """ADD/CHECK/DEL use the builtin posix module: importing os costs every command ~1 ms of start-up."""
    proc = run_install("--cni-bin-dir", str(tmp_path), "--copy-plugin", "--host-python", HOST_PYTHON)
    assert proc.returncode == 0, proc.stderr
    conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "vxlan-net-cni", "dataDir": str(tmp_path / "data"),
            "subnetFile": str(tmp_path / "no-agent-yet.env")}  # fails after the config, the kernel door loaded
    names, out = imported_modules(tmp_path / "vxlan-net-cni", "ADD", json.dumps(conf).encode(), tmp_path,
                                  env={"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net"})
    assert json.loads(out)["code"] == 11  # try again later: no subnet file
    assert {"cni.plugin", "cni.wiring", "cni.netlink", "cni.ipam", "cni.subnet_file"} <= names
    assert "os" not in names
