"""A 3-member etcd cluster in the lab (an etcd factory for `Lab(etcd=...)`) and a store probe.

Members: the lab's etcd host (198.18.0.2) and two extra hosts on segments of their own
(198.18.201.2, 198.18.202.2), all behind the router. `python -m integration.etcd_cluster probe`
asks etcd through vxlan-net's own store (same endpoints, same failover) and reports its outages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Optional

from integration.etcd_server import ETCDCTL_EXE, EtcdServer
from integration.lab import Host, Lab

MEMBER_SEGMENTS = (201, 202)


class ClusterMember(EtcdServer):
    """One member: the single-member command with the whole cluster and calmer timings."""

    def __init__(self, initial_cluster: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.initial_cluster = initial_cluster

    def command(self) -> list[str]:
        argv = super().command()
        # three members on a shared 2-core machine: a 50 ms heartbeat would call spurious elections
        for flag, value in (("--initial-cluster", self.initial_cluster), ("--heartbeat-interval", "100"),
                            ("--election-timeout", "1000")):
            argv[argv.index(flag) + 1] = value
        return argv


class EtcdCluster:
    """Three etcd members in three lab namespaces; `client_url` lists all three (comma-separated),
    which is what `Lab` hands the agents and etcdctl."""

    def __init__(self, lab: Lab, hosts: list[Host]):
        self.lab = lab
        self.hosts = hosts
        cluster = ",".join(f"m{i}=http://{h.public_ip}:2380" for i, h in enumerate(hosts))
        self.members = [
            ClusterMember(cluster, host=h.public_ip, netns=h.name, name=f"m{i}", ready_timeout=30.0,
                          data_dir=lab.workdir / f"etcd-m{i}" / "data", log_path=lab.workdir / f"etcd-m{i}.log")
            for i, h in enumerate(hosts)
        ]

    @property
    def client_url(self) -> str:
        return ",".join(m.client_url for m in self.members)

    def start(self) -> "EtcdCluster":
        """Start every member at once (none is healthy before a quorum is up)."""
        errors: list[BaseException] = []

        def start(member: ClusterMember) -> None:
            try:
                member.start()
            except BaseException as exc:  # reported below, after every thread ended
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(m,)) for m in self.members]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        if errors:
            self.stop()
            raise errors[0]
        return self

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def etcdctl(self, *args: str, endpoints: Optional[str] = None, timeout: float = 10.0) -> str:
        cmd = ["env", "ETCDCTL_API=3", ETCDCTL_EXE, "--endpoints", endpoints or self.client_url,
               "--dial-timeout", "2s", "--command-timeout", f"{int(timeout)}s", *args]
        return self.lab.etcd_host.run(*cmd, timeout=timeout + 5, check=True).stdout

    def statuses(self) -> list[dict]:
        """`etcdctl endpoint status -w json` of the members still running."""
        urls = ",".join(m.client_url for m in self.members if m.running())
        return json.loads(self.etcdctl("endpoint", "status", "-w", "json", endpoints=urls))

    def leader(self) -> ClusterMember:
        """The member whose own id is the leader id it reports."""
        for status in self.statuses():
            if status["Status"]["header"]["member_id"] == status["Status"]["leader"]:
                return next(m for m in self.members if m.client_url == status["Endpoint"])
        raise RuntimeError("no member is the leader")

    def member_id(self, member: ClusterMember) -> int:
        status = next(s for s in self.statuses() if s["Endpoint"] == member.client_url)
        return status["Status"]["header"]["member_id"]

    def move_leader(self, member: ClusterMember) -> None:
        """Make `member` the leader (asked of the current leader, as etcd requires)."""
        leader = self.leader()
        if leader is not member:
            self.etcdctl("move-leader", f"{self.member_id(member):x}", endpoints=leader.client_url)


def etcd_cluster(lab: Lab) -> EtcdCluster:
    """The etcd factory: `Lab(etcd=etcd_cluster)`."""
    hosts = [lab.etcd_host, *(lab.add_host(f"e{i}", segment) for i, segment in enumerate(MEMBER_SEGMENTS, 2))]
    return EtcdCluster(lab, hosts).start()


# -- the probe ---------------------------------------------------------------------------------


def probe_command(endpoints: str, duration: float, interval: float = 0.05) -> list[str]:
    return [sys.executable, "-m", "integration.etcd_cluster", "probe", "--endpoints", endpoints,
            "--duration", str(duration), "--interval", str(interval)]


def probe_env() -> dict[str, str]:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, PYTHONPATH=repo)


def _probe(endpoints: list[str], duration: float, interval: float) -> dict:
    """Read the config every `interval` s for `duration` s: the longest time between two answers
    (a read that blocks through an election counts as much as one that fails)."""
    from vxlan_net.core.errors import StoreConfigError, StoreUnavailable
    from vxlan_net.doors.store import EtcdStore

    store = EtcdStore(endpoints)
    end = time.monotonic() + duration
    last_ok: Optional[float] = None
    failures, longest, answered = 0, 0.0, 0
    for _ in range(int(duration / interval) + 1000):  # bounded; each try takes at least `interval`
        now = time.monotonic()
        if now >= end:
            break
        try:
            store.get_config()
            now = time.monotonic()
            if last_ok is not None:
                longest = max(longest, now - last_ok)
            last_ok, failures, answered = now, 0, answered + 1
        except (StoreUnavailable, StoreConfigError):
            failures += 1
        time.sleep(interval)
    store.close()
    return {"longest_unreachable_s": round(longest, 3), "answered": answered,
            "unanswered_at_end": failures}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    probe = commands.add_parser("probe", help="report the longest time etcd could not be read")
    probe.add_argument("--endpoints", required=True)
    probe.add_argument("--duration", type=float, required=True)
    probe.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args(argv)
    print(json.dumps(_probe(args.endpoints.split(","), min(args.duration, 600.0), args.interval)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
