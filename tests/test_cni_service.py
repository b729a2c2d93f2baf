"""The agent's CNI socket: DEL hands the host veth to it, it refuses what is not the plugin's, ADD after DEL works.

Root tests in throw-away namespaces (`vnc-...`): the service runs as
`python -m vxlan_net.agent.cni_service` inside the host namespace, the plugin is
exec'd there as a runtime would; what happened is read back with `ip -j`.
"""

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from cni_netns import AgentService, CniLab, require_root

from cni.agent_socket import MAX_MESSAGE, is_host_veth_name, socket_path
from cni.plugin import host_veth_name
from vxlan_net.agent.cni_service import Refused, check_device, parse_request

GONE_WITHIN = 1.0  # seconds a handed-off veth may take to disappear


# -- pure ----------------------------------------------------------------------------


def test_derived_host_veth_names_are_in_the_scheme_and_others_are_not():
    assert is_host_veth_name(host_veth_name("c1", "eth0"))
    assert is_host_veth_name(host_veth_name("x" * 200, "net1"))
    for name in ("veth1234", "vxn0123456789a", "vxn0123456789abc", "vxn0123456789AB", "vxn0123456789ag", "cni0",
                 "", None, "vxn01234567/9ab"):
        assert not is_host_veth_name(name), name


def test_requests_are_parsed_strictly():
    assert parse_request(b"delete host veth vxn0123456789ab netns 4026531840\n") == ("vxn0123456789ab", 4026531840)
    for bad in (b"delete host veth vxn0123456789ab\n", b"delete host veth vxn0123456789ab netns 12",
                b"delete host veth eth0 netns 12\n", b"delete host veth vxn0123456789ab netns -1\n",
                b"remove host veth vxn0123456789ab netns 12\n", b"delete host veth vxn0123456789ab netns 1\xff\n",
                b"delete host veth vxn0123456789ab netns 12\nextra\n", b""):
        with pytest.raises(Refused):
            parse_request(bad)


def test_only_veths_on_a_bridge_or_on_no_master_may_be_deleted():
    def link(kind, master=0, name="vxn0123456789ab"):
        return SimpleNamespace(name=name, kind=kind, master=master)

    check_device(link("veth"), None)
    check_device(link("veth", master=2), link("bridge", name="cni0"))
    for device, master, kind in ((link("bridge"), None, "not a veth"), (link(""), None, "not a veth"),
                                 (link("veth", master=2), link("bond", name="bond0"), "master is not a bridge"),
                                 (link("veth", master=2), None, "master is not a bridge")):
        with pytest.raises(Refused) as refused:
            check_device(device, master)
        assert refused.value.kind == kind


# -- root ----------------------------------------------------------------------------


@pytest.fixture
def lab():
    require_root()
    with CniLab() as lab:
        yield lab


@pytest.fixture
def service(lab):
    service = AgentService(lab, log_level="debug")
    try:
        yield service
    finally:
        service.stop()


def add(lab, cid, netns):
    rc, out, err = lab.run("ADD", cid=cid, netns=netns)
    assert rc == 0, (out, err)
    return out


def delete(lab, cid, netns):
    rc, out, err = lab.run("DEL", cid=cid, netns=netns)
    assert rc == 0, (out, err)


def raw_request(lab, path, payload: bytes) -> bytes:
    """Send `payload` to the socket from the lab's host namespace; the service's reply."""
    script = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1]); "
              "s.sendall(bytes.fromhex(sys.argv[2])); sys.stdout.buffer.write(s.recv(256))")
    proc = subprocess.run(["ip", "netns", "exec", lab.host.name, sys.executable, "-c", script, path, payload.hex()],
                          capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def netns_inode(lab) -> int:
    out = subprocess.run(["ip", "netns", "exec", lab.host.name, "stat", "-L", "-c", "%i", "/proc/self/ns/net"],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    return int(out)


def test_del_hands_the_host_veth_to_the_agent_and_releases_the_address_at_once(lab, service):
    pod = lab.netns()
    add(lab, "c1", pod)
    host_veth = host_veth_name("c1", "eth0")
    assert host_veth in lab.links(kind="veth")
    assert len(lab.reserved()) == 1

    delete(lab, "c1", pod)

    assert lab.reserved() == {}
    assert lab.wait_link_gone(host_veth, GONE_WITHIN), f"{host_veth} still present {GONE_WITHIN}s after DEL"
    assert "eth0" not in lab.links(pod)
    assert f"deleted host veth {host_veth}" in service.stop()


def test_the_agent_refuses_names_outside_the_scheme_and_devices_that_are_not_veths(lab, service):
    host = lab.host.name
    subprocess.run(["ip", "-n", host, "link", "add", "vethforeign0", "type", "veth", "peer", "name", "vethforeign1"],
                   check=True, timeout=10)
    impostor = "vxn0123456789ab"  # in the naming scheme, but a bridge
    subprocess.run(["ip", "-n", host, "link", "add", impostor, "type", "bridge"], check=True, timeout=10)
    inode = netns_inode(lab)

    for name, reason in (("vethforeign0", b"refused name outside the plugin's scheme\n"),
                         (impostor, b"refused not a veth\n"), (impostor, b"refused not a veth\n")):
        assert raw_request(lab, service.path, f"delete host veth {name} netns {inode}\n".encode()) == reason
    assert raw_request(lab, service.path, f"delete host veth {impostor} netns {inode + 1}\n".encode()) \
        == b"refused peer in another network namespace\n"
    assert raw_request(lab, service.path, b"x" * (MAX_MESSAGE + 10)).startswith(b"refused malformed request")

    time.sleep(0.2)  # anything wrongly queued would be deleted by now
    links = lab.links()
    assert "vethforeign0" in links and "vethforeign1" in links and impostor in links
    log = service.stop()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert sum("not a veth" in line for line in warnings) == 1, log  # once, then at debug level
    assert "name outside the plugin's scheme" in log


def test_del_without_an_agent_deletes_the_veth_in_process(lab):
    pod = lab.netns()
    add(lab, "c1", pod)
    host_veth = host_veth_name("c1", "eth0")
    delete(lab, "c1", pod)
    assert host_veth not in lab.links()  # gone when DEL returns: nobody else could have deleted it
    assert lab.reserved() == {}


def test_del_falls_back_when_the_socket_is_a_stale_file(lab):
    with open(socket_path(lab.subnet_file), "w"):
        pass
    pod = lab.netns()
    add(lab, "c1", pod)
    delete(lab, "c1", pod)
    assert host_veth_name("c1", "eth0") not in lab.links()


def test_add_right_after_del_of_the_same_container_keeps_the_new_veth(lab, service):
    pod = lab.netns()
    host_veth = host_veth_name("c1", "eth0")
    for _ in range(3):
        add(lab, "c1", pod)
        delete(lab, "c1", pod)
        result = add(lab, "c1", pod)
        index = lab.links()[host_veth]["ifindex"]
        time.sleep(0.3)  # a deletion queued by the DEL has run by now; it must have spared the new veth
        link = lab.links()[host_veth]
        assert link["ifindex"] == index and link.get("master") == "cni0"
        address = result["ips"][0]["address"].split("/")[0]
        assert (address, 24) in lab.addresses(pod, "eth0")
        delete(lab, "c1", pod)
        assert lab.wait_link_gone(host_veth, GONE_WITHIN)


def test_add_replaces_a_leftover_host_veth_of_the_same_name(lab):
    host_veth = host_veth_name("c1", "eth0")
    subprocess.run(["ip", "-n", lab.host.name, "link", "add", host_veth, "type", "veth", "peer", "name", "left0"],
                   check=True, timeout=10)
    old = lab.links()[host_veth]["ifindex"]
    pod = lab.netns()
    add(lab, "c1", pod)
    links = lab.links()
    assert links[host_veth]["ifindex"] != old and "left0" not in links


def test_add_refuses_a_non_veth_device_holding_the_derived_name(lab):
    host_veth = host_veth_name("c1", "eth0")
    subprocess.run(["ip", "-n", lab.host.name, "link", "add", host_veth, "type", "bridge"], check=True, timeout=10)
    rc, out, _ = lab.run("ADD", cid="c1", netns=lab.netns())
    assert rc != 0 and "not" in out["msg"] and host_veth in out["msg"], out
    assert host_veth in lab.links(kind="bridge")
    assert lab.reserved() == {}
