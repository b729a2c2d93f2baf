"""The vxlan-net image, built with podman on a stand-in Debian base (no registry here), cached by content.

The base is made with mmdebstrap from Debian's python3 and imported; the Dockerfile is built on it
with `--build-arg BASE_IMAGE=...` and nothing else changed. The result is saved as a docker
archive (HEALTHCHECK kept) under CACHE/<hash of the build inputs>/, so a second session loads it in
seconds; a session's containers live in a podman storage of its own (`Podman(workdir)`), deleted
with it. `make test` must install podman, runc and mmdebstrap; without them this fails (never skips).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("VXLAN_NET_IMAGE_CACHE", "/var/tmp/vxlan-net-image-cache"))
BASE_TAG = "localhost/base:bookworm"
IMAGE_TAG = "localhost/vxlan-net:test"
BASE_RECIPE = ("mmdebstrap", "--variant=minbase",
               "--include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates", "bookworm")
# Debian's pip in the build reads the host's CA bundle (DESIGN.md §6).
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
BUILD_TIMEOUT = 900


class Podman:
    """podman with its own storage, state and config under `workdir` (overlay, cgroupfs, runc).

    overlay, not vfs: vfs copies the whole file system for every build step and container
    (a cold build took 130 s with it here, 71 s with overlay).

    Its run root is a short directory of its own in /tmp (podman refuses one over 50 characters);
    `close()` deletes it."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.runroot = Path(tempfile.mkdtemp(prefix="vxn-podman-"))
        self.conf = workdir / "containers.conf"
        self.conf.write_text("[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n"
                             f"events_logfile_path = \"{workdir / 'events.log'}\"\n")

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        binary = shutil.which("podman")
        assert binary, "podman missing: apt-get install podman (make test does)"
        argv = [binary, "--root", str(self.dir / "storage"), "--runroot", str(self.runroot),
                "--tmpdir", str(self.dir / "tmp"), "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, CONTAINERS_CONF=str(self.conf)))
        if check:
            assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    def close(self) -> None:
        """Removes the containers and the run root, waits for their conmon's cleanup, and unmounts the
        overlay driver's storage: podman bind-mounts `storage/overlay` onto itself and leaves it mounted,
        so the workdir could not be deleted after it (full test runs left lab directories behind, with
        that mount still on)."""
        self("rm", "--all", "--force", "--time", "0", check=False)
        # A container's conmon runs `podman container cleanup` on this storage when the container dies,
        # asynchronously: one that ran after the lab had deleted its directory made it again, mount and all.
        storage = str(self.dir / "storage")
        deadline = time.monotonic() + 20
        while _processes_using(storage) and time.monotonic() < deadline:
            time.sleep(0.1)
        overlay = self.dir / "storage" / "overlay"
        for _ in range(4):  # bounded: once per mount stacked there
            if not mounted(overlay):
                break
            subprocess.run(["umount", str(overlay)], capture_output=True, timeout=30)
        shutil.rmtree(self.runroot, ignore_errors=True)


def _processes_using(path: str) -> list[int]:
    """PIDs whose command line names `path` (conmon and the podman it starts; only waited for)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                    if path.encode() in cmdline.read():
                        found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
    return found


def mounted(path: Path) -> bool:
    """Whether something is mounted on `path`, as /proc/self/mountinfo says: a bind mount of a directory
    onto itself (podman's overlay storage) is on the same file system, where os.path.ismount sees nothing."""
    target = str(path.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            mount_point = line.split(" ")[4].encode().decode("unicode_escape")  # \040 and the like
            if mount_point == target:
                return True
    return False


def build_inputs(root: Path = ROOT) -> list[Path]:
    """The Dockerfile, .dockerignore and every file it lets into the build context."""
    files = [root / "Dockerfile", root / ".dockerignore"]
    for line in (root / ".dockerignore").read_text().splitlines():
        if line.startswith("!"):
            path = root / line[1:].rstrip("/")
            files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [f for f in files if "__pycache__" not in f.parts and f.suffix != ".pyc"]


def inputs_hash(root: Path = ROOT) -> str:
    digest = hashlib.sha256(" ".join(BASE_RECIPE).encode())
    for path in build_inputs(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class BuiltImage:
    archive: Path
    size: int
    """Bytes, as `podman image inspect` reports them."""
    build_seconds: float
    """What the build took (base included), when it ran."""
    cached: bool


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time across sessions: others wait, then find the cached archive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def built_image(root: Path = ROOT, cache: Path = CACHE) -> BuiltImage:
    """The image as a docker archive: from the cache when the inputs are unchanged, else built now."""
    entry = cache / inputs_hash(root)
    with _locked(cache / ".lock"):
        report = entry / "build.json"
        if report.is_file() and (entry / "image.tar").is_file():
            facts = json.loads(report.read_text())
            return BuiltImage(entry / "image.tar", facts["size"], facts["build_seconds"], cached=True)
        for stale in cache.iterdir():  # an older version of the inputs: its archive is no use
            if stale.is_dir() and stale != entry:
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(entry, ignore_errors=True)
        built = _build(root, entry)
        report.write_text(json.dumps({"size": built.size, "build_seconds": built.build_seconds}))
        return built


def _build(root: Path, entry: Path) -> BuiltImage:
    assert shutil.which("mmdebstrap"), "mmdebstrap missing: apt-get install mmdebstrap (make test does)"
    work = entry / "build"
    podman = Podman(work)
    started = time.monotonic()
    base = work / "base.tar"
    try:
        proc = subprocess.run([*BASE_RECIPE, str(base)], capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        assert proc.returncode == 0, f"mmdebstrap failed: {proc.stderr[-3000:]}"
        podman("import", str(base), BASE_TAG, timeout=300)
        podman("build", "--format", "docker", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_TAG}",
               "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", *ULIMITS, "--tag", IMAGE_TAG, str(root),
               timeout=BUILD_TIMEOUT)
        size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE_TAG).stdout)
        partial = entry / "image.tar.partial"
        podman("save", "--format", "docker-archive", "--output", str(partial), IMAGE_TAG, timeout=300)
        seconds = round(time.monotonic() - started, 1)
        partial.rename(entry / "image.tar")
    finally:
        podman.close()
        shutil.rmtree(work, ignore_errors=True)  # the build's layers: the archive is what is kept
    return BuiltImage(entry / "image.tar", size, seconds, cached=False)


def load(podman: Podman, image: BuiltImage) -> str:
    """Loads the archive into `podman`'s storage; returns the image's tag."""
    podman("load", "--input", str(image.archive), timeout=300)
    return IMAGE_TAG
