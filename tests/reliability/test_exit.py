"""The way out of a profiled program: exit handlers that mark, daemon threads still marking,
and a disk too slow to take everything: the exit takes at most `shutdown_timeout` and what
was recorded up to the shutdown is written."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.helpers import spans_and_marks

pytestmark = pytest.mark.timeout(180)


def run_timed(
    code: str, tmp_path: Path, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a script that prints `END <time.monotonic()>` last; also return how long the
    process took to exit after that line (CLOCK_MONOTONIC is system-wide on Linux)."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(code))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout)
    exited = time.monotonic()
    ends = [line.split() for line in r.stdout.splitlines() if line.startswith("END ")]
    assert ends, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return r, exited - float(ends[-1][-1])


def test_marks_from_exit_handlers_registered_before_profile_are_written(out, tmp_path):
    r, _ = run_timed(
        f"""
        import atexit, time
        import cirron_otel as ci

        def on_exit():  # registered before profile(): runs at exit, after the program's code
            with ci.scope("on-exit"):
                ci.mark("exit-mark", 1)
            ci.mark("exit-session-mark", 2)

        atexit.register(on_exit)
        ci.profile(output_dir={str(out)!r}, flush_interval=60)
        ci.mark("main", 0)
        print("END", time.monotonic())
        """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    spans, marks = spans_and_marks(out)
    by_name = {m["name"]: m for m in marks}
    assert set(by_name) == {"main", "exit-mark", "exit-session-mark"}
    session = next(s for s in spans if s["name"] == "cirron.session")
    on_exit = next(s for s in spans if s["name"] == "on-exit")
    # recorded inside the live session, before it closed
    assert on_exit["parent_id"] == session["id"]
    assert by_name["exit-mark"]["span_id"] == on_exit["id"]
    assert by_name["exit-session-mark"]["span_id"] == session["id"]
    assert on_exit["end_ns"] <= session["end_ns"]


def test_daemon_threads_marking_flat_out_at_exit(out, tmp_path):
    # Two daemon threads mark 0, 1, 2, ... (each its own name) as fast as they can while the
    # program ends. Everything they recorded before the main thread finished must be
    # written, with no gap, and the exit takes at most the shutdown timeout (10 s).
    r, exit_seconds = run_timed(
        f"""
        import threading, time
        import cirron_otel as ci

        ci.profile(output_dir={str(out)!r}, flush_interval=0.05)
        last = {{}}

        def produce(name):
            i = 0
            while True:
                ci.mark(name, i)
                last[name] = i
                i += 1

        for name in ("a", "b"):
            threading.Thread(target=produce, args=(name,), daemon=True).start()
        time.sleep(0.05)
        print("LAST", last["a"], last["b"])
        print("END", time.monotonic(), flush=True)
        """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert exit_seconds < 10 + 5, f"exit took {exit_seconds:.1f} s"
    last = dict(zip("ab", map(int, r.stdout.split("LAST ")[1].split()[:2]), strict=True))
    spans, marks = spans_and_marks(out)
    for name in "ab":
        values = sorted(m["value"] for m in marks if m["name"] == name)
        assert values == list(range(len(values))), f"thread {name}: recorded marks were lost"
        assert len(values) > last[name], f"thread {name}: marks recorded before the exit are missing"
    assert [s["name"] for s in spans] == ["cirron.session"]


def test_exit_with_a_slow_disk_takes_at_most_the_shutdown_timeout(out, tmp_path):
    # Each spool write takes 2 s (a disk that has nearly stopped) and a daemon thread keeps
    # marking: the whole exit (drain, session, stop, sinks) shares one 3 s budget.
    r, exit_seconds = run_timed(
        f"""
        import threading, time
        from cirron_otel.exporters.spool import SpoolSink
        import cirron_otel as ci

        _export = SpoolSink.export
        def slow_export(self, batches):
            time.sleep(2.0)
            return _export(self, batches)
        SpoolSink.export = slow_export

        ci.profile(output_dir={str(out)!r}, flush_interval=0.05, shutdown_timeout=3.0)

        def produce():
            i = 0
            while True:
                ci.mark("d", i)
                i += 1

        threading.Thread(target=produce, daemon=True).start()
        time.sleep(0.5)
        print("END", time.monotonic(), flush=True)
        """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert exit_seconds < 3.0 + 2.0, f"exit took {exit_seconds:.1f} s with shutdown_timeout=3"
