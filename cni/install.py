"""Install a fast launcher for the plugin into a CNI bin directory: `python -m cni.install DIR`.

Runtimes exec the plugin once per operation, so start-up is most of its cost.
The setuptools console script starts Python with `site` (and this checkout's
editable-install finder: ~25 ms here); the launcher runs the same interpreter
with `-I -S` and puts this source tree on `sys.path` itself.
"""

import os
import sys

from cni.atomic_file import write_atomically

TEMPLATE = """#!{python} -IS
# vxlan-net CNI plugin launcher, written by `python -m cni.install`.
import sys
sys.path.insert(0, {root!r})
from cni.main import main
main()
"""


def launcher_text(python: str = sys.executable, root: str = "") -> str:
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return TEMPLATE.format(python=python, root=root)


def install(directory: str, name: str = "vxlan-net-cni", python: str = sys.executable) -> str:
    path = os.path.join(directory, name)
    write_atomically(path, launcher_text(python), mode=0o755)
    return path


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cni.install CNI_BIN_DIR")
    print(install(sys.argv[1]))


if __name__ == "__main__":
    main()
