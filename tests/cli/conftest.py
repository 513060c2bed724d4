"""Spools for the command-line tests, written by the library itself in fresh processes.

Helpers are local; the OTLP receivers (`grpc_receiver`, `http_receiver`, `receiver`) are the
suite's fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cirron_otel.cli import main

# A training-like run: epochs, batches, an error scope, non-finite values, root marks, a
# summary mark, a forked child with its own session, threads.
TRAIN = """
import os, sys, threading
import cirron_otel as ci
ci.mark("before_profile", 1)
ci.profile(output_dir=sys.argv[1], install_signal_handlers=False, capture_cpu_time=True,
           flush_interval=0.05, session_attrs={"host.name": "node-a"})
ci.mark("lr", 0.1)
for epoch in ci.epochs(range(2)):
    for b in ci.batches(range(3)):
        with ci.scope("forward", variant="fp16"):
            ci.mark("loss", 1.0 / (b + 1 + epoch), step=b)
        ci.mark("grad_norm", float("nan") if b == 1 else 2.0)
        ci.mark("inf", float("-inf"))
    ci.mark("accuracy", 0.5 + epoch / 10, kind="summary")
try:
    with ci.scope("validate"):
        raise ValueError("boom")
except ValueError:
    pass
def worker():
    with ci.scope("io", kind="read"):
        ci.mark("bytes", 4096)
t = threading.Thread(target=worker, name="loader"); t.start(); t.join()
pid = os.fork()
if pid == 0:
    with ci.scope("child_step"):
        ci.mark("child_value", "text")
    ci.shutdown()
    os._exit(0)
os.waitpid(pid, 0)
ci.shutdown()
"""


def run_python(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def write_train_spool(out: Path, ranks: tuple[int, ...] = (0,)) -> Path:
    """`out` as an output directory holding one training run per rank."""
    for rank in ranks:
        run_python(TRAIN, str(out), env={"RANK": str(rank)})
    return out


@pytest.fixture(scope="session")
def train_spool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ranks of the training run (each with a forked child): read-only for tests."""
    return write_train_spool(tmp_path_factory.mktemp("train") / "cirron", ranks=(0, 1))


def load_records(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every span and mark of a spool, read plainly (for comparing with a command's output)."""
    spans: list[dict[str, Any]] = []
    marks: list[dict[str, Any]] = []
    for path in sorted((out / "spool").glob("*.json")):
        doc = json.loads(path.read_bytes())
        spans += doc["spans"]
        marks += doc["marks"]
    return spans, marks


def cli(*args: str) -> Result:
    """Run the command line in-process; stdout and stderr kept apart."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def _no_otel_env(clean_env: None) -> None:
    """replay and export read OTEL_*: none of the calling environment leaks in (`clean_env` and
    the OTLP receiver fixtures come from the suite's support plugins)."""
