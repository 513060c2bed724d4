"""Shared fixtures: a fresh output directory per test, and a strict, schema-checked reader.

Also the `real_backend` marker. Put it on every test that checks the product against
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
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
import pytest
from cirron_otel.exporters.schema import loads_strict, spool_v1_schema

import cirron_otel as ci

jsonschema.Draft202012Validator.check_schema(spool_v1_schema())
# fastjsonschema compiles the schema to Python: fast enough to check every record of
# 100,000-record files; tests/test_schema.py also runs the reference validator.
_validate = fastjsonschema.compile(spool_v1_schema())


def read_spool(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every batch in `<output_dir>/spool`, oldest first, parsed strictly and schema-validated."""
    spool = Path(output_dir) / "spool"
    if not spool.exists():
        return []
    batches = []
    for path in sorted(spool.glob("*.json")):
        raw = path.read_bytes()
        doc = loads_strict(raw)
        _validate(doc)
        assert path.name == f"{doc['created_ns']:020d}-{doc['batch_id']}.json"
        batches.append(doc)
    assert not list(spool.glob("*.tmp")), "a .json.tmp file was left behind"
    return batches


def spans_and_marks(output_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spans: list[dict[str, Any]] = []
    marks: list[dict[str, Any]] = []
    for doc in read_spool(output_dir):
        spans.extend(doc["spans"])
        marks.extend(doc["marks"])
    return spans, marks


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "cirron"


@pytest.fixture(autouse=True)
def _no_profiler_leaks():
    ci.shutdown()
    yield
    ci.shutdown()


@pytest.fixture
def prof(out: Path) -> ci.Profiler:
    return ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False)


def run_script(code: str, *, timeout: float = 60, env: dict[str, str] | None = None,
               cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (for fork, signals, exit paths, import checks)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd,
    )


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
        report.longrepr = (f"{item.nodeid} is a {REAL_BACKEND} test and CI is set "
                           f"(CI={os.environ.get('CI')!r}): it must run, not skip. "
                           f"Skip reason: {_skip_reason(report)}")
    outcomes = item.config.stash[_real_outcomes]
    if report.failed:
        outcomes[item.nodeid] = "failed"
    elif report.skipped:
        outcomes.setdefault(item.nodeid, "skipped")
    elif report.when == "call":
        outcomes.setdefault(item.nodeid, "passed")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    counts = Counter(config.stash.get(_real_outcomes, {}).values())
    line = (f"real backends: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped")
    if running_in_ci():
        line += " (CI: a skipped real-backend test fails the run)"
    terminalreporter.write_sep("-", line)
