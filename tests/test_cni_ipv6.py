"""IPv6 in the plugin's pure parts (issue 11), no root: the subnet-file contract, the dual-stack plan,
host-local's dual-stack IPAM store, and the dispatcher's answers with a fake kernel. Hostile input first.
"""

import json
import multiprocessing
import os

import pytest

from cni import config as C
from cni.errors import CniError
from cni.ipam import DiskStore, MemoryStore, allocate_all, pick_address, release_owner
from cni.plugin import run
from cni.subnet_file import BadSubnetFile, NotASubnetFile, parse, parse_subnet_file, render, write
from test_cni_hostile import SECRET, run_binary
from test_cni_hostile import conf as binary_conf
from test_cni_parser import (DUAL_FILE, IPV6_FILE, IPV6_PAIR, NODE_FILE, TAIL, FakeKernel, MemoryStores,
                             assert_spec_error, env, ip)

ip6 = C.ip6_to_int


def conf(subnet_file, **extra):
    base = {"cniVersion": "1.1.0", "name": "podnet", "type": "vxlan-net-cni", "subnetFile": subnet_file,
            "dataDir": "/nonexistent/vnc"}
    base.update(extra)
    return json.dumps(base).encode()


@pytest.fixture
def dual_file(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text(DUAL_FILE)
    return str(path)


@pytest.fixture
def v6_file(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text(IPV6_FILE)
    return str(path)


# -- the subnet file: hostile values first ---------------------------------------------------------------

V6_NET, V6_SUB = "VXLAN_NET_IPV6_NETWORK", "VXLAN_NET_IPV6_SUBNET"


@pytest.mark.parametrize("network, subnet, words", [
    ("fd19::/56", "garbage", f"{V6_SUB} is not an IPv6 CIDR"),
    ("fd19::/56", "fd19:0:0:5::1", f"{V6_SUB} is not an IPv6 CIDR"),             # no prefix
    ("fd19::/56", "fd19:0:0:5::1/129", f"{V6_SUB} is not an IPv6 CIDR"),
    ("fd19::/56", "fd19:0:0:5::1%eth0/64", f"{V6_SUB} is not an IPv6 CIDR"),     # a zone
    ("fd19::/56", "fd19:0:0:5:::1/64", f"{V6_SUB} is not an IPv6 CIDR"),
    ("fd19::/56", "198.19.3.1/24", f"{V6_SUB} is not an IPv6 CIDR"),             # the other family
    ("198.19.0.0/16", "fd19:0:0:5::1/64", f"{V6_NET} is not an IPv6 CIDR"),
    ("fd19::/56", "fd18:0:0:5::1/64", "is not a /126-or-larger part of"),       # outside the network
    ("fd19::/56", "fd19:0:1:5::1/64", "is not a /126-or-larger part of"),       # outside by one bit above /56
    ("fd19::/64", "fd19::1/56", "is not a /126-or-larger part of"),             # larger than the network
    ("fd19::/56", "fd19:0:0:5::1/127", "is not a /126-or-larger part of"),      # no room for a pod
    ("fd19::/56", "fd19:0:0:5::/64", "must name the gateway address, not the network address"),
    ("ff05::/16", "ff05::1/64", "multicast, link-local or IPv4-mapped"),
    ("fe80::/10", "fe80::1/64", "multicast, link-local or IPv4-mapped"),
    ("::ffff:0:0/96", "::ffff:c613:301/120", "multicast, link-local or IPv4-mapped"),
])
def test_bad_ipv6_values_name_the_key(network, subnet, words):
    for head in ("", NODE_FILE.replace(TAIL, "")):  # IPv6-only and dual-stack
        with pytest.raises(BadSubnetFile) as info:
            parse(head + f"{V6_NET}={network}\n{V6_SUB}={subnet}\n" + TAIL)
        assert words in str(info.value)


@pytest.mark.parametrize("present", [V6_NET, V6_SUB])
def test_one_ipv6_key_without_the_other_is_refused(present):
    line = {V6_NET: "fd19::/56", V6_SUB: "fd19:0:0:5::1/64"}[present]
    absent = V6_SUB if present == V6_NET else V6_NET
    for head in ("", NODE_FILE.replace(TAIL, "")):
        with pytest.raises(BadSubnetFile) as info:
            parse(head + f"{present}={line}\n" + TAIL)
        assert str(info.value) == f"{absent} missing"


def test_an_mtu_below_ipv6s_minimum_is_refused_only_with_ipv6():
    with pytest.raises(BadSubnetFile) as info:
        parse(DUAL_FILE.replace("=1450", "=1279"))
    assert str(info.value).startswith("VXLAN_NET_MTU is below 1280")
    assert parse(NODE_FILE.replace("=1450", "=1279")).mtu == 1279
    with pytest.raises(CniError) as info:
        plan(DUAL_FILE, mtu=1200)
    assert info.value.code == 7 and "mtu 1200 is below 1280" in info.value.msg
    assert plan(DUAL_FILE, mtu=1280).mtu == 1280 and plan(NODE_FILE, mtu=1200).mtu == 1200


def test_an_ipv6_file_with_half_an_ipv4_pair_is_refused():
    with pytest.raises(BadSubnetFile) as info:
        parse("VXLAN_NET_NETWORK=198.19.0.0/16\n" + IPV6_FILE)
    assert str(info.value) == "VXLAN_NET_SUBNET missing"


def test_a_file_with_no_family_is_not_ours():
    with pytest.raises(NotASubnetFile):
        parse(TAIL)


@pytest.mark.parametrize("key, bad", [(V6_NET, SECRET), (V6_SUB, f"{SECRET}/64"), (V6_SUB, "fd19:0:0:5::/64"),
                                      (V6_SUB, "fd18:0:0:5::1/64")])
def test_the_plugin_names_the_bad_ipv6_key_never_the_value(tmp_path, key, bad):
    from cni.install import install

    lines = dict(line.split("=", 1) for line in DUAL_FILE.splitlines())
    lines[key] = bad
    path = tmp_path / "subnet.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    rc, out, err = run_binary(install(str(tmp_path / "bin")), "ADD", binary_conf(str(path), str(tmp_path / "d")))
    error = assert_spec_error(rc, out, 7)
    assert error["msg"].startswith(f"subnet file {path}: {key}"), error
    assert bad not in out + err and SECRET not in out + err


def test_dual_stack_and_ipv6_only_files_parse():
    node = parse_subnet_file(DUAL_FILE)
    assert (node.gateway, node.prefix) == (ip("198.19.3.1"), 24)
    assert (node.ipv6_network, node.ipv6_network_prefix) == (ip6("fd19::"), 56)
    assert (node.ipv6_gateway, node.ipv6_prefix, node.ipv6_subnet) == (ip6("fd19:0:0:5::1"), 64, ip6("fd19:0:0:5::"))
    only = parse_subnet_file(IPV6_FILE)
    assert (only.network, only.gateway, only.subnet, only.prefix) == (None, None, None, None)
    assert (only.ipv6_gateway, only.mtu, only.ipmasq) == (ip6("fd19:0:0:5::1"), 1450, False)
    v4 = parse_subnet_file(NODE_FILE)
    assert (v4.ipv6_network, v4.ipv6_gateway, v4.ipv6_subnet) == (None, None, None)


def test_render_and_write_keep_the_ipv4_api_and_round_trip_both_families(tmp_path):
    assert render("198.19.0.0/16", "198.19.3.0/24", 1450, False) == NODE_FILE
    text = render("198.19.0.0/16", "198.19.3.0/24", 1450, False, ipv6_network="fd19::/56",
                  ipv6_subnet="fd19:0:0:5::/64")
    assert text == NODE_FILE.replace(TAIL, "") + IPV6_PAIR + TAIL
    assert render(None, None, 1450, False, ipv6_network="fd19::/56", ipv6_subnet="fd19:0:0:5::/64") == IPV6_FILE
    path = tmp_path / "subnet.env"
    write(str(path), None, None, 1450, False, ipv6_network="fd19::/56", ipv6_subnet="fd19:0:0:5::/64")
    assert path.read_text() == IPV6_FILE
    for args, kwargs in [((None, None, 1450, False), {}),                          # no family
                         (("198.19.0.0/16", None, 1450, False), {}),               # half a pair
                         ((None, None, 1450, False), {"ipv6_network": "fd19::/56"}),
                         ((None, None, 1450, False), {"ipv6_network": "fd19::/56", "ipv6_subnet": "198.19.3.0/24"}),
                         (("198.19.0.0/16", "fd19::/64", 1450, False), {}),
                         ((None, None, 1279, False), {"ipv6_network": "fd19::/56", "ipv6_subnet": "fd19::/64"})]:
        with pytest.raises(ValueError):
            render(*args, **kwargs)


# -- the plan: range sets matched to the node's families ---------------------------------------------------

def plan(node_text, ipam=None, **extra):
    raw = {"cniVersion": "1.0.0", "name": "n", "type": "t", **extra}
    if ipam is not None:
        raw["ipam"] = ipam
    return C.plan_addresses(C.parse_netconf(raw, C.parse_env(env())), parse_subnet_file(node_text))


@pytest.mark.parametrize("ipam, code, words", [
    ({"ranges": [[{"subnet": "fd19:0:0:5::/64"}], [{"subnet": "fd19:0:0:5::/64"}]]}, 7, "two range sets for IPv6"),
    ({"ranges": [[{"subnet": "fd19:0:0:5::/64", "rangeStart": "198.19.3.9"}]]}, 7, "mixes IPv4 and IPv6"),
    ({"ranges": [[{}], [{}], [{}]]}, 2, "one or two range sets"),
    ({"ranges": [[{"subnet": "fd19:0:0:6::/64"}]]}, 7, "is not the node subnet fd19:0:0:5::/64"),
    ({"ranges": [[{"rangeStart": "fd19:0:0:6::2"}]]}, 7, "outside the node subnet"),
    ({"ranges": [[{"rangeStart": "fd19:0:0:5::"}]]}, 7, "outside the node subnet"),       # the network address
    ({"ranges": [[{"gateway": "fd19:0:0:5::9"}]]}, 7, "is not the node gateway"),
    ({"ranges": [[{"rangeStart": "fd19:0:0:5::9", "rangeEnd": "fd19:0:0:5::2"}]]}, 7, "is after rangeEnd"),
    ({"ranges": [[{"rangeStart": "fd19::zz"}]]}, 7, "is not an IP address"),
    ({"routes": [{"dst": "fd19:1::1/64"}]}, 7, "host bits"),
    ({"routes": [{"dst": "::/0", "gw": "198.19.3.1"}]}, 7, "different families"),
    ({"routes": [{"dst": "fd18::/16"}], "ranges": [[{}]]}, 7, "the pod gets no IPv6 address"),
])
def test_bad_ipv6_ipam_sections_fail_with_a_code(ipam, code, words):
    with pytest.raises(CniError) as info:
        plan(DUAL_FILE, ipam)
    assert info.value.code == code and words in info.value.msg, info.value.msg


def test_an_ipv6_range_on_an_ipv4_only_node_is_a_config_error():
    with pytest.raises(CniError) as info:
        plan(NODE_FILE, {"ranges": [[{"subnet": "fd19:0:0:5::/64"}]]})
    assert info.value.code == 7 and "has no IPv6 subnet" in info.value.msg


@pytest.mark.parametrize("source", [{"CNI_ARGS": "IP=fd19:0:0:5::9,fd19:0:0:5::a"},
                                    {"runtimeConfig": {"ips": ["fd19:0:0:5::9/64", "fd19:0:0:5::a/64"]}}])
def test_two_requested_ipv6_addresses_are_refused(dual_file, source):
    environ = env(**{k: v for k, v in source.items() if k == "CNI_ARGS"})
    rc, out = run(environ, conf(dual_file, **{k: v for k, v in source.items() if k != "CNI_ARGS"}),
                  kernel=FakeKernel(), store=MemoryStores())
    assert "more than one IPv6 address requested" in assert_spec_error(rc, out, 7)["msg"]


def test_default_plan_is_one_set_per_node_family_with_a_default_route_each():
    dual = plan(DUAL_FILE)
    v4, v6 = dual.families
    assert (v4.index, v4.start, v4.end, v4.gateway) == (0, ip("198.19.3.1"), ip("198.19.3.254"), ip("198.19.3.1"))
    assert (v6.index, v6.start, v6.gateway, v6.prefix) == (1, ip6("fd19:0:0:5::1"), ip6("fd19:0:0:5::1"), 64)
    assert v6.end == ip6("fd19:0:0:5:ffff:ffff:ffff:ffff") and v6.size == 2 ** 64 - 2
    assert [r.to_dict() for r in dual.routes] == [{"dst": "0.0.0.0/0", "gw": "198.19.3.1"},
                                                  {"dst": "::/0", "gw": "fd19:0:0:5::1"}]
    [only] = plan(IPV6_FILE).families
    assert (only.index, only.gateway) == (0, ip6("fd19:0:0:5::1"))
    assert [r.to_dict() for r in plan(IPV6_FILE).routes] == [{"dst": "::/0", "gw": "fd19:0:0:5::1"}]
    cluster = plan(DUAL_FILE, isDefaultGateway=False)
    assert [r.to_dict() for r in cluster.routes] == [{"dst": "198.19.0.0/16", "gw": "198.19.3.1"},
                                                     {"dst": "fd19::/56", "gw": "fd19:0:0:5::1"}]


def test_configured_range_sets_choose_the_families_and_their_order():
    swapped = plan(DUAL_FILE, {"ranges": [[{"subnet": "fd19:0:0:5::/64", "rangeStart": "fd19:0:0:5::100"}],
                                          [{"subnet": "198.19.3.0/24"}]]})
    assert [(f.index, C.is_ipv6(f.gateway)) for f in swapped.families] == [(0, True), (1, False)]
    assert swapped.families[0].start == ip6("fd19:0:0:5::100")
    v4_only = plan(DUAL_FILE, {"ranges": [[{}]]})  # a set naming no address: the node's first family
    assert [C.is_ipv6(f.gateway) for f in v4_only.families] == [False]
    assert [r.to_dict() for r in v4_only.routes] == [{"dst": "0.0.0.0/0", "gw": "198.19.3.1"}]
    gateway_filled = plan(DUAL_FILE, {"routes": [{"dst": "fd18::/16"}]})
    assert gateway_filled.routes[-1].to_dict() == {"dst": "fd18::/16", "gw": "fd19:0:0:5::1"}


# -- allocation: both families in one store -------------------------------------------------------------------

def test_pick_address_in_a_slash_64_is_bounded_by_what_is_taken():
    start, end = ip6("fd19:0:0:5::1"), ip6("fd19:0:0:5:ffff:ffff:ffff:ffff")
    taken = {start + i for i in range(1, 1001)}
    assert pick_address(start, end, start, taken, None) == start + 1001
    assert pick_address(start, end, start, set(), end) == start + 1  # wraps from the last address
    small = {ip6("fd19:0:0:5::2"), ip6("fd19:0:0:5::3")}
    assert pick_address(ip6("fd19:0:0:5::1"), ip6("fd19:0:0:5::3"), start, small, None) is None


def test_allocate_all_gives_one_address_per_family_and_is_all_or_none():
    dual = plan(DUAL_FILE)
    store = MemoryStore()
    got = allocate_all(store, dual.families, "a", "eth0")
    assert [C.addr_text(x) for x in got] == ["198.19.3.2", "fd19:0:0:5::2"]
    assert store.last == {0: ip("198.19.3.2"), 1: ip6("fd19:0:0:5::2")}
    with pytest.raises(CniError) as info:
        allocate_all(store, dual.families, "a", "eth0")
    assert info.value.code == 101
    # IPv6 exhausted (a one-address range, taken): the IPv4 address reserved first is released again.
    tight = plan(DUAL_FILE, {"ranges": [[{}], [{"rangeStart": "fd19:0:0:5::2", "rangeEnd": "fd19:0:0:5::2"}]]})
    with pytest.raises(CniError) as info:
        allocate_all(store, tight.families, "b", "eth0")
    assert info.value.code == 100
    assert sorted(store.owners.values()) == [("a", "eth0"), ("a", "eth0")]
    assert release_owner(store, "a", "eth0") == [ip("198.19.3.2"), ip6("fd19:0:0:5::2")]
    assert store.owners == {}


def test_requested_addresses_are_honoured_per_family_and_a_family_not_assigned_is_refused():
    dual = plan(DUAL_FILE)
    got = allocate_all(MemoryStore(), dual.families, "a", "eth0", [ip6("fd19:0:0:5::99"), ip("198.19.3.9")])
    assert got == [ip("198.19.3.9"), ip6("fd19:0:0:5::99")]
    with pytest.raises(CniError) as info:
        allocate_all(MemoryStore(), plan(NODE_FILE).families, "a", "eth0", [ip6("fd19:0:0:5::99")])
    assert info.value.code == 102 and "assigns no IPv6 address" in info.value.msg
    with pytest.raises(CniError) as info:
        allocate_all(MemoryStore(), dual.families, "a", "eth0", [ip6("fd19:0:0:6::9")])
    assert info.value.code == 102 and "outside the range" in info.value.msg


def test_disk_store_is_host_local_compatible_for_both_families(tmp_path):
    dual = plan(DUAL_FILE)
    with DiskStore(str(tmp_path), "podnet") as store:
        allocate_all(store, dual.families, "ctr", "eth0")
    folder = tmp_path / "podnet"
    assert sorted(os.listdir(folder)) == ["198.19.3.2", "fd19:0:0:5::2", "last_reserved_ip.0",
                                          "last_reserved_ip.1", "lock"]
    assert (folder / "fd19:0:0:5::2").read_bytes() == b"ctr\r\neth0"
    assert (folder / "last_reserved_ip.1").read_text() == "fd19:0:0:5::2"
    # host-local's round robin per set: the next one follows each set's own last reservation.
    (folder / "last_reserved_ip.1").write_text("fd19:0:0:5::41")
    with DiskStore(str(tmp_path), "podnet") as store:
        assert allocate_all(store, dual.families, "next", "eth0") == [ip("198.19.3.3"), ip6("fd19:0:0:5::42")]
        assert sorted(release_owner(store, "ctr", "eth0")) == [ip("198.19.3.2"), ip6("fd19:0:0:5::2")]
    assert "fd19:0:0:5::2" not in os.listdir(folder)


def test_a_non_canonical_ipv6_name_is_someone_elses_and_never_released(tmp_path):
    folder = tmp_path / "podnet"
    folder.mkdir()
    (folder / "fd19:0:0:5:0:0:0:2").write_text("ctr\r\neth0")  # the address of ::2, not the text we write
    with DiskStore(str(tmp_path), "podnet") as store:
        assert store.reservations() == {ip6("fd19:0:0:5::2"): None}
        assert release_owner(store, "ctr", "eth0") == []
        assert allocate_all(store, plan(IPV6_FILE).families, "c", "eth0") == [ip6("fd19:0:0:5::3")]
    assert (folder / "fd19:0:0:5:0:0:0:2").exists()


def _allocate_dual(data_dir, queue, index):
    families = plan(DUAL_FILE).families
    with DiskStore(data_dir, "podnet") as store:
        queue.put(allocate_all(store, families, f"p{index}", "eth0"))


def test_disk_store_lock_serialises_dual_stack_processes(tmp_path):
    queue = multiprocessing.get_context("fork").Queue()
    procs = [multiprocessing.get_context("fork").Process(target=_allocate_dual, args=(str(tmp_path), queue, i))
             for i in range(12)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    got = [queue.get(timeout=5) for _ in procs]
    assert len({v4 for v4, _ in got}) == len({v6 for _, v6 in got}) == 12
    assert len(os.listdir(tmp_path / "podnet")) == 24 + 3


# -- the dispatcher with a fake kernel ---------------------------------------------------------------------

def test_add_reports_both_addresses_and_routes_and_hands_both_to_the_kernel(dual_file):
    kernel, stores = FakeKernel(), MemoryStores()
    rc, out = run(env(), conf(dual_file), kernel=kernel, store=stores)
    assert rc == 0, out
    result = json.loads(out)
    assert result["ips"] == [{"address": "198.19.3.2/24", "gateway": "198.19.3.1", "interface": 2},
                             {"address": "fd19:0:0:5::2/64", "gateway": "fd19:0:0:5::1", "interface": 2}]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "198.19.3.1"}, {"dst": "::/0", "gw": "fd19:0:0:5::1"}]
    [attached] = kernel.ports_.values()
    assert attached["addresses"] == [(ip("198.19.3.2"), 24, ip("198.19.3.1")),
                                     (ip6("fd19:0:0:5::2"), 64, ip6("fd19:0:0:5::1"))]
    old = json.loads(run(env(), conf(dual_file, cniVersion="0.4.0"), kernel=FakeKernel(), store=MemoryStores())[1])
    assert [a["version"] for a in old["ips"]] == ["4", "6"]


def test_add_releases_both_addresses_when_the_kernel_fails(dual_file):
    stores = MemoryStores()
    rc, out = run(env(), conf(dual_file), kernel=FakeKernel(fail=OSError(1, "nope")), store=stores)
    assert rc == 1 and stores.stores["podnet"].owners == {}


def test_ipv6_only_add_gc_and_status(v6_file):
    kernel, stores = FakeKernel(), MemoryStores()
    rc, out = run(env(), conf(v6_file), kernel=kernel, store=stores)
    assert rc == 0 and json.loads(out)["ips"] == [{"address": "fd19:0:0:5::2/64", "gateway": "fd19:0:0:5::1",
                                                    "interface": 2}]
    assert run(env("STATUS"), conf(v6_file), kernel=kernel, store=stores) == (0, "")
    gc = conf(v6_file, **{"cni.dev/valid-attachments": []})
    assert run(env("GC"), gc, kernel=kernel, store=stores) == (0, "")
    assert stores.stores["podnet"].owners == {} and kernel.ports_ == {}


def test_gc_releases_both_families_of_a_stale_attachment_and_keeps_a_valid_one(dual_file):
    kernel, stores = FakeKernel(), MemoryStores()
    for cid in ("keep", "stale"):
        assert run(env(CNI_CONTAINERID=cid), conf(dual_file), kernel=kernel, store=stores)[0] == 0
    gc = conf(dual_file, **{"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]})
    assert run(env("GC"), gc, kernel=kernel, store=stores) == (0, "")
    assert sorted(C.addr_text(a) for a in stores.stores["podnet"].owners) == ["198.19.3.2", "fd19:0:0:5::2"]


def test_status_is_limited_when_the_ipv6_range_is_full(dual_file):
    stores = MemoryStores()
    small = {"ranges": [[{}], [{"rangeStart": "fd19:0:0:5::2", "rangeEnd": "fd19:0:0:5::2"}]]}
    assert run(env(), conf(dual_file, ipam=small), kernel=FakeKernel(), store=stores)[0] == 0
    rc, out = run(env("STATUS"), conf(dual_file, ipam=small), kernel=FakeKernel(), store=stores)
    assert "IPv6 range are allocated" in assert_spec_error(rc, out, 51)["msg"]
