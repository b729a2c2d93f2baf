"""etcd RBAC: agents work as a user whose role may only touch `/vxlan-net/`; a user without it is named and retried."""

from __future__ import annotations

import re
import time

import pytest

from integration.cluster import add_pod, node_subnet, overlay_routes, wait_converged

pytestmark = pytest.mark.lab

FAST = ("--resync-interval", "2")
ROOT = ("root", "root-pw")
NODE = ("vxlan-node", "node-pw")
NOBODY = ("nobody", "nobody-pw")
ROLE = "vxlan-net-node"


def as_user(user: tuple[str, str]) -> dict[str, str]:
    """The agent's credentials from the environment, where other users' `ps` cannot see them."""
    return {"VXLAN_NET_ETCD_USERNAME": user[0], "VXLAN_NET_ETCD_PASSWORD": user[1]}


def enable_rbac(lab) -> None:
    """The lock-down docs/operations.md describes: root, a node role on the prefix only, auth on."""
    for name, password in (ROOT, NODE, NOBODY):
        lab.etcdctl("user", "add", name, f"--new-user-password={password}")
    lab.etcdctl("role", "add", ROLE)
    lab.etcdctl("role", "grant-permission", ROLE, "--prefix=true", "readwrite", "/vxlan-net/")
    lab.etcdctl("user", "grant-role", NODE[0], ROLE)
    lab.etcdctl("auth", "enable")


def test_agents_work_as_a_user_limited_to_the_prefix_and_a_user_without_it_is_refused(lab):
    lab = lab(nodes=3)
    enable_rbac(lab)
    root = f"--user={ROOT[0]}:{ROOT[1]}"
    node_user = f"--user={NODE[0]}:{NODE[1]}"
    a, b, late = lab.nodes
    # the operator writes the config as root; without credentials etcd refuses
    anonymous = lab.etcdctl("put", "/vxlan-net/config", "{}", check=False)
    assert anonymous.returncode != 0
    done = a.run("env", *(f"{k}={v}" for k, v in as_user(ROOT).items()), lab.agent_exe, "config", "set",
                 "--etcd-endpoints", lab.etcd_url, "--network", "198.19.0.0/16")
    assert done.returncode == 0, done.stderr

    for node in (a, b):
        lab.start_agent(node, *FAST, env=as_user(NODE))
    lab.wait_for(lambda: node_subnet(a) and node_subnet(b), timeout=20, message="agents did not get subnets")
    wait_converged(lab, [a, b])
    pod_a, pod_b = add_pod(lab, a, 1), add_pod(lab, b, 1)
    assert pod_a.ping(pod_b.ip, count=1, timeout=3)
    # the records were written by the node user, under the prefix
    assert f"/vxlan-net/subnets/{node_subnet(a).network_address}" in lab.etcdctl(
        root, "get", "--prefix", "--keys-only", "/vxlan-net/subnets/").stdout

    # the node user may not write outside the prefix (nor read it)
    outside = lab.etcdctl(node_user, "put", "/elsewhere/key", "x", check=False)
    assert outside.returncode != 0 and "permission denied" in outside.stderr, outside.stderr
    assert lab.etcdctl(node_user, "get", "/elsewhere/key", check=False).returncode != 0
    assert lab.etcdctl(node_user, "put", "/vxlan-net/probe", "x", check=False).returncode == 0
    # `status` as the node user: every lease's expiry, asked many at a time, goes with its auth token
    shown = a.run("env", *(f"{k}={v}" for k, v in as_user(NODE).items()), lab.agent_exe, "status",
                  "--etcd-endpoints", lab.etcd_url)
    assert shown.returncode == 0, shown.stderr
    for node in (a, b):
        rows = [line for line in shown.stdout.splitlines() if re.match(rf"{re.escape(str(node_subnet(node)))}\*? ", line)]
        assert len(rows) == 1 and re.search(r" \d+h\d\dm\d\ds ", rows[0]), shown.stdout

    # a user without the role: a clear one-line message, the agent keeps retrying
    started = time.monotonic()
    lab.start_agent(late, *FAST, env=as_user(NOBODY))
    expected = f"permission denied: etcd user {NOBODY[0]!r} may not do this"
    lab.wait_for(lambda: expected in late.agent.log_text(), timeout=10, message=f"no {expected!r} logged")
    time.sleep(max(0.0, 5.0 - (time.monotonic() - started)))
    log = late.agent.log_text()
    assert late.agent.alive(), log[-1500:]
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if expected in line]
    assert 1 <= len(lines) <= 2 and " WARNING " in lines[0], lines
    assert node_subnet(late) is None
    # granting the role is enough: the running agent's next retry gets in
    lab.etcdctl(root, "user", "grant-role", NOBODY[0], ROLE)
    lab.wait_for(lambda: node_subnet(late), timeout=20, message="agent did not join after the grant")
    wait_converged(lab, lab.nodes)

    # etcd forgets its auth tokens on restart: the agents log in again and keep following
    lab.etcd.restart()
    lab.etcdctl(root, "del", "/vxlan-net/probe")
    late.agent.stop()
    lab.etcdctl(root, "del", f"/vxlan-net/subnets/{node_subnet(late).network_address}-{node_subnet(late).prefixlen}")
    lab.wait_for(lambda: str(node_subnet(late)) not in overlay_routes(a) and
                 str(node_subnet(late)) not in overlay_routes(b), timeout=20,
                 message="agents did not follow after etcd restarted (stale token?)")
    assert pod_a.ping(pod_b.ip, count=1, timeout=3)
    for node in (a, b):
        assert "Traceback" not in node.agent.log_text()
