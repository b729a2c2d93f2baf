"""Hostile files around the plugin, with real files in a tmp dir (no root needed).

A `subnetFile` that points at some other file, a prevResult full of junk, and
symlinks, FIFOs and directories planted in the IPAM store: the plugin answers
with a clear CNI error (or treats the entry as someone else's), never echoes a
file's content, and never reads, writes or deletes through a link.
"""

import json
import os
import signal
import string
import subprocess

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cni import config as C
from cni.agent_socket import NameLock
from cni.errors import CniError
from cni.install import install
from cni.ipam import DiskStore, MemoryStore, allocate, release_owner
from cni.plugin import host_veth_name, run
from cni.subnet_file import parse_subnet_file
from test_cni_parser import FakeKernel, MemoryStores, Plan, assert_spec_error, env, ip

SECRET = "s3cr3t-Token-4711"
VALID_SUBNET = "VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=198.19.3.1/24\nVXLAN_NET_MTU=1450\nVXLAN_NET_IPMASQ=false\n"


def conf(subnet_file, data_dir, **extra):
    base = {"cniVersion": "1.1.0", "name": "podnet", "type": "vxlan-net-cni", "subnetFile": subnet_file,
            "dataDir": data_dir}
    base.update(extra)
    return json.dumps(base).encode()


@pytest.fixture(autouse=True)
def bounded():
    """A plugin that blocks on a FIFO must fail the test, not hang the suite."""
    def hung(*_):
        raise TimeoutError("the plugin blocked for 30 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def plugin(tmp_path):
    return install(str(tmp_path / "bin"))


@pytest.fixture
def subnet_file(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text(VALID_SUBNET)
    return str(path)


def run_binary(plugin, command, stdin):
    """The installed plugin as a runtime runs it; a hang (e.g. on a FIFO) fails the test after 20 s.

    As root it runs in a network namespace of its own (`unshare --net`, gone when it exits): a case
    the plugin wrongly accepted would otherwise wire a bridge into the host's namespace."""
    environ = dict(env(command), PATH=os.environ.get("PATH", "/usr/bin:/bin"))
    argv = ["unshare", "--net", "--", plugin] if os.geteuid() == 0 else [plugin]
    proc = subprocess.run(argv, input=stdin, env=environ, capture_output=True, timeout=20)
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


# -- a subnetFile that is not ours ------------------------------------------------------------------

def _plant(tmp_path, case):
    path = tmp_path / f"not-ours-{case}"
    if case == "passwd-like":
        path.write_text(f"root:{SECRET}:0:0:root:/root:/bin/bash\nVXLAN_NET_NETWORK=198.19.0.0/16\n")
    elif case == "secret-key-value":
        path.write_text(f"API_TOKEN={SECRET}\n")
    elif case == "secret-after-valid-lines":
        path.write_text(VALID_SUBNET.replace("VXLAN_NET_MTU=1450\n", f"{SECRET}\n"))
    elif case == "not-utf8":
        path.write_bytes(b"\xff\xfe" + SECRET.encode() + b"\n")
    elif case == "nul-bytes":
        path.write_bytes(SECRET.encode() + b"\0" * 100)
    elif case == "empty":
        path.write_text("")
    elif case == "over-64k":
        path.write_text(VALID_SUBNET + "#" * 70000 + f"\n{SECRET}\n")
    elif case == "fifo":
        os.mkfifo(path)
    elif case == "directory":
        path.mkdir()
    return str(path)


@pytest.mark.parametrize("case", ["passwd-like", "secret-key-value", "secret-after-valid-lines", "not-utf8",
                                  "nul-bytes", "empty", "over-64k", "fifo", "directory"])
@pytest.mark.parametrize("command", ["ADD", "CHECK", "STATUS"])
def test_a_subnet_file_that_is_not_ours_is_named_never_echoed(tmp_path, plugin, case, command):
    path = _plant(tmp_path, case)
    prev = {"cniVersion": "1.1.0", "interfaces": [], "ips": []}
    stdin = conf(path, str(tmp_path / "data"), prevResult=prev if command == "CHECK" else None)
    rc, out, err = run_binary(plugin, command, stdin)
    error = assert_spec_error(rc, out, 50 if command == "STATUS" else 7)
    assert error["msg"].endswith(f"not a vxlan-net subnet file: {path}"), error
    assert error["details"] == ""
    assert SECRET not in out + err and "root:" not in out + err
    assert "Traceback" not in err


@pytest.mark.parametrize("key, bad", [("VXLAN_NET_NETWORK", SECRET), ("VXLAN_NET_SUBNET", f"{SECRET}/24"),
                                      ("VXLAN_NET_MTU", SECRET), ("VXLAN_NET_SUBNET", "198.20.3.1/24"),
                                      ("VXLAN_NET_SUBNET", "198.19.3.0/24")])
def test_a_bad_value_in_our_subnet_file_names_the_key_not_the_value(tmp_path, plugin, key, bad):
    path = tmp_path / "subnet.env"
    lines = dict(line.split("=", 1) for line in VALID_SUBNET.splitlines())
    lines[key] = bad
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    rc, out, err = run_binary(plugin, "ADD", conf(str(path), str(tmp_path / "data")))
    error = assert_spec_error(rc, out, 7)
    assert error["msg"].startswith(f"subnet file {path}: {key}"), error
    assert bad not in out + err and SECRET not in out + err


def test_a_symlinked_subnet_file_outside_the_store_is_still_read(tmp_path, subnet_file):
    # subnetFile is the operator's path, like dataDir: a link there is theirs to make.
    link = tmp_path / "link.env"
    link.symlink_to(subnet_file)
    rc, out = run(env("STATUS"), conf(str(link), str(tmp_path / "data")), kernel=FakeKernel(), store=DiskStore)
    assert (rc, out) == (0, "")


# -- prevResult is the runtime's, its junk is not echoed -------------------------------------------

class Link:
    index, mtu, flags = 7, 1450, 1
    mac = b"\x02\0\0\0\0\x07"


class InspectingKernel(FakeKernel):
    def inspect(self, netns_fd, ifname, host_veth, bridge):
        return {"link": Link(), "host": None, "bridge": None, "bridge_addresses": [],
                "addresses": [(ip("198.19.3.2"), 24)], "routes": []}


@pytest.mark.parametrize("ips", [
    [{"address": f"{SECRET}/24"}],
    [{"address": ["198.19.3.2/24"]}, {"address": {"a": 1}}, {"address": 5}, {"address": None}, "junk"],
])
def test_check_with_a_junk_prev_result_names_the_mismatch_without_echoing_it(subnet_file, ips, capsys):
    stores = MemoryStores()
    stores.stores.setdefault("podnet", MemoryStore()).owners[ip("198.19.3.2")] = ("c1", "eth0")
    prev = {"cniVersion": "1.1.0", "ips": ips,
            "interfaces": [{"name": "eth0", "sandbox": "/x", "mac": f"{SECRET}"}]}
    rc, out = run(env("CHECK"), conf(subnet_file, "/nonexistent", prevResult=prev), kernel=InspectingKernel(),
                  store=stores)
    error = assert_spec_error(rc, out, 104)
    assert "reserved address 198.19.3.2/24 is not in prevResult" in error["msg"]
    assert "prevResult's MAC for eth0 is not a MAC address" in error["msg"]
    assert SECRET not in out and "junk" not in out
    assert "Traceback" not in capsys.readouterr().err


def test_an_unexpected_exception_reports_its_type_not_its_arguments(subnet_file, capsys):
    leak = UnicodeDecodeError("utf-8", SECRET.encode() + b"\xff", len(SECRET), len(SECRET) + 1, "invalid")
    rc, out = run(env(), conf(subnet_file, "/nonexistent"), kernel=FakeKernel(fail=leak), store=MemoryStores())
    error = assert_spec_error(rc, out, 999)
    assert error["msg"] == "internal error: UnicodeDecodeError (traceback on stderr)"
    assert SECRET not in out
    assert "Traceback" in capsys.readouterr().err  # the operator's log keeps the whole story


# -- the IPAM store: nothing under dataDir is followed ------------------------------------------------

@pytest.fixture
def outside(tmp_path):
    """A file outside the store that a planted link points at; its content would mean "c1/eth0 holds it"."""
    path = tmp_path / "outside" / "victim"
    path.parent.mkdir()
    path.write_bytes(b"c1\r\neth0")
    return path


def untouched(path, content=b"c1\r\neth0"):
    return path.read_bytes() == content


def store_dir(tmp_path):
    folder = tmp_path / "data" / "podnet"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def add(subnet_file, tmp_path, cid="c1", kernel=None):
    return run(env(CNI_CONTAINERID=cid), conf(subnet_file, str(tmp_path / "data")), kernel=kernel or FakeKernel(),
               store=DiskStore)


@pytest.mark.parametrize("kind", ["symlink", "dangling-symlink", "fifo", "directory"])
def test_a_foreign_entry_named_like_a_reservation_is_never_read_released_or_reused(
        tmp_path, subnet_file, outside, kind):
    folder = store_dir(tmp_path)
    planted = folder / "198.19.3.2"
    if kind == "symlink":
        planted.symlink_to(outside)
    elif kind == "dangling-symlink":
        planted.symlink_to(tmp_path / "outside" / "missing")
    elif kind == "fifo":
        os.mkfifo(planted)
    else:
        planted.mkdir()
    kernel = FakeKernel()
    # Had the plugin read the link, c1/eth0 would already "hold" .2: a duplicate-allocation error.
    rc, out = add(subnet_file, tmp_path, kernel=kernel)
    assert rc == 0, out
    assert json.loads(out)["ips"][0]["address"] == "198.19.3.3/24"  # .2 counts as taken
    data = conf(subnet_file, str(tmp_path / "data"))
    assert run(env("DEL"), data, kernel=kernel, store=DiskStore) == (0, "")
    gc = conf(subnet_file, str(tmp_path / "data"), **{"cni.dev/valid-attachments": []})
    assert run(env("GC"), gc, kernel=kernel, store=DiskStore) == (0, "")
    assert os.path.lexists(planted) and sorted(os.listdir(folder)) == ["198.19.3.2", "last_reserved_ip.0", "lock"]
    assert untouched(outside) and not (tmp_path / "outside" / "missing").exists()
    with DiskStore(str(tmp_path / "data"), "podnet") as store:
        assert store.reservations() == {ip("198.19.3.2"): None}


@pytest.mark.parametrize("name, dangling", [("lock", False), ("lock", True),
                                            ("last_reserved_ip.0", False), ("last_reserved_ip.0", True)])
def test_a_symlinked_lock_or_last_reserved_file_is_a_clear_error_and_the_target_is_untouched(
        tmp_path, subnet_file, outside, name, dangling):
    folder = store_dir(tmp_path)
    target = tmp_path / "outside" / "missing" if dangling else outside
    (folder / name).symlink_to(target)
    rc, out = add(subnet_file, tmp_path)
    error = assert_spec_error(rc, out, 5)
    assert error["msg"] == f"{folder / name} is a symlink; the IPAM store never follows one (remove it)"
    assert untouched(outside) and not (tmp_path / "outside" / "missing").exists()
    assert sorted(os.listdir(folder)) == sorted({name, "lock"})  # no reservation left behind
    if name == "lock":
        for command, code in (("DEL", 5), ("STATUS", 50)):
            assert_spec_error(*run(env(command), conf(subnet_file, str(tmp_path / "data")), kernel=FakeKernel(),
                                   store=DiskStore), code)


def test_last_reserved_through_a_link_is_not_read(tmp_path, outside):
    folder = store_dir(tmp_path)
    outside.write_text("198.19.3.50")
    (folder / "last_reserved_ip.0").symlink_to(outside)
    with DiskStore(str(tmp_path / "data"), "podnet") as store:
        assert store.last_reserved() is None


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlinked_network_directory_is_a_clear_error_for_every_command(tmp_path, subnet_file, dangling):
    elsewhere = tmp_path / "elsewhere"
    if not dangling:
        elsewhere.mkdir()
        (elsewhere / "198.19.3.9").write_bytes(b"c1\r\neth0")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "podnet").symlink_to(elsewhere, target_is_directory=True)
    message = f"{tmp_path / 'data' / 'podnet'} is a symlink; the IPAM store never follows one (remove it)"
    for command in ("ADD", "DEL", "GC", "STATUS"):
        data = conf(subnet_file, str(tmp_path / "data"), **{"cni.dev/valid-attachments": []})
        error = assert_spec_error(*run(env(command), data, kernel=FakeKernel(), store=DiskStore),
                                  50 if command == "STATUS" else 5)
        assert error["msg"].endswith(message), (command, error)
    if dangling:
        assert not elsewhere.exists()
    else:
        assert sorted(os.listdir(elsewhere)) == ["198.19.3.9"] and untouched(elsewhere / "198.19.3.9")


def test_data_dir_itself_may_be_a_symlink(tmp_path, subnet_file):
    # dataDir is the operator's configured path (e.g. /var/lib on another volume); only what is under it is ours.
    (tmp_path / "real").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "real", target_is_directory=True)
    rc, out = add(subnet_file, tmp_path)
    assert rc == 0, out
    assert (tmp_path / "real" / "podnet" / "198.19.3.2").read_bytes() == b"c1\r\neth0"


def test_a_reservation_swapped_for_a_link_is_unlinked_not_followed(tmp_path, outside):
    # The store lists c1's file, then someone swaps it for a link before the release: the link goes, not its target.
    plan = Plan(ip("198.19.3.2"), ip("198.19.3.254"), ip("198.19.3.1"))
    with DiskStore(str(tmp_path / "data"), "podnet") as store:
        got = allocate(store, plan, "c1", "eth0")
        path = store_dir(tmp_path) / "198.19.3.2"
        path.unlink()
        path.symlink_to(outside)
        store.release(got)
    assert not os.path.lexists(path) and untouched(outside)
    with DiskStore(str(tmp_path / "data"), "podnet") as store:
        assert release_owner(store, "c1", "eth0") == []


def test_gc_names_veths_only_from_this_networks_released_reservations(tmp_path, subnet_file):
    kernel = FakeKernel()
    for cid in ("keep", "drop"):
        assert add(subnet_file, tmp_path, cid=cid, kernel=kernel)[0] == 0
    other = conf(subnet_file, str(tmp_path / "data"), name="othernet")
    assert run(env(CNI_CONTAINERID="theirs"), other, kernel=kernel, store=DiskStore)[0] == 0
    kernel.ports_["vxn0123456789ab"] = {}  # someone else's device with a name like ours
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    gc = conf(subnet_file, str(tmp_path / "data"), **{"cni.dev/valid-attachments": valid})
    assert run(env("GC"), gc, kernel=kernel, store=DiskStore) == (0, "")
    assert sorted(kernel.ports_) == sorted([host_veth_name("keep", "eth0"), host_veth_name("theirs", "eth0"),
                                            "vxn0123456789ab"])


def test_the_agent_name_lock_never_creates_through_a_planted_link(tmp_path):
    # The lock next to the agent's socket (DEL/ADD vs the agent's queued deletions) is created on demand.
    link = tmp_path / "cni.sock.lock"
    link.symlink_to(tmp_path / "created-through-the-link")
    with NameLock(str(link), host_veth_name("c1", "eth0")) as lock:
        assert lock.fd is None  # runs unlocked, as when no agent serves there
    assert not (tmp_path / "created-through-the-link").exists() and link.is_symlink()


# -- property: whatever the file holds, the error never quotes it ------------------------------------

TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "+/_", min_size=12, max_size=24)
LINES = st.lists(st.sampled_from(["", "# c", "VXLAN_NET_NETWORK=198.19.0.0/16", "VXLAN_NET_SUBNET=198.19.3.1/24",
                                  "VXLAN_NET_IPV6_NETWORK=fd19::/56", "VXLAN_NET_IPV6_SUBNET=fd19:0:0:5::1/64",
                                  "VXLAN_NET_MTU=1450", "VXLAN_NET_IPMASQ=false", "A=B", "garbage"]), max_size=6)


@settings(max_examples=300, deadline=None)
@given(token=TOKEN, before=LINES, after=LINES,
       shape=st.sampled_from(["{t}", "X={t}", "VXLAN_NET_NETWORK={t}", "VXLAN_NET_SUBNET={t}/24",
                              "VXLAN_NET_MTU={t}", "VXLAN_NET_IPMASQ={t}", "VXLAN_NET_SUBNET=198.19.{t}", "{t}=1",
                              "VXLAN_NET_IPV6_NETWORK={t}", "VXLAN_NET_IPV6_SUBNET=fd19::{t}/64",
                              "VXLAN_NET_IPV6_SUBNET={t}/64"]))
def test_no_subnet_file_content_ever_reaches_an_error(token, before, after, shape):
    from cni.subnet_file import IPV6_KEYS, KEYS

    assume(not any(token in key for key in KEYS + IPV6_KEYS))  # the message may name a key: not content
    text = "\n".join(before + [shape.format(t=token)] + after)
    try:
        parse_subnet_file(text, "/p")
    except CniError as exc:
        assert token not in exc.msg + exc.details and exc.code == 7


def test_reservations_are_whole_also_where_the_filesystem_has_no_o_tmpfile(tmp_path, monkeypatch, outside):
    import errno

    import cni.ipam

    real_open = os.open

    def no_tmpfile(path, flags, *args, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(cni.ipam.posix, "open", no_tmpfile)
    folder = store_dir(tmp_path)
    (folder / "198.19.3.2").symlink_to(outside)
    plan = Plan(ip("198.19.3.2"), ip("198.19.3.254"), ip("198.19.3.1"))
    with DiskStore(str(tmp_path / "data"), "podnet") as store:
        assert allocate(store, plan, "c1", "eth0") == ip("198.19.3.3")
    assert (folder / "198.19.3.3").read_bytes() == b"c1\r\neth0" and untouched(outside)
