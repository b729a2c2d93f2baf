"""Our rules in iptables-nft's FORWARD chain: one transaction, our devices only, after other tools' rules,
restored when someone removes or edits them. Checked with `nft -j` in a throw-away namespace."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

pytestmark = pytest.mark.root

BRIDGE, VTEP = "cni0", "vxnet.1"
OTHER_TOOLS = """
add table ip filter
add chain ip filter FORWARD { type filter hook forward priority filter; policy drop; }
add rule ip filter FORWARD ct state invalid counter drop comment "docker: invalid"
add rule ip filter FORWARD iifname "docker0" counter accept comment "docker: from docker0"
insert rule ip filter FORWARD ip daddr 198.19.0.0/16 counter accept comment "vxlan-net pod network"
"""
# An `nft` first on PATH that logs every call (arguments and, for -f, what it was given) and runs the real one.
# The real one reads the input from a file: a pipe would hold only 64 KiB (5,000 peers are more).
LOGGING_NFT = """#!{python}
import json, os, sys, tempfile
argv = sys.argv[1:]
stdin = sys.stdin.read() if "-f" in argv else None
with open({log!r}, "a") as log:
    log.write(json.dumps({{"argv": argv, "stdin": stdin}}) + "\\n")
replay = tempfile.TemporaryFile()
replay.write((stdin or "").encode())
replay.seek(0)
os.dup2(replay.fileno(), 0)
os.execv({nft!r}, [{nft!r}, *argv])
"""
ENSURE = """
import json, sys
from vxlan_net.doors import firewall
print(json.dumps(firewall.ensure_forward_rules(firewall.ForwardDevices(sys.argv[1], sys.argv[2]))))
"""


class FirewallNode:
    """A lab node whose `nft` calls from vxlan_net.doors.firewall are logged."""

    def __init__(self, lab):
        self.node = lab.nodes[0]
        self.log = lab.workdir / "nft-calls.jsonl"
        bindir = lab.workdir / "bin"
        bindir.mkdir()
        wrapper = bindir / "nft"
        wrapper.write_text(LOGGING_NFT.format(python=sys.executable, log=str(self.log), nft=shutil.which("nft")))
        wrapper.chmod(0o755)
        self.path = f"{bindir}:{os.environ['PATH']}"

    def ensure(self) -> bool:
        out = self.node.run("env", f"PATH={self.path}", sys.executable, "-c", ENSURE, BRIDGE, VTEP, check=True)
        return json.loads(out.stdout)

    def calls(self) -> list[dict]:
        """The logged calls since the last time, and forget them."""
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return calls

    def forward_rules(self) -> list[dict]:
        out = self.node.run("nft", "-j", "list", "chain", "ip", "filter", "FORWARD", check=True).stdout
        return [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]

    def nft(self, script: str) -> None:
        self.node.run("nft", "-f", "-", input=script, check=True)


def _writes(calls: list[dict]) -> list[dict]:
    """Calls that can change the ruleset: anything but `nft [-j] list ...`."""
    return [c for c in calls if "list" not in c["argv"]]


def _devices(rule: dict) -> dict[str, str]:
    return {e["match"]["left"]["meta"]["key"]: e["match"]["right"] for e in rule["expr"]
            if "match" in e and "meta" in e["match"]["left"]}


def _ours(rules: list[dict]) -> list[dict]:
    return [r for r in rules if r.get("comment", "").startswith("vxlan-net")]


@pytest.fixture
def fw(lab):
    return FirewallNode(lab(nodes=1, etcd=False))


def test_rules_are_appended_in_one_transaction_and_match_only_our_devices(fw):
    fw.nft(OTHER_TOOLS)
    others = [(r["handle"], r["comment"]) for r in fw.forward_rules() if r["comment"].startswith("docker")]

    assert fw.ensure() is True
    writes = _writes(fw.calls())
    assert len(writes) == 1 and "-f" in writes[0]["argv"], f"not one transaction: {writes}"
    commands = json.loads(writes[0]["stdin"])["nftables"]
    assert [next(iter(c)) for c in commands] == ["delete"] + ["add"] * 4  # the old rule and the new ones, together

    rules = fw.forward_rules()
    assert [(r["handle"], r["comment"]) for r in rules[:2]] == others, "other tools' rules moved or changed"
    ours = rules[2:]
    assert [r["comment"] for r in ours] == ["vxlan-net: overlay to pods", "vxlan-net: pods to the overlay and out",
                                          "vxlan-net: replies to pods", "vxlan-net: port-mapped to pods"]
    assert [_devices(r) for r in ours] == [{"iifname": VTEP, "oifname": BRIDGE}, {"iifname": BRIDGE},
                                           {"oifname": BRIDGE}, {"oifname": BRIDGE}]
    assert not any("payload" in json.dumps(r["expr"]) for r in ours), "a rule matches on addresses"
    assert all(r["expr"][-1] == {"accept": None} for r in ours)


def test_an_intact_chain_costs_one_listing_and_no_write(fw):
    fw.nft(OTHER_TOOLS)
    fw.ensure()
    fw.calls()
    assert fw.ensure() is False
    calls = fw.calls()
    assert len(calls) == 1 and not _writes(calls), calls


def test_a_rule_deleted_or_edited_by_hand_is_restored_by_the_next_check(fw):
    fw.nft(OTHER_TOOLS)
    fw.ensure()
    handles = [r["handle"] for r in _ours(fw.forward_rules())]
    fw.nft(f"delete rule ip filter FORWARD handle {handles[0]}")
    fw.nft(f'replace rule ip filter FORWARD handle {handles[2]} oifname "{BRIDGE}" counter accept '
           f'comment "vxlan-net: replies to pods"')  # the conntrack match removed: accepts anything to pods
    fw.calls()

    assert fw.ensure() is True
    assert len(_writes(fw.calls())) == 1
    ours = _ours(fw.forward_rules())
    assert [_devices(r) for r in ours][:1] == [{"iifname": VTEP, "oifname": BRIDGE}]
    assert '"state"' in json.dumps(ours[2]["expr"]), "the edited rule was not restored"
    assert len(ours) == 4 and fw.forward_rules()[0]["comment"] == "docker: invalid"


def test_without_an_iptables_forward_chain_nothing_is_created(fw):
    assert fw.ensure() is False
    assert not _writes(fw.calls())
    assert fw.node.run("nft", "list", "tables", check=True).stdout.strip() == ""
