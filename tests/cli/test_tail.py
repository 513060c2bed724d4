"""`cirron-otel tail`: follows a spool while a program writes it; every record once, in order."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import cli, load_records, run_python, write_train_spool

LIVE = """
import sys, time, cirron_otel as ci
ci.profile(output_dir=sys.argv[1], install_signal_handlers=False, flush_interval=30)
for step in ci.batches(range(12)):
    with ci.scope("forward", step=step):
        ci.mark("loss", 1.0 / (step + 1))
    ci.mark("note", "text")
    ci.flush()
    time.sleep(0.05)
ci.shutdown()
"""


def test_tail_follows_a_running_program(tmp_path: Path) -> None:
    out = tmp_path / "cirron"  # does not exist yet: tail waits for it
    tail = subprocess.Popen(
        [sys.executable, "-m", "cirron_otel", "tail", str(out), "--json", "--interval", "0.02"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)  # tail is up and looking before the first file lands
        run_python(LIVE, str(out))
        time.sleep(0.5)
    finally:
        tail.send_signal(signal.SIGINT)
        stdout, stderr = tail.communicate(timeout=10)
    assert tail.returncode == 0, stderr
    printed = [json.loads(line) for line in stdout.splitlines()]
    spans, marks = load_records(out)
    assert sorted(r["id"] for r in printed if r["type"] == "span") == sorted(s["id"] for s in spans)
    assert sorted(r["id"] for r in printed if r["type"] == "mark") == sorted(m["id"] for m in marks)
    losses = [r["value"] for r in printed if r["name"] == "loss"]
    assert losses == [1.0 / (i + 1) for i in range(12)]  # in the order they were recorded


def test_tail_starts_at_the_end_unless_from_start(tmp_path: Path) -> None:
    out = write_train_spool(tmp_path / "cirron")
    assert cli("tail", str(out), "--timeout", "0.3").stdout == ""
    text = cli("tail", str(out), "--from-start", "--timeout", "0.3", "--name", "loss").stdout
    _, marks = load_records(out)
    lines = text.splitlines()
    assert len(lines) == sum(1 for m in marks if m["name"] == "loss")
    assert all("  mark  loss=" in line for line in lines)
    everything = cli("tail", str(out), "--from-start", "--timeout", "0.3").stdout
    assert "span  validate" in everything and "ERROR boom" in everything
    assert "grad_norm=nan" in everything and "(summary)" in everything
