"""The demo's ping matrices (integration/demo.py) count every failed pair, per family; pure logic with
stand-in pods (the demo itself runs in integration/test_demo.py against a real lab)."""

from __future__ import annotations

from integration.demo import FAIL, OK, connectivity_matrix
from integration.lab import PingResult


class StandInPod:
    """Answers ping for the addresses in `reachable` only (what a broken route would look like)."""

    def __init__(self, name: str, ip: str | None, ip6: str | None, reachable: set[str]):
        self.pod_name, self.ip, self.ip6, self.reachable = name, ip, ip6, reachable

    def ping(self, address: str, count: int = 1, timeout: float = 2.0) -> PingResult:
        ok = address in self.reachable
        return PingResult(ok, 0.05 if ok else None, 64 if ok else None, "")


def test_a_pod_without_an_ipv6_address_and_an_unreachable_pair_are_failures_not_skipped():
    everything = {"198.19.1.2", "198.19.2.2", "198.19.3.2", "fd19:0:0:1::2", "fd19:0:0:2::2"}
    a = StandInPod("a", "198.19.1.2", "fd19:0:0:1::2", everything - {"fd19:0:0:2::2"})  # a -6-> b broken
    b = StandInPod("b", "198.19.2.2", "fd19:0:0:2::2", everything)
    c = StandInPod("c", "198.19.3.2", None, everything)  # no IPv6 address at all
    table6, failed6 = connectivity_matrix([a, b, c], 6)
    assert failed6 == 3  # a -> b, a -> c, b -> c (nobody can ping -6 a pod without an IPv6 address)
    assert table6.splitlines()[1].split()[1:] == ["-", FAIL, FAIL]
    table4, failed4 = connectivity_matrix([a, b, c], 4)
    assert failed4 == 0 and table4.count(OK) == 6


def test_every_pair_answering_is_a_full_matrix():
    addresses = {"198.19.1.2", "198.19.2.2", "fd19:0:0:1::2", "fd19:0:0:2::2"}
    pods = [StandInPod("a", "198.19.1.2", "fd19:0:0:1::2", addresses),
            StandInPod("b", "198.19.2.2", "fd19:0:0:2::2", addresses)]
    for family in (4, 6):
        table, failed = connectivity_matrix(pods, family)
        assert failed == 0 and table.count(OK) == 2 and FAIL not in table
