"""The layers are checked, not just drawn: import-linter's contracts (setup.cfg) and a standard-library-only rule.

`lint-imports` checks that tools sit above the agent above the doors above the core, that the doors do not
import one another, that the core and the plugin import no third-party package, and that the tools start the
agent only through its loop. import-linter can forbid named packages only, so the rule that the core and
`cni/` import nothing but the standard library (a new dependency would otherwise slip through) is checked
here with grimp, the graph library import-linter is built on.
"""

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

STDLIB_ONLY = {"vxlan_net": ("vxlan_net.core",), "cni": ("cni",)}
"""Root package -> the subpackages that may import only the standard library (and themselves)."""


def outside_stdlib(root: str, packages: tuple[str, ...], sys_path: Path) -> list[tuple[str, str]]:
    """(importer, imported) for each import, from a module of `packages`, of neither the standard library
    nor one of those packages."""
    sys.path.insert(0, str(sys_path))
    try:
        graph = grimp.build_graph(root, include_external_packages=True, cache_dir=None)
    finally:
        sys.path.remove(str(sys_path))
    found = []
    for module in sorted(graph.modules):
        if not any(module == p or module.startswith(p + ".") for p in packages):
            continue
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            top = imported.split(".")[0]
            if top in sys.stdlib_module_names or any(imported == p or imported.startswith(p + ".") for p in packages):
                continue
            found.append((module, imported))
    return found


def test_an_import_of_something_outside_the_standard_library_is_found(tmp_path):
    package = tmp_path / "layered"
    (package / "core").mkdir(parents=True)
    (package / "doors").mkdir()
    for init in (package / "__init__.py", package / "core" / "__init__.py", package / "doors" / "__init__.py"):
        init.write_text("")
    (package / "core" / "pure.py").write_text("import json\nfrom ipaddress import IPv4Network\nfrom . import other\n")
    (package / "core" / "other.py").write_text("def later():\n    import yaml\n")
    (package / "core" / "upwards.py").write_text("from layered.doors import kernel\n")
    (package / "doors" / "kernel.py").write_text("import pyroute2\n")

    assert outside_stdlib("layered", ("layered.core",), tmp_path) == [
        ("layered.core.other", "yaml"), ("layered.core.upwards", "layered.doors.kernel")]


@pytest.mark.parametrize("root", sorted(STDLIB_ONLY))
def test_the_core_and_the_plugin_import_only_the_standard_library(root):
    assert outside_stdlib(root, STDLIB_ONLY[root], ROOT) == []


def test_the_import_contracts_hold():
    proc = subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "setup.cfg")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("command, usage", [
    (["-m", "vxlan_net", "--help"], "usage: vxlan-net"),
    (["-m", "vxlan_net.install_cni", "--help"], "usage: python -m vxlan_net.install_cni"),
    (["-m", "vxlan_net.cni_service", "--help"], "--socket"),
    (["-m", "vxlan_net.agent.cni_service", "--help"], "--socket"),
])
def test_the_module_names_operators_and_scripts_run_still_start(command, usage):
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and usage in proc.stdout, proc.stdout + proc.stderr


def test_the_console_scripts_point_at_the_layered_modules():
    for script, target in (("vxlan-net", "vxlan_net.tools.cli"), ("vxlan-net-install-cni", "vxlan_net.tools.install_cni"),
                           ("vxlan-net-cni", "cni.main")):
        path = Path(sys.executable).with_name(script)
        assert f"from {target} import main" in path.read_text(), path
        proc = subprocess.run([str(path), "--help"] if script != "vxlan-net-cni" else [str(path)], capture_output=True,
                              text=True, timeout=60, env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                              input="{}" if script == "vxlan-net-cni" else None)
        assert proc.returncode == 0, (script, proc.stdout, proc.stderr)
