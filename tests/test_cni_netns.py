"""The plugin binary against the real kernel, in namespaces we create; asserted with `ip -j`."""

import concurrent.futures
import json
import os
import signal
import time

import pytest

from cni_netns import ROOT, CniLab, require_root, sh

pytestmark = pytest.mark.root


@pytest.fixture
def lab():
    require_root()
    with CniLab() as lab:
        yield lab


def add(lab, cid="c1", ifname="eth0", **conf):
    ns = lab.netns()
    rc, result, err = lab.run("ADD", lab.conf(**conf), cid=cid, netns=ns, ifname=ifname)
    assert rc == 0, (result, err)
    return ns, result


def assert_no_leftovers(lab):
    assert lab.reserved() == {}
    assert [n for n in lab.links() if n.startswith("vxn")] == []


def test_add_wires_bridge_veth_address_route_and_mtu(lab):
    ns, result = add(lab)
    bridge_name, host_name, pod = [i["name"] for i in result["interfaces"]]
    assert (bridge_name, pod) == ("cni0", "eth0")
    assert result["ips"] == [{"address": "198.19.3.2/24", "gateway": "198.19.3.1", "interface": 2}]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "198.19.3.1"}]
    assert result["interfaces"][2]["sandbox"] == ns.path

    links = lab.links()
    bridge, host = links["cni0"], links[host_name]
    assert "UP" in bridge["flags"] and bridge["linkinfo"]["info_kind"] == "bridge"
    assert bridge["address"] == result["interfaces"][0]["mac"]
    assert lab.addresses(lab.host, "cni0") == [("198.19.3.1", 24)]
    assert host["master"] == "cni0" and host["mtu"] == 1450 and "UP" in host["flags"]
    assert host["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert host["address"] == result["interfaces"][1]["mac"]

    pod_link = lab.links(ns)["eth0"]
    assert pod_link["mtu"] == 1450 and "UP" in pod_link["flags"]
    assert pod_link["address"] == result["interfaces"][2]["mac"]
    assert lab.addresses(ns, "eth0") == [("198.19.3.2", 24)]
    assert ("default", "198.19.3.1", "eth0") in lab.routes(ns)
    assert lab.reserved() == {"198.19.3.2": "c1\r\neth0"}
    with open(os.path.join(lab.store, "last_reserved_ip.0")) as fh:
        assert fh.read() == "198.19.3.2"
    assert sh("ping", "-c1", "-W2", "198.19.3.1", netns=ns.name).returncode == 0
    assert sh("cat", "/proc/sys/net/ipv4/ip_forward", netns=lab.host.name).stdout.strip() == "1"


def test_two_pods_share_the_bridge_and_reach_each_other(lab):
    ns1, r1 = add(lab, cid="a")
    ns2, r2 = add(lab, cid="b")
    assert r1["ips"][0]["address"] != r2["ips"][0]["address"]
    ports = [n for n, link in lab.links().items() if link.get("master") == "cni0"]
    assert len(ports) == 2
    target = r2["ips"][0]["address"].split("/")[0]
    assert sh("ping", "-c1", "-W2", target, netns=ns1.name).returncode == 0


def test_an_existing_bridge_is_reused(lab):
    sh("ip", "link", "add", "cni0", "type", "bridge", netns=lab.host.name)
    index = lab.links()["cni0"]["ifindex"]
    add(lab)
    assert lab.links()["cni0"]["ifindex"] == index
    assert "UP" in lab.links()["cni0"]["flags"]


def test_a_non_bridge_device_with_the_bridge_name_is_refused(lab):
    sh("ip", "link", "add", "cni0", "type", "veth", "peer", "name", "vnc-peer", netns=lab.host.name)
    rc, err, _ = lab.run("ADD", netns=lab.netns())
    assert rc == 1 and err["code"] == 103 and "not a bridge" in err["msg"]
    assert lab.reserved() == {}


def test_del_removes_both_veth_ends_and_releases_the_address(lab):
    ns, result = add(lab)
    host_name = result["interfaces"][1]["name"]
    rc, out, err = lab.run("DEL", netns=ns)
    assert (rc, out) == (0, None), err
    assert host_name not in lab.links()
    assert "eth0" not in lab.links(ns)
    assert lab.reserved() == {}
    rc, out, err = lab.run("DEL", netns=ns)  # repeated DEL
    assert (rc, out) == (0, None), err


@pytest.mark.parametrize("how", ["netns-gone", "netns-empty", "link-gone", "unknown-container"])
def test_del_succeeds_whatever_is_already_gone(lab, how):
    ns, result = add(lab)
    netns = ns.path
    if how == "netns-gone":
        ns.delete()
    elif how == "netns-empty":
        netns = ""
    elif how == "link-gone":
        sh("ip", "link", "del", result["interfaces"][1]["name"], netns=lab.host.name)
    cid = "someone-else" if how == "unknown-container" else "c1"
    rc, out, err = lab.run("DEL", netns=netns, cid=cid)
    assert (rc, out) == (0, None), err
    if how != "unknown-container":
        assert_no_leftovers(lab)
    else:
        assert list(lab.reserved().values()) == ["c1\r\neth0"]


def test_duplicate_add_is_refused_and_changes_nothing(lab):
    ns, result = add(lab)
    rc, err, _ = lab.run("ADD", netns=ns)
    assert rc == 1 and err["code"] == 101 and "c1" in err["msg"] and "eth0" in err["msg"]
    assert lab.reserved() == {"198.19.3.2": "c1\r\neth0"}
    assert lab.addresses(ns, "eth0") == [("198.19.3.2", 24)]
    assert result["interfaces"][1]["name"] in lab.links()


def test_failure_after_the_veth_is_made_removes_it_and_releases_the_address(lab):
    # The gateway 198.18.200.1 is not reachable from the pod: the kernel refuses the route.
    ns = lab.netns()
    conf = lab.conf(ipam={"routes": [{"dst": "198.18.100.0/24", "gw": "198.18.200.1"}]})
    rc, err, _ = lab.run("ADD", conf, netns=ns)
    assert rc == 1 and err["code"] == 103 and "198.18.100.0/24" in err["msg"]
    assert_no_leftovers(lab)
    assert "eth0" not in lab.links(ns)


def test_an_ifname_taken_in_the_container_fails_cleanly(lab):
    ns = lab.netns()
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "vnc-peer", netns=ns.name)
    rc, err, _ = lab.run("ADD", netns=ns)
    assert rc == 1 and err["code"] == 103 and "eth0 already exists" in err["msg"]
    assert_no_leftovers(lab)


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "dual-stack"])
def test_kill_9_during_add_leaves_nothing_del_does_not_clean(lab, ipv6):
    lab.write_subnet(ipv6=ipv6)  # dual-stack: also between the two reservations
    ns = lab.netns()
    data = json.dumps(lab.conf()).encode()
    for attempt in range(12):  # kill at different moments of the ADD
        proc = lab.spawn("ADD", netns=ns, cid=f"k{attempt}")
        proc.stdin.write(data)
        proc.stdin.close()
        time.sleep(0.004 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        rc, out, err = lab.run("DEL", netns=ns, cid=f"k{attempt}")
        assert rc == 0, (out, err)
        assert_no_leftovers(lab)
        sh("ip", "link", "del", "eth0", netns=ns.name, check=False)


def test_kill_9_during_add_leaves_nothing_gc_does_not_clean(lab):
    ns = lab.netns()
    data = json.dumps(lab.conf()).encode()
    for attempt in range(6):
        proc = lab.spawn("ADD", netns=ns, cid=f"k{attempt}", ifname=f"eth{attempt}")
        proc.stdin.write(data)
        proc.stdin.close()
        time.sleep(0.006 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    rc, out, err = lab.run("GC", lab.conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": []}))
    assert (rc, out) == (0, None), err
    assert_no_leftovers(lab)


@pytest.mark.parametrize("case, code, words", [
    ("netns-missing", 4, "does not exist"),
    ("netns-not-a-netns", 4, "not a network namespace"),
    ("ifname-too-long", 4, "CNI_IFNAME"),
    ("malformed-json", 6, "not valid JSON"),
    ("wrong-version", 1, "9.9.9"),
    ("no-subnet-file", 11, "subnet file"),
    ("exhausted", 100, "no IP addresses available"),
    ("bad-mtu", 7, "mtu"),
    ("no-container-id", 4, "CNI_CONTAINERID"),
    ("unknown-cni-args", 4, "FOO"),
    ("requested-ip-outside", 102, "198.19.9.9"),
])
def test_bad_input_gets_the_right_code_and_leaves_no_state(lab, case, code, words):
    ns = lab.netns()
    conf, kwargs, stdin = lab.conf(), {"netns": ns}, None
    if case == "netns-missing":
        kwargs["netns"] = "/run/netns/vnc-does-not-exist"
    elif case == "netns-not-a-netns":
        kwargs["netns"] = lab.subnet_file
    elif case == "ifname-too-long":
        kwargs["ifname"] = "a-very-long-ifname"
    elif case == "malformed-json":
        stdin = b'{"cniVersion": "1.0.0", "name": '
    elif case == "wrong-version":
        conf["cniVersion"] = "9.9.9"
    elif case == "no-subnet-file":
        conf["subnetFile"] = os.path.join(lab.tmp, "missing.env")
    elif case == "exhausted":
        conf["ipam"] = {"rangeStart": "198.19.3.10", "rangeEnd": "198.19.3.10"}
        rc, _, err = lab.run("ADD", conf, cid="first", netns=lab.netns())
        assert rc == 0, err
    elif case == "bad-mtu":
        conf["mtu"] = 10
    elif case == "no-container-id":
        kwargs["cid"] = ""
    elif case == "unknown-cni-args":
        kwargs["env"] = {"CNI_ARGS": "FOO=bar"}
    elif case == "requested-ip-outside":
        kwargs["env"] = {"CNI_ARGS": "IP=198.19.9.9"}
    before = lab.reserved()
    rc, err, stderr = lab.run("ADD", conf, stdin=stdin, **kwargs)
    assert rc == 1, err
    assert set(err) == {"cniVersion", "code", "msg", "details"}
    assert err["code"] == code and words in err["msg"], err
    assert "Traceback" not in stderr
    assert lab.reserved() == before
    assert "eth0" not in lab.links(ns)
    assert len([n for n in lab.links() if n.startswith("vxn")]) == len(before)


def test_requested_ip_and_mac_and_runtime_args(lab):
    ns = lab.netns()
    conf = lab.conf(runtimeConfig={"mac": "02:00:00:00:aa:01", "portMappings": [{"HostPort": 80}]})
    env = {"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web;IP=198.19.3.77;Other=x"}
    rc, result, err = lab.run("ADD", conf, netns=ns, env=env)
    assert rc == 0, err
    assert lab.addresses(ns, "eth0") == [("198.19.3.77", 24)]
    assert lab.links(ns)["eth0"]["address"] == "02:00:00:00:aa:01"
    ns2 = lab.netns()
    conf2 = lab.conf(args={"cni": {"ips": ["198.19.3.78"]}})
    rc, result, err = lab.run("ADD", conf2, cid="c2", netns=ns2)
    assert rc == 0, err
    assert result["ips"][0]["address"] == "198.19.3.78/24"
    rc, err, _ = lab.run("ADD", lab.conf(runtimeConfig={"ips": ["198.19.3.78/24"]}), cid="c3", netns=lab.netns())
    assert rc == 1 and err["code"] == 102


def test_allocation_wraps_around_the_range(lab):
    conf = lab.conf(ipam={"rangeStart": "198.19.3.10", "rangeEnd": "198.19.3.12"})
    got = []
    for i in range(3):
        rc, result, err = lab.run("ADD", conf, cid=f"w{i}", netns=lab.netns())
        assert rc == 0, err
        got.append(result["ips"][0]["address"])
    assert got == ["198.19.3.10/24", "198.19.3.11/24", "198.19.3.12/24"]
    assert lab.run("DEL", conf, cid="w0")[0] == 0
    rc, result, err = lab.run("ADD", conf, cid="w3", netns=lab.netns())
    assert result["ips"][0]["address"] == "198.19.3.10/24"


def test_check_passes_then_names_what_drifted(lab):
    ns, result = add(lab)
    conf = lab.conf(prevResult=result)
    rc, out, err = lab.run("CHECK", conf, netns=ns)
    assert (rc, out) == (0, None), err
    sh("ip", "link", "set", "eth0", "mtu", "1400", netns=ns.name)
    rc, err, _ = lab.run("CHECK", conf, netns=ns)
    assert rc == 1 and err["code"] == 104 and "MTU 1400" in err["msg"]
    sh("ip", "link", "set", "eth0", "mtu", "1450", netns=ns.name)
    sh("ip", "addr", "flush", "dev", "eth0", netns=ns.name)
    rc, err, _ = lab.run("CHECK", conf, netns=ns)
    assert rc == 1 and "lacks address 198.19.3.2/24" in err["msg"] and "route 0.0.0.0/0" in err["msg"]
    sh("ip", "link", "del", result["interfaces"][1]["name"], netns=lab.host.name)
    rc, err, _ = lab.run("CHECK", conf, netns=ns)
    assert rc == 1 and "eth0 is missing" in err["msg"] and "host end" in err["msg"]
    rc, err, _ = lab.run("CHECK", conf, netns=ns, cid="nobody")
    assert rc == 1 and err["code"] == 3


def test_gc_releases_everything_not_valid(lab):
    for cid in ("keep", "drop1", "drop2"):
        add(lab, cid=cid)
    conf = lab.conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]})
    rc, out, err = lab.run("GC", conf)
    assert (rc, out) == (0, None), err
    assert list(lab.reserved().values()) == ["keep\r\neth0"]
    assert len([n for n in lab.links() if n.startswith("vxn")]) == 1
    conf = lab.conf(cniVersion="1.1.0", **{"cni.dev/attachments": []})
    assert lab.run("GC", conf)[0] == 0
    assert_no_leftovers(lab)


def test_gc_removes_only_this_networks_stale_veths(lab):
    # Same bridge, same dataDir: another vxlan-net network, a veth with a name like ours, an unrelated veth.
    _, stale = add(lab, cid="stale")
    _, kept = add(lab, cid="keep")
    _, theirs = add(lab, cid="theirs", name="othernet")
    sh("ip", "link", "add", "vxn0123456789ab", "master", "cni0", "type", "veth", "peer", "name", "vnc-p1",
       netns=lab.host.name)
    sh("ip", "link", "add", "vnc-unrelated", "type", "veth", "peer", "name", "vnc-p2", netns=lab.host.name)
    before = set(lab.links())
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    rc, out, err = lab.run("GC", lab.conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": valid}))
    assert (rc, out) == (0, None), err
    stale_veth = stale["interfaces"][1]["name"]
    assert before - set(lab.links()) == {stale_veth}  # ip -j: the one veth gone is this network's stale one
    assert {kept["interfaces"][1]["name"], theirs["interfaces"][1]["name"], "vxn0123456789ab",
            "vnc-unrelated"} <= set(lab.links())
    assert list(lab.reserved().values()) == ["keep\r\neth0"]
    assert os.listdir(os.path.join(lab.data_dir, "othernet")) != []
    with open(os.path.join(lab.data_dir, "othernet", theirs["ips"][0]["address"].split("/")[0]), newline="") as fh:
        assert fh.read() == "theirs\r\neth0"


def test_gc_leaves_a_veth_of_a_stale_reservation_that_is_not_on_its_bridge(lab):
    _, result = add(lab, cid="moved")
    host_veth = result["interfaces"][1]["name"]
    sh("ip", "link", "add", "cni9", "type", "bridge", netns=lab.host.name)
    sh("ip", "link", "set", host_veth, "master", "cni9", netns=lab.host.name)  # now someone else's port
    rc, out, err = lab.run("GC", lab.conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": []}))
    assert (rc, out) == (0, None), err
    assert lab.links()[host_veth]["master"] == "cni9"
    assert lab.reserved() == {}


def test_status_reports_ready_only_with_a_subnet_file(lab):
    conf = lab.conf(cniVersion="1.1.0")
    assert lab.run("STATUS", conf)[:2] == (0, None)
    os.unlink(lab.subnet_file)
    rc, err, _ = lab.run("STATUS", conf)
    assert rc == 1 and err["code"] == 50 and "subnet file" in err["msg"]
    rc, err, _ = lab.run("STATUS", lab.conf())
    assert rc == 1 and err["code"] == 1  # STATUS needs 1.1.0


def test_version_ignores_dummy_env(lab):
    rc, out, _ = lab.run("VERSION", stdin=b'{"cniVersion":"1.0.0"}', cid="", ifname="",
                         env={"CNI_NETNS": "dummy", "CNI_ARGS": "garbage"})
    assert rc == 0 and out["cniVersion"] == "1.0.0" and "1.1.0" in out["supportedVersions"]


def test_the_console_script_works_too(lab):
    script = os.path.join(ROOT, ".venv", "bin", "vxlan-net-cni")
    assert os.access(script, os.X_OK), f"{script} missing: pip install -e . first"
    ns = lab.netns()
    rc, result, err = lab.run("ADD", netns=ns, plugin=script)
    assert rc == 0, err
    assert lab.run("DEL", netns=ns, plugin=script)[0] == 0
    assert_no_leftovers(lab)


def test_50_parallel_adds_get_distinct_addresses_and_50_dels_empty_the_store(lab):
    namespaces = [lab.netns() for _ in range(50)]
    conf = lab.conf()
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda i: lab.run("ADD", conf, cid=f"p{i}", netns=namespaces[i], timeout=120),
                                range(50)))
    failures = [(rc, out, err) for rc, out, err in results if rc != 0]
    assert failures == []
    addresses = {out["ips"][0]["address"] for _, out, _ in results}
    assert len(addresses) == 50
    assert len(lab.reserved()) == 50
    assert len([n for n, link in lab.links().items() if link.get("master") == "cni0"]) == 50
    for i in (0, 49):
        assert lab.addresses(namespaces[i], "eth0") == [(results[i][1]["ips"][0]["address"].split("/")[0], 24)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda i: lab.run("DEL", conf, cid=f"p{i}", netns=namespaces[i], timeout=120),
                                range(50)))
    assert [r for r in results if r[0] != 0] == []
    assert_no_leftovers(lab)


def test_results_for_older_and_newer_cni_versions(lab):
    ns, result = add(lab, cniVersion="0.4.0")
    assert result["cniVersion"] == "0.4.0" and result["ips"][0]["version"] == "4"
    ns, result = add(lab, cid="c2", cniVersion="1.1.0")
    assert result["interfaces"][2]["mtu"] == 1450 and "version" not in result["ips"][0]


def test_no_default_gateway_routes_the_cluster_network(lab):
    ns, result = add(lab, isDefaultGateway=False, mtu=1400)
    assert result["routes"] == [{"dst": "198.19.0.0/16", "gw": "198.19.3.1"}]
    assert ("198.19.0.0/16", "198.19.3.1", "eth0") in lab.routes(ns)
    assert lab.links(ns)["eth0"]["mtu"] == 1400


def test_check_names_lost_hairpin_mode_gateway_address_and_a_foreign_peer(lab):
    ns, result = add(lab)
    host_veth = result["interfaces"][1]["name"]
    prev = json.loads(json.dumps(result))
    prev["interfaces"][2]["mac"] = 5  # a runtime's odd prevResult MAC is not compared, and is no crash
    rc, out, err = lab.run("CHECK", lab.conf(prevResult=prev), netns=ns)
    assert (rc, out) == (0, None), err
    conf = lab.conf(prevResult=result)

    sh("ip", "link", "set", host_veth, "type", "bridge_slave", "hairpin", "off", netns=lab.host.name)
    assert lab.links()[host_veth]["linkinfo"]["info_slave_data"]["hairpin"] is False
    rc, err, _ = lab.run("CHECK", conf, netns=ns)
    assert rc == 1 and err["code"] == 104 and f"{host_veth} has hairpin mode off" in err["msg"]
    rc, out, err = lab.run("CHECK", lab.conf(prevResult=result, hairpinMode=False), netns=ns)
    assert (rc, out) == (0, None), err
    sh("ip", "link", "set", host_veth, "type", "bridge_slave", "hairpin", "on", netns=lab.host.name)

    sh("ip", "addr", "del", "198.19.3.1/24", "dev", "cni0", netns=lab.host.name)
    assert lab.addresses(lab.host, "cni0") == []
    rc, err, _ = lab.run("CHECK", conf, netns=ns)
    assert rc == 1 and err["code"] == 104 and "cni0 lacks the gateway address 198.19.3.1/24" in err["msg"]
    sh("ip", "addr", "add", "198.19.3.1/24", "dev", "cni0", netns=lab.host.name)
    rc, out, err = lab.run("CHECK", conf, netns=ns)
    assert (rc, out) == (0, None), err

    # Another veth takes the pod's interface name: our host end is no longer its peer.
    sh("ip", "link", "set", "eth0", "name", "eth7", netns=ns.name)
    sh("ip", "link", "add", "eth0", "mtu", "1450", "address", result["interfaces"][2]["mac"], "type", "veth",
       "peer", "name", "vnc-peer", netns=ns.name)
    sh("ip", "link", "set", "eth0", "up", netns=ns.name)
    sh("ip", "addr", "add", "198.19.3.2/24", "dev", "eth0", netns=ns.name)
    sh("ip", "route", "replace", "default", "via", "198.19.3.1", "dev", "eth0", netns=ns.name)
    rc, err, _ = lab.run("CHECK", conf, netns=ns)
    assert rc == 1 and err["code"] == 104 and err["msg"] == f"host end {host_veth} is not the peer of eth0"
