"""The suite's root: loads the support plugins, and owns the `real_backend` marker.

Layout: `unit/` (one piece in-process), `integration/` (the pieces together: subprocesses,
in-process OTLP receivers, the OpenTelemetry SDK), `backends/` (real Jaeger, collector,
Phoenix, docker-compose), `reliability/` (each way to lose data or stall, provoked for real).
Fixtures come from the plugins in `support/` (`pytest_plugins` below: `out`, `prof`, the
OTLP receivers, ...); helpers are imported from there (`from tests.support.helpers import
read_spool`).

The `real_backend` marker: put it on every test that checks the product against
something the machine has to provide, and that skips (saying why) where it is missing: real
Jaeger or collector binaries, Arize Phoenix, docker-compose, an installed entry point, root
for a disk-full tmpfs, ...

    @pytest.mark.real_backend
    def test_disk_full(...): ...

or `pytestmark = pytest.mark.real_backend` for a whole module. With `CI` set to a true value
in the environment (`CI=true`, as CI services and .ci/run set it), such a test that skips
FAILS instead, with the skip's reason in the message: CI must not go green without having
checked it. Every run ends with a line counting them ("real backends: N passed, ...").
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

pytest_plugins = ["tests.support.fixtures", "tests.support.otlp"]


# -- real-backend tests: skipped is a failure under CI -----------------------------------------

REAL_BACKEND = "real_backend"
_real_outcomes = pytest.StashKey[dict[str, str]]()


def running_in_ci() -> bool:
    """`CI` set to anything but empty, 0, false, no or off."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{REAL_BACKEND}: runs against a real backend or something else the machine must provide "
        "(Jaeger, the collector, Phoenix, docker-compose, an entry point, root); under CI=true a "
        "skip of such a test fails the run",
    )
    config.stash[_real_outcomes] = {}


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    if item.get_closest_marker(REAL_BACKEND) is None:
        return
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and running_in_ci():
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} is a {REAL_BACKEND} test and CI is set "
            f"(CI={os.environ.get('CI')!r}): it must run, not skip. "
            f"Skip reason: {_skip_reason(report)}"
        )
    outcomes = item.config.stash[_real_outcomes]
    if report.failed:
        outcomes[item.nodeid] = "failed"
    elif report.skipped:
        outcomes.setdefault(item.nodeid, "skipped")
    elif report.when == "call":
        outcomes.setdefault(item.nodeid, "passed")


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    counts = Counter(config.stash.get(_real_outcomes, {}).values())
    line = f"real backends: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if running_in_ci():
        line += " (CI: a skipped real-backend test fails the run)"
    terminalreporter.write_sep("-", line)
