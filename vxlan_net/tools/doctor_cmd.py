"""`vxlan-net doctor`: check this node against etcd and the kernel, one OK/FAIL line per item."""

from __future__ import annotations

import argparse
from ipaddress import ip_address
from pathlib import Path


def register(subparsers, add_etcd_flags) -> None:
    from vxlan_net.tools.cli import env_default

    parser = subparsers.add_parser(
        "doctor", help="check this node: config, lease, VXLAN device, peer entries, bridge, subnet file, firewall",
        description="Run on a node (e.g. `ip netns exec NODE vxlan-net doctor`). Reads only; exit 0 when "
                    "everything holds, 1 when something does not.")
    add_etcd_flags(parser)
    parser.add_argument("--subnet-file", default=env_default("subnet-file", "/run/vxlan-net/subnet.env"))
    parser.add_argument("--state-dir", default=env_default("state-dir", "/var/lib/vxlan-net"))
    parser.add_argument("--bridge", default=env_default("bridge", "cni0"), help="the pods' bridge (default cni0)")
    parser.add_argument("--iface", default=env_default("iface"),
                        help="underlay interface (default: the one the VXLAN device sits on)")
    parser.add_argument("--probe", metavar="DEST_POD_IP",
                        help="send an echo request to this pod IP (IPv4 or IPv6) from the bridge address and confirm, "
                             "on the underlay, that it leaves for the right node with our VNI and unchanged addresses")
    parser.add_argument("--probe-timeout", type=float, default=3.0, help="seconds to wait for the probe's frames")
    parser.add_argument("--json", action="store_true", help="print the findings as one JSON document")
    parser.add_argument("--node", metavar="NETNS",
                        help="run inside this named network namespace (a lab node) instead of here")
    parser.set_defaults(handler=run)


def _rerun_inside(netns: str) -> None:
    """Replace this process with the same doctor command inside `netns` (never returns)."""
    import os
    import sys

    from vxlan_net.tools.usage import UsageError

    if "/" in netns or not os.path.exists(f"/run/netns/{netns}"):
        raise UsageError(f"--node {netns!r}: no such network namespace (see `ip netns list`)")
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--node":
            skip = True
        elif not arg.startswith("--node="):
            argv.append(arg)
    os.execvp("ip", ["ip", "netns", "exec", netns, sys.executable, "-m", "vxlan_net", *argv])


def run(args: argparse.Namespace) -> int:
    from vxlan_net.tools import doctor
    from vxlan_net.tools.cli import _endpoints, _store
    from vxlan_net.tools.usage import UsageError

    if args.node:
        _rerun_inside(args.node)
    dest = None
    if args.probe is not None:
        try:
            dest = ip_address(args.probe)
        except ValueError:
            raise UsageError(f"--probe {args.probe!r} is not an IP address") from None
    if not 0 < args.probe_timeout <= 60:
        raise UsageError(f"--probe-timeout {args.probe_timeout} must be in (0, 60]")
    options = doctor.DoctorOptions(
        etcd_prefix=args.etcd_prefix, etcd_endpoints=",".join(_endpoints(args)), subnet_file=Path(args.subnet_file),
        state_dir=Path(args.state_dir), bridge=args.bridge, iface=args.iface,
    )
    with _store(args) as store:  # bad endpoint URLs or TLS files are usage errors (exit 2) here
        facts = doctor.gather_facts(options, store)
    findings = doctor.run_checks(facts)
    if dest is not None:
        findings += _probe(doctor, facts, dest, args.probe_timeout)
    print(doctor.render_json(findings) if args.json else doctor.render(findings))
    return 0 if all(f.ok for f in findings) else 1


def _probe(doctor, facts, dest, timeout: float) -> list:
    plan = doctor.plan_probe(facts, dest)
    if isinstance(plan, doctor.Unavailable):
        return [doctor.Finding(False, f"probe -> {dest}", f"cannot probe: {plan.reason}",
                               "fix the failures above, or probe a pod IP on another node")]
    try:
        frames, replied = doctor.run_probe(plan, timeout)
    except (OSError, RuntimeError) as exc:  # no capture permission, scapy cannot open the interface
        return [doctor.Finding(False, f"probe -> {dest}", f"capture on {plan.underlay} failed: {exc}",
                               "run doctor as root inside the node's network namespace")]
    return doctor.check_probe(plan, frames, replied)
