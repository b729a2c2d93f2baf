"""Our plugin first in a conflist, chained into Debian's reference portmap, tuning and bandwidth plugins."""

import json
import os

import pytest

from cni_client import ConflistRunner
from cni_netns import REFERENCE_DIR, ROOT, CniLab, require_root, sh

pytestmark = pytest.mark.root


@pytest.fixture
def lab():
    require_root()
    for plugin in ("portmap", "tuning", "bandwidth"):
        assert os.access(os.path.join(REFERENCE_DIR, plugin), os.X_OK), \
            f"{REFERENCE_DIR}/{plugin} missing: apt-get install containernetworking-plugins"
    with CniLab() as lab:
        yield lab


def example_conflist(lab):
    with open(os.path.join(ROOT, "examples", "vxlan-net.conflist")) as fh:
        conflist = json.load(fh)
    conflist["plugins"][0].update(subnetFile=lab.subnet_file, dataDir=lab.data_dir)
    return conflist


def test_conflist_chains_into_portmap_tuning_and_bandwidth(lab):
    runner = ConflistRunner(example_conflist(lab), f"{lab.bin_dir}:{REFERENCE_DIR}", preexec_fn=lab.in_host)
    ns = lab.netns()
    runtime = {
        "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 80_000, "egressRate": 8_000_000,
                      "egressBurst": 80_000},
        "mac": "02:00:00:00:bb:01",
        "ips": ["198.19.3.50/24"],
    }
    args = "IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=default"
    result = runner.add("chain1", ns.path, runtime_config=runtime, args=args)

    assert result["ips"][0]["address"] == "198.19.3.50/24"
    host_veth = result["interfaces"][1]["name"]
    assert lab.links(ns)["eth0"]["address"] == "02:00:00:00:bb:01"
    # portmap: a DNAT rule for the host port to the pod, in the host namespace's nat table
    nat = sh("iptables-save", "-t", "nat", netns=lab.host.name).stdout
    assert "--dport 18080" in nat and "198.19.3.50:80" in nat
    # tuning: the sysctl was set inside the pod's namespace only
    assert sh("sysctl", "-n", "net.ipv4.conf.all.log_martians", netns=ns.name).stdout.strip() == "1"
    # bandwidth: a tbf on the host end shapes traffic towards the pod
    qdiscs = json.loads(sh("tc", "-j", "qdisc", "show", "dev", host_veth, netns=lab.host.name).stdout)
    assert any(q["kind"] == "tbf" for q in qdiscs)
    assert any(name.startswith("bwp") for name in lab.links())  # the ifb for the pod's egress

    # Debian's portmap 1.1.1 fails CHECK on IPv4-only pods (it looks for ip6tables chains it never
    # made: containernetworking/plugins#819), so CHECK runs through the rest of the chain.
    runner.check(result, "chain1", ns.path, runtime_config=runtime, args=args, skip=("portmap",))

    runner.delete(result, "chain1", ns.path, runtime_config=runtime, args=args)
    assert "18080" not in sh("iptables-save", "-t", "nat", netns=lab.host.name).stdout
    assert host_veth not in lab.links()
    assert not any(name.startswith("bwp") for name in lab.links())
    assert lab.reserved() == {}
    runner.delete(result, "chain1", ns.path, runtime_config=runtime, args=args)  # DEL twice is fine
