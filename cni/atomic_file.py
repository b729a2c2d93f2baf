"""Replace a file atomically: readers (the CNI plugin, a runtime watching its conf dir, the agent after a
restart) see the old content or the new, never a part. Standard library only: the plugin's installer
uses it, and so do the agent's subnet file and state dir and `install-cni`."""

import os
import tempfile


def write_atomically(path, data, mode: int = 0o644) -> None:
    """Write `data` (str or bytes) to a temp file in the same directory, fsync, then rename over `path`.

    On failure (read-only or full file system, a parent that is not a directory) the old file stays as
    it was, no temp file is left, and the OSError names `path` and the reason. The temp file's name
    starts with a dot and ends with random characters, so runtimes loading `*.conflist` skip it.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
        raise
