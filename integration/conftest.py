"""Fixtures for the integration tests: throw-away labs. Without root they fail; they never skip."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).resolve().parent
if str(INTEGRATION_DIR.parent) not in sys.path:  # plain `pytest` does not add the repo root
    sys.path.insert(0, str(INTEGRATION_DIR.parent))

from integration.lab import Lab  # noqa: E402

REQUIRED_TOOLS = ("ip", "bridge", "sysctl", "ping", "tcpdump", "etcd", "etcdctl")
_REPORTS = pytest.StashKey[dict]()


def _is_integration(item: pytest.Item) -> bool:
    return (item.get_closest_marker("lab") is not None
            or item.get_closest_marker("root") is not None
            or INTEGRATION_DIR in Path(str(item.path)).resolve().parents)


def prerequisite_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("they need root (network namespaces, veths, sysctls); "
                        "run them as root, e.g. `sudo make test`")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        problems.append(f"missing tools {missing}; `make setup` installs them")
    return problems


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _is_integration(item):
        problems = prerequisite_problems()
        if problems:
            pytest.fail("integration test cannot run: " + "; ".join(problems), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    # A skipped integration test proves nothing; it must not look like a pass.
    if report.skipped and _is_integration(item) and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"integration tests must not skip (a skip is not a pass): {reason}"


@pytest.fixture
def lab(request: pytest.FixtureRequest):
    """Factory: ``lab(nodes=2, pods_per_node=1, etcd=True, ...)`` returns an entered ``Lab``;
    every lab made in the test is torn down afterwards (agent logs printed if the test failed)."""
    labs: list[Lab] = []
    with contextlib.ExitStack() as stack:

        def make(*args, **kwargs) -> Lab:
            new = stack.enter_context(Lab(*args, **kwargs))
            labs.append(new)
            return new

        yield make
        call = request.node.stash.get(_REPORTS, {}).get("call")
        if call is not None and call.failed:
            _print_agent_logs(labs)
    # ExitStack re-raises a LabError from cleanup here, so a leak makes the test error out.


def _print_agent_logs(labs: list[Lab], tail: int = 40) -> None:
    for one in labs:
        for agent in one.agents:
            lines = agent.log_text().splitlines()[-tail:]
            print(f"--- agent on {agent.node.name} (pid {agent.pid}, rc {agent.returncode}) ---")
            print("\n".join(lines))

