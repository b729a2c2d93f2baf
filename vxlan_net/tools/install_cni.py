"""Install the CNI plugin and a conflist into host directories, as flannel's init container does.

`python -m vxlan_net.install_cni --cni-bin-dir /opt/cni/bin --cni-conf-dir /etc/cni/net.d --conflist F [--copy-plugin]`
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import cni
from cni.atomic_file import write_atomically
from cni.install import install as install_launcher, launcher_text

from vxlan_net.tools.usage import EXIT_USAGE, UsageError

PLUGIN_NAME = "vxlan-net-cni"
DEFAULT_CONFLIST_NAME = "10-vxlan-net.conflist"
EXIT_IO = 1
_LAUNCHER_ROOT = re.compile(r"^sys\.path\.insert\(0, (['\"])(.*)\1\)$", re.M)


class InstallError(UsageError):
    """A bad conflist or an unwritable directory: one line, no traceback."""


def validate_conflist(raw: bytes, plugin_name: str = PLUGIN_NAME) -> dict:
    """The conflist as JSON, refused unless it is a CNI network list that starts with our plugin."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InstallError(f"conflist is not valid JSON: {exc}") from None
    problem = _conflist_problem(doc, plugin_name)
    if problem:
        raise InstallError(problem)
    return doc


def _conflist_problem(doc, plugin_name: str) -> Optional[str]:
    if not isinstance(doc, dict):
        return "conflist must be a JSON object"
    missing = [key for key in ("cniVersion", "name") if not isinstance(doc.get(key), str) or not doc[key]]
    if missing:
        return f"conflist has no {missing[0]!r}"
    plugins = doc.get("plugins")
    if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
        return "conflist has no 'plugins' list"
    if plugins[0].get("type") != plugin_name:
        return f"the first plugin is {plugins[0].get('type')!r}, not {plugin_name!r}"
    return None


def replace_if_changed(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Replace `path` atomically (runtimes watch these directories); False if it already holds `data`."""
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    write_atomically(path, data, mode)
    return True


def plugin_sources() -> dict[str, bytes]:
    """The plugin package's files: it uses the standard library only, so any host python3 runs it."""
    package = Path(cni.__file__).parent
    return {p.name: p.read_bytes() for p in sorted(package.glob("*.py"))}


def copy_plugin(lib_dir: Path, sources: dict[str, bytes], keep: Optional[str] = None) -> Path:
    """Copy the plugin into `<lib_dir>/<content hash>/cni/`; returns `<lib_dir>/<hash>`.

    A version's directory never changes once renamed into place, so a plugin
    already running keeps importing consistent files; older versions are pruned
    except `keep` (the one the previous launcher pointed at).
    """
    digest = hashlib.sha256()
    for name, data in sources.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    version = lib_dir / digest.hexdigest()[:16]
    if not version.is_dir():
        staging = lib_dir / f".staging{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "cni").mkdir(parents=True)
        for name, data in sources.items():
            (staging / "cni" / name).write_bytes(data)
        try:
            os.rename(staging, version)
        except OSError:  # another installer got there first with the same content
            shutil.rmtree(staging, ignore_errors=True)
            if not version.is_dir():
                raise
    for entry in lib_dir.iterdir():
        if entry.name not in (version.name, keep) and entry.is_dir() and not entry.name.startswith(".staging"):
            shutil.rmtree(entry, ignore_errors=True)
    return version


def _launcher_root(launcher: Path) -> Optional[str]:
    try:
        match = _LAUNCHER_ROOT.search(launcher.read_text())
    except (OSError, UnicodeDecodeError):
        return None
    return match.group(2) if match else None


def install_plugin(bin_dir: Path, copy: bool, host_python: str, host_bin_dir: Optional[Path] = None,
                   name: str = PLUGIN_NAME) -> Path:
    """The launcher `<bin_dir>/<name>`; with `copy`, also the plugin's sources, run by the host's python3."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    if not copy:
        return Path(install_launcher(str(bin_dir), name, python=sys.executable))
    launcher = bin_dir / name
    lib_name = f"{name}.d"
    previous = _launcher_root(launcher)
    keep = Path(previous).name if previous and Path(previous).parent.name == lib_name else None
    version = copy_plugin(bin_dir / lib_name, plugin_sources(), keep=keep)
    host_root = (host_bin_dir or bin_dir) / lib_name / version.name
    replace_if_changed(launcher, launcher_text(python=host_python, root=str(host_root)).encode(), mode=0o755)
    return launcher


def install_conflist(conf_dir: Path, raw: bytes, name: str) -> tuple[Path, bool]:
    """`<conf_dir>/<name>`, validated first; (path, whether it changed)."""
    validate_conflist(raw)
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / name
    return path, replace_if_changed(path, raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--cni-bin-dir", type=Path, default=Path(env("VXLAN_NET_CNI_BIN_DIR", "/opt/cni/bin")),
                        help="where the runtime looks for plugins, as this process sees it")
    parser.add_argument("--cni-conf-dir", type=Path, default=Path(env("VXLAN_NET_CNI_CONF_DIR", "/etc/cni/net.d")))
    parser.add_argument("--conflist", type=Path, default=env("VXLAN_NET_CNI_CONFLIST"),
                        help="conflist to install (validated: our plugin first); without it only the plugin")
    parser.add_argument("--conflist-name", default=DEFAULT_CONFLIST_NAME,
                        help="file name in --cni-conf-dir (runtimes take the first in lexical order)")
    parser.add_argument("--copy-plugin", action="store_true",
                        help="copy the plugin's sources next to the launcher and run them with --host-python "
                             "(for a container: its own Python is not on the host)")
    parser.add_argument("--host-python", default=env("VXLAN_NET_HOST_PYTHON", "/usr/bin/python3"),
                        help="the host's interpreter, with --copy-plugin")
    parser.add_argument("--host-cni-bin-dir", type=Path, default=None,
                        help="--cni-bin-dir as the host sees it, if mounted elsewhere (default: the same path)")


def register(subparsers, add_etcd_flags=None) -> None:
    """`vxlan-net install-cni`, for cli.PLUGGED_COMMANDS."""
    parser = subparsers.add_parser("install-cni", help=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        raw = None if args.conflist is None else _read(args.conflist)
        if raw is not None:  # refuse a bad conflist before touching anything
            validate_conflist(raw)
        launcher = install_plugin(args.cni_bin_dir, args.copy_plugin, args.host_python, args.host_cni_bin_dir)
        print(f"installed {launcher}")
        if raw is not None:
            path, changed = install_conflist(args.cni_conf_dir, raw, args.conflist_name)
            print(f"installed {path}" if changed else f"unchanged {path}")
    except (InstallError, OSError) as exc:
        usage = isinstance(exc, InstallError)
        detail = exc if usage or exc.filename is None else f"{exc.filename}: {exc.strerror}"
        print(f"vxlan-net install-cni: error: {detail}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_IO
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vxlan_net.install_cni", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InstallError(f"cannot read conflist {path}: {exc.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
