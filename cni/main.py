"""Entry point of `vxlan-net-cni`: read env and stdin, run the command, write the reply."""

import os
import sys


def main() -> None:
    from .plugin import run

    try:
        stdin = sys.stdin.buffer.read(1 << 20)
    except OSError:
        stdin = b""
    code, out = run(os.environ, stdin)
    if out:
        sys.stdout.write(out)
        sys.stdout.write("\n")
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
