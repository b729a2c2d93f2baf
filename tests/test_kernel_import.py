"""The netlink door imports only the parts of pyroute2 it uses (issue 14: the agent's memory), and every
other user of pyroute2 still gets the whole library; an unknown pyroute2 layout falls back to the plain
import. Each case runs in a fresh interpreter: imports are process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(code: str, pythonpath: str = "") -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_door_leaves_the_rest_of_pyroute2_unimported():
    found = run("""
        import json, sys
        from vxlan_net.doors import kernel
        loaded = sorted(m for m in sys.modules if m.startswith("pyroute2"))
        print(json.dumps({"loaded": loaded, "iproute": kernel.IPRoute.__module__}))
    """)
    assert found["iproute"] == "pyroute2.iproute.linux"
    for whole_library_only in ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.conntrack", "pyroute2.ethtool",
                               "pyroute2.ipset", "pyroute2.iwutil"):
        assert not [m for m in found["loaded"] if m == whole_library_only or m.startswith(whole_library_only + ".")]


def test_any_other_user_still_finds_the_whole_library_and_the_same_classes():
    found = run("""
        import json, sys
        from vxlan_net.doors import kernel
        import pyroute2
        from pyroute2 import IPDB, IPRoute, NDB
        from pyroute2.netlink.exceptions import NetlinkError
        print(json.dumps({"same": [IPRoute is kernel.IPRoute, pyroute2.NetlinkError is kernel.NetlinkError,
                                   NetlinkError is kernel.NetlinkError, pyroute2.netns is kernel._netns],
                          "ndb": NDB.__module__, "ipdb": IPDB.__module__, "version": pyroute2.__version__}))
    """)
    assert found["same"] == [True, True, True, True]
    assert found["ndb"] == "pyroute2.ndb.main" and found["ipdb"].startswith("pyroute2.ipdb")
    assert found["version"] not in ("", "unknown")


def test_a_pyroute2_imported_first_is_used_as_it_is():
    found = run("""
        import json
        import pyroute2
        from vxlan_net.doors import kernel
        print(json.dumps({"same": kernel.IPRoute is pyroute2.IPRoute and kernel._netns is pyroute2.netns}))
    """)
    assert found["same"] is True


def test_an_unknown_pyroute2_layout_gets_the_plain_import(tmp_path):
    fake = tmp_path / "pyroute2"
    (fake / "netlink").mkdir(parents=True)
    (fake / "__init__.py").write_text("WHOLE = True\nclass IPRoute:\n    pass\nfrom . import netns\n")
    (fake / "netns.py").write_text("")
    (fake / "netlink" / "__init__.py").write_text("")
    (fake / "netlink" / "exceptions.py").write_text("class NetlinkError(Exception):\n    pass\n")
    found = run("""
        import json, sys
        from vxlan_net.doors import kernel
        import pyroute2
        print(json.dumps({"whole": pyroute2.WHOLE, "iproute": kernel.IPRoute is pyroute2.IPRoute,
                          "file": pyroute2.__file__}))
    """, pythonpath=str(tmp_path))
    assert found == {"whole": True, "iproute": True, "file": str(fake / "__init__.py")}
