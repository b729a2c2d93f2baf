"""The plugin's pure parts, in-process, without root: parsing, allocation, dispatch with a fake kernel."""

import json
import os
import string
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni import config as C
from cni.errors import CniError
from cni.ipam import DiskStore, MemoryStore, allocate, pick_address, release_owner
from cni.plugin import host_veth_name, run
from cni.subnet_file import parse_subnet_file
from cni.wiring import Attachment

ip = C.ip_to_int


class FakeKernel:
    """The kernel steps of `cni.wiring.Wiring`, in memory; `fail` makes attach raise."""

    def __init__(self, fail=None):
        self.fail = fail
        self.ports_ = {}

    def attach(self, **kw):
        if self.fail:
            raise self.fail
        self.ports_[kw["host_veth"]] = kw
        return Attachment(b"\x02" * 6, b"\x04" * 6, kw["mac"])

    def detach(self, name):
        return self.ports_.pop(name, None) is not None

    def ports(self, bridge, prefix):
        return list(self.ports_)

    def inspect(self, *args):
        raise AssertionError("not used here")


class MemoryStores:
    """A `store` factory for `run`: one MemoryStore per network, a lock like DiskStore's."""

    def __init__(self):
        self.stores = {}
        self.lock = threading.Lock()

    def __call__(self, data_dir, name, create=True):
        store = self.stores.setdefault(name, MemoryStore())
        outer = self

        class Locked:
            def __enter__(self):
                outer.lock.acquire()
                return store

            def __exit__(self, *exc):
                outer.lock.release()

        return Locked()


@pytest.fixture
def subnet_file(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text("VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=198.19.3.1/24\nVXLAN_NET_MTU=1450\n"
                    "VXLAN_NET_IPMASQ=true\n")
    return str(path)


def env(command="ADD", **extra):
    base = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
            "CNI_NETNS": "/proc/self/ns/net", "CNI_PATH": "/usr/lib/cni"}
    base.update(extra)
    return base


def conf(subnet_file, **extra):
    base = {"cniVersion": "1.0.0", "name": "podnet", "type": "vxlan-net-cni", "subnetFile": subnet_file,
            "dataDir": "/nonexistent/vnc"}
    base.update(extra)
    return json.dumps(base).encode()


def assert_spec_error(rc, out, code=None):
    assert rc == 1
    err = json.loads(out)
    assert set(err) == {"cniVersion", "code", "msg", "details"}
    assert isinstance(err["code"], int) and isinstance(err["msg"], str) and err["msg"]
    if code is not None:
        assert err["code"] == code, err
    return err


# -- addresses and names ---------------------------------------------------------

def test_ip_parsing_is_strict():
    assert C.ip_to_int("198.19.3.1") == 0xC6130301
    for bad in ("1", "1.2.3", "01.2.3.4.5", "256.1.1.1", " 1.2.3.4", "1.2.3.4\0", None, 5, "::1"):
        with pytest.raises(ValueError):
            C.ip_to_int(bad)
    assert C.parse_cidr("198.19.0.0/16") == (0xC6130000, 16)
    for bad in ("198.19.0.0", "198.19.0.0/33", "198.19.0.0/-1", "198.19.0.0/1/2", "198.19.0.0/٣"):
        with pytest.raises(ValueError):
            C.parse_cidr(bad)


def test_ifname_rules_follow_the_kernel():
    assert C.valid_ifname("eth0") and C.valid_ifname("a" * 15)
    for bad in ("", "a" * 16, ".", "..", "a/b", "a:b", "a b", "é" * 8):
        assert not C.valid_ifname(bad)


def test_host_veth_name_is_deterministic_and_fits_ifnamsiz():
    name = host_veth_name("c1", "eth0")
    assert name == host_veth_name("c1", "eth0") != host_veth_name("c1", "eth1")
    assert name.startswith("vxn") and len(name) == 15


# -- env and config ------------------------------------------------------------------

@pytest.mark.parametrize("override, words", [
    ({"CNI_COMMAND": "FROB"}, "CNI_COMMAND"),
    ({"CNI_CONTAINERID": ""}, "CNI_CONTAINERID"),
    ({"CNI_CONTAINERID": "-bad"}, "CNI_CONTAINERID"),
    ({"CNI_IFNAME": "x" * 16}, "CNI_IFNAME"),
    ({"CNI_NETNS": ""}, "CNI_NETNS"),
    ({"CNI_ARGS": "novalue"}, "CNI_ARGS"),
    ({"CNI_ARGS": "K8S_POD_NAME=a;Surprise=1"}, "Surprise"),
])
def test_bad_env_is_code_4(subnet_file, override, words):
    rc, out = run(env(**override), conf(subnet_file), kernel=FakeKernel(), store=MemoryStores())
    assert words in assert_spec_error(rc, out, 4)["msg"]


def test_cni_args_tolerate_ignore_unknown_and_k8s_keys():
    args = C.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=ns;Whatever=x;IP=198.19.3.9")
    assert args["IP"] == "198.19.3.9" and args["Whatever"] == "x"


@pytest.mark.parametrize("stdin, code", [
    (b"", 6), (b"{", 6), (b"[]", 6), (b"\xff\xfe", 6), (b'{"cniVersion": "1.0.0"} x', 6),
    (b'{"name": "n", "type": "t"}', 1), (b'{"cniVersion": "0.1.0", "name": "n", "type": "t"}', 1),
    (b'{"cniVersion": 1, "name": "n", "type": "t"}', 1),
    (b'{"cniVersion": "1.0.0", "type": "t"}', 7), (b'{"cniVersion": "1.0.0", "name": "n"}', 7),
    (b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "mtu": true}', 7),
    (b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "bridge": "a/b"}', 7),
    (b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "hairpinMode": "yes"}', 7),
    (b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "ipam": {"type": "dhcp"}}', 2),
    (b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "ipam": {"ranges": [[{}, {}]]}}', 2),
    (b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "ipam": {"routes": [{"dst": "x"}]}}', 7),
    (b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "runtimeConfig": {"mac": "01:00:00:00:00:01"}}', 7),
    (b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "args": {"cni": {"ips": ["1.2.3.4", "1.2.3.5"]}}}', 7),
])
def test_bad_config_codes(stdin, code):
    rc, out = run(env(), stdin, kernel=FakeKernel(), store=MemoryStores())
    assert_spec_error(rc, out, code)


def test_error_cni_version_follows_the_config():
    rc, out = run(env(CNI_IFNAME=""), b'{"cniVersion": "0.4.0", "name": "n", "type": "t"}', kernel=FakeKernel())
    assert assert_spec_error(rc, out, 4)["cniVersion"] == "0.4.0"


TAIL = "VXLAN_NET_MTU=1450\nVXLAN_NET_IPMASQ=false\n"
NODE_FILE = "VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=198.19.3.1/24\n" + TAIL
IPV6_PAIR = "VXLAN_NET_IPV6_NETWORK=fd19::/56\nVXLAN_NET_IPV6_SUBNET=fd19:0:0:5::1/64\n"
DUAL_FILE = NODE_FILE + IPV6_PAIR
IPV6_FILE = IPV6_PAIR + TAIL


@pytest.mark.parametrize("text, words", [
    ("VXLAN_NET_SUBNET=198.19.3.1/24\n" + TAIL, "not a vxlan-net subnet file"),
    ("VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=198.20.3.1/24\n" + TAIL, "is not a"),
    ("VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=198.19.3.0/24\n" + TAIL, "gateway"),
    (NODE_FILE.replace("=1450", "=big"), "VXLAN_NET_MTU is not an MTU"),
    (NODE_FILE.replace("=false", "=maybe"), "VXLAN_NET_IPMASQ is not true or false"),
    ("VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=198.19.3.1/24\n", "VXLAN_NET_MTU, VXLAN_NET_IPMASQ missing"),
    (NODE_FILE.replace("VXLAN_NET_MTU=1450\n", ""), "VXLAN_NET_MTU missing"),
    ("garbage\n", "not a vxlan-net subnet file"),
])
def test_bad_subnet_file(text, words):
    with pytest.raises(CniError) as info:
        parse_subnet_file(text)
    assert info.value.code == 7 and words in info.value.msg


def test_subnet_file_comments_quotes_and_unknown_keys():
    node = parse_subnet_file('# agent\nVXLAN_NET_NETWORK="198.19.0.0/16"\nVXLAN_NET_SUBNET=198.19.3.1/24\n'
                             'VXLAN_NET_NEWER=1\n' + TAIL.replace("1450", "1400").replace("false", "TRUE"))
    assert (node.gateway, node.prefix, node.mtu, node.ipmasq) == (ip("198.19.3.1"), 24, 1400, True)


def test_requested_addresses_from_every_source_and_containerd_keys():
    e = C.parse_env(env(CNI_ARGS="IgnoreUnknown=1;MAC=02:00:00:00:00:09"))
    raw = {"cniVersion": "1.0.0", "name": "n", "type": "t", "runtimeConfig": {"IPs": ["198.19.3.9/24"],
           "portMappings": [{"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp"}]}}
    parsed = C.parse_netconf(raw, e)
    assert parsed.requested_ips == [ip("198.19.3.9")] and parsed.requested_mac == b"\x02\0\0\0\0\x09"


def test_plan_overrides_and_defaults():
    node = parse_subnet_file(NODE_FILE)
    e = C.parse_env(env())
    plan = C.plan_addresses(C.parse_netconf({"cniVersion": "1.0.0", "name": "n", "type": "t"}, e), node)
    [family] = plan.families
    assert (family.index, family.start, family.end, plan.mtu) == (0, ip("198.19.3.1"), ip("198.19.3.254"), 1450)
    assert [r.to_dict() for r in plan.routes] == [{"dst": "0.0.0.0/0", "gw": "198.19.3.1"}]
    with pytest.raises(CniError) as info:
        C.plan_addresses(C.parse_netconf({"cniVersion": "1.0.0", "name": "n", "type": "t",
                                          "ipam": {"rangeStart": "198.19.4.1"}}, e), node)
    assert info.value.code == 7 and "outside the node subnet" in info.value.msg


# -- allocation --------------------------------------------------------------------------

def test_pick_address_round_robin_wraps_and_skips_gateway_and_taken():
    assert pick_address(1, 5, 1, set(), None) == 2
    assert pick_address(1, 5, 1, set(), 3) == 4
    assert pick_address(1, 5, 1, {4}, 3) == 5
    assert pick_address(1, 5, 1, {4, 5}, 3) == 2  # wrapped
    assert pick_address(1, 5, 1, {2, 3, 4, 5}, 3) is None
    assert pick_address(1, 5, 1, set(), 99) == 2  # a last outside the range restarts at the start


class Plan:
    def __init__(self, start, end, gateway, index=0):
        self.start, self.end, self.gateway, self.index = start, end, gateway, index


def test_allocate_refuses_duplicates_and_exhaustion_with_codes():
    store, plan = MemoryStore(), Plan(10, 11, 1)
    assert allocate(store, plan, "a", "eth0") == 10
    with pytest.raises(CniError) as info:
        allocate(store, plan, "a", "eth0")
    assert info.value.code == 101
    assert allocate(store, plan, "b", "eth0") == 11
    with pytest.raises(CniError) as info:
        allocate(store, plan, "c", "eth0")
    assert info.value.code == 100
    assert release_owner(store, "a", "eth0") == [10]
    assert allocate(store, plan, "c", "eth0") == 10


def test_last_reserved_holds_exactly_the_last_address_also_after_a_longer_one(tmp_path):
    """It is rewritten in place (no O_TRUNC): a shorter address must not keep the longer one's tail."""
    plan = Plan(ip("198.19.3.2"), ip("198.19.3.254"), ip("198.19.3.1"))
    folder = tmp_path / "podnet"
    for requested in ("198.19.3.100", "198.19.3.9", "198.19.3.10"):
        with DiskStore(str(tmp_path), "podnet") as store:
            assert allocate(store, plan, f"c{requested}", "eth0", ip(requested)) == ip(requested)
        assert (folder / "last_reserved_ip.0").read_bytes() == requested.encode()
    with DiskStore(str(tmp_path), "podnet") as store:
        assert allocate(store, plan, "next", "eth0") == ip("198.19.3.11")


def test_disk_store_is_host_local_compatible(tmp_path):
    plan = Plan(ip("198.19.3.2"), ip("198.19.3.254"), ip("198.19.3.1"))
    with DiskStore(str(tmp_path), "podnet") as store:
        got = allocate(store, plan, "ctr", "eth0")
    folder = tmp_path / "podnet"
    assert sorted(os.listdir(folder)) == ["198.19.3.2", "last_reserved_ip.0", "lock"]
    assert (folder / "198.19.3.2").read_bytes() == b"ctr\r\neth0"
    assert (folder / "last_reserved_ip.0").read_text() == "198.19.3.2"
    # A file host-local wrote in its old format (container ID only) is still found.
    (folder / "198.19.3.9").write_text("old")
    with DiskStore(str(tmp_path), "podnet") as store:
        assert got == ip("198.19.3.2")
        assert store.reservations()[ip("198.19.3.9")] == ("old", "")
        assert release_owner(store, "old", "eth0") == [ip("198.19.3.9")]
    with DiskStore(str(tmp_path / "none"), "podnet", create=False) as store:
        assert store is None


def test_disk_store_lock_serialises_processes(tmp_path):
    import multiprocessing

    plan = Plan(ip("198.19.3.2"), ip("198.19.3.254"), ip("198.19.3.1"))

    def worker(i, queue):
        with DiskStore(str(tmp_path), "podnet") as store:
            queue.put(allocate(store, plan, f"p{i}", "eth0"))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, queue)) for i in range(20)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert len(set(got)) == 20


# -- dispatch with a fake kernel -------------------------------------------------------------

def test_add_releases_the_address_when_the_kernel_fails(subnet_file):
    stores = MemoryStores()
    failure = CniError(103, "injected: netlink refused")
    rc, out = run(env(), conf(subnet_file), kernel=FakeKernel(fail=failure), store=stores)
    assert assert_spec_error(rc, out, 103)["msg"] == "injected: netlink refused"
    assert stores.stores["podnet"].owners == {}
    rc, out = run(env(), conf(subnet_file), kernel=FakeKernel(fail=RuntimeError("bug")), store=stores)
    assert "RuntimeError" in assert_spec_error(rc, out, 999)["msg"]
    assert stores.stores["podnet"].owners == {}


def test_add_chains_prev_result(subnet_file):
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "lo0"}], "ips": [], "dns": {"nameservers": ["198.18.0.53"]}}
    rc, out = run(env(), conf(subnet_file, prevResult=prev), kernel=FakeKernel(), store=MemoryStores())
    result = json.loads(out)
    assert rc == 0 and [i["name"] for i in result["interfaces"]][0] == "lo0"
    assert result["ips"][0]["interface"] == 3 and result["dns"] == prev["dns"]


def test_gc_keeps_valid_attachments_including_old_format_reservations(subnet_file):
    stores = MemoryStores()
    owners = stores.stores.setdefault("podnet", MemoryStore()).owners
    owners.update({ip("198.19.3.2"): ("keep", "eth0"), ip("198.19.3.3"): ("old", ""),
                   ip("198.19.3.4"): ("gone", "eth0"), ip("198.19.3.5"): ("gone", "")})
    valid = [{"containerID": "keep", "ifname": "eth0"}, {"containerID": "old", "ifname": "eth0"}]
    rc, out = run(env("GC"), conf(subnet_file, cniVersion="1.1.0", **{"cni.dev/valid-attachments": valid}),
                  kernel=FakeKernel(), store=stores)
    assert rc == 0, out
    assert owners == {ip("198.19.3.2"): ("keep", "eth0"), ip("198.19.3.3"): ("old", "")}


def test_gc_needs_the_attachment_list_and_1_1_0(subnet_file):
    rc, out = run(env("GC"), conf(subnet_file, cniVersion="1.1.0"), kernel=FakeKernel(), store=MemoryStores())
    assert "valid-attachments" in assert_spec_error(rc, out, 7)["msg"]
    rc, out = run(env("GC"), conf(subnet_file, **{"cni.dev/valid-attachments": []}), kernel=FakeKernel())
    assert_spec_error(rc, out, 1)


def test_status_51_when_the_range_is_full(subnet_file):
    stores = MemoryStores()
    full = conf(subnet_file, cniVersion="1.1.0", ipam={"rangeStart": "198.19.3.5", "rangeEnd": "198.19.3.5"})
    assert run(env(), full, kernel=FakeKernel(), store=stores)[0] == 0
    assert_spec_error(*run(env("STATUS"), full, kernel=FakeKernel(), store=stores), 51)


# -- property tests: the parser never crashes -----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
CONF_KEYS = ["cniVersion", "name", "type", "mtu", "bridge", "ipam", "args", "runtimeConfig", "prevResult",
             "isDefaultGateway", "hairpinMode", "cni.dev/valid-attachments", "cni.dev/attachments"]
field_values = st.one_of(json_values, st.sampled_from(["1.0.0", "1.1.0", "0.4.0", "podnet", "198.19.3.9",
                                                       "198.19.3.0/24", "02:00:00:00:00:01", "eth0", "fd19:0:0:5::9",
                                                       "fd19:0:0:5::/64", "::/0"]))
configs = st.dictionaries(st.sampled_from(CONF_KEYS), field_values, max_size=8)
commands = st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "add"])
env_text = st.text(alphabet=string.printable + "é\u2028", max_size=20)


def assert_shaped(rc, out):
    if rc == 0:
        assert out == "" or isinstance(json.loads(out), dict)
    else:
        assert_spec_error(rc, out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stdin=st.binary(max_size=200), command=commands)
def test_any_bytes_on_stdin_give_a_spec_shaped_answer(stdin, command, capsys):
    assert_shaped(*run(env(command), stdin, kernel=FakeKernel(), store=MemoryStores()))
    assert "Traceback" not in capsys.readouterr().err


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=configs, command=commands, ifname=env_text, cid=env_text, args=env_text)
def test_any_config_and_env_give_a_spec_shaped_answer(raw, command, ifname, cid, args, subnet_file, capsys):
    raw = dict(raw, subnetFile=subnet_file, dataDir="/nonexistent/vnc")
    environ = env(command, CNI_IFNAME=ifname, CNI_CONTAINERID=cid, CNI_ARGS=args)
    stores = MemoryStores()
    assert_shaped(*run(environ, json.dumps(raw).encode(), kernel=FakeKernel(), store=stores))
    assert "Traceback" not in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_any_subnet_file_text_parses_or_is_a_config_error(text):
    try:
        node = parse_subnet_file(text)
    except CniError as exc:
        assert exc.code == 7 and exc.msg
    else:
        assert node.prefix is not None or node.ipv6_prefix is not None
        assert (node.prefix is None or 0 < node.prefix <= 30) and 68 <= node.mtu <= 65535
        assert node.ipv6_prefix is None or node.ipv6_network_prefix <= node.ipv6_prefix <= 126


@settings(max_examples=200, deadline=None)
@given(ipam_conf=st.dictionaries(st.sampled_from(["rangeStart", "rangeEnd", "routes", "ranges", "subnet", "type",
                                                  "gateway"]), field_values, max_size=5))
def test_any_ipam_section_plans_or_fails_with_a_code(ipam_conf):
    for text in (NODE_FILE, DUAL_FILE):
        node = parse_subnet_file(text)
        try:
            plan = C.plan_addresses(C.parse_netconf({"cniVersion": "1.0.0", "name": "n", "type": "t",
                                                     "ipam": ipam_conf}, C.parse_env(env())), node)
        except CniError as exc:
            assert exc.code in (2, 7)
        else:
            assert 1 <= len(plan.families) <= 2
            for family in plan.families:
                if C.is_ipv6(family.gateway):
                    assert node.ipv6_subnet < family.start <= family.end < node.ipv6_subnet + 2 ** 64
                else:
                    assert node.subnet < family.start <= family.end < node.subnet + 255


def test_jsonfast_matches_json_on_valid_documents():
    from cni.jsonfast import dumps, loads

    doc = {"a": [1, 2.5, None, True, "é\n"], "b": {"c": ""}}
    assert loads(json.dumps(doc)) == doc and json.loads(dumps(doc)) == doc
    for bad in ("", "{", "[1] x", "NaN", "[" * 100000):
        with pytest.raises(ValueError):
            loads(bad)


@pytest.mark.parametrize("path", ["", "/", "//", "///x", "a", "a/", "a/b", "a//b", "a/b//", "/subnet.env",
                                  "/run/vxlan-net/subnet.env"])
def test_the_plugins_path_helpers_agree_with_os_path(path):
    """The plugin does not import os (start-up cost); its two path helpers must give os.path's answers."""
    import os.path

    from cni.config import join_path, parent_dir

    assert parent_dir(path) == os.path.dirname(path)
    assert join_path(path, "podnet") == os.path.join(path, "podnet")
