"""Entry point of `vxlan-net-cni`: read env and stdin, run the command, write the reply.

A runtime starts the plugin once per operation, so start-up is most of its
cost: VERSION is answered without importing the plugin, the environment is
read from the builtin `posix` (`os` costs ~1 ms of imports), and the process
ends with `_exit` once its output is flushed (the interpreter's finalization
costs ~1.5 ms and has nothing left to do).
"""

import sys
from posix import _exit, environ


def _environment() -> dict:
    """`os.environ`'s str view of the environment, without importing `os`."""
    encoding = sys.getfilesystemencoding()
    return {key.decode(encoding, "surrogateescape"): value.decode(encoding, "surrogateescape")
            for key, value in environ.items()}


def main() -> None:
    try:
        stdin = sys.stdin.buffer.read(1 << 20)
    except OSError:
        stdin = b""
    if environ.get(b"CNI_COMMAND") == b"VERSION":
        from .versions import version_reply

        code, out = version_reply(stdin)
    else:
        from .plugin import run

        code, out = run(_environment(), stdin)
    if out:
        sys.stdout.write(out)
        sys.stdout.write("\n")
    sys.stdout.flush()
    sys.stderr.flush()
    _exit(code)


if __name__ == "__main__":
    main()
