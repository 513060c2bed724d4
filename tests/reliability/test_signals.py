"""SIGTERM/SIGINT while profiling: the flush happens before the application's handler runs,
a signal the application ignored stays ignored, and further signals during our own flush or
shutdown do not cut it short. Real processes, real signals."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.helpers import run_script, spans_and_marks

pytestmark = pytest.mark.timeout(180)

# Test scaffolding pasted into child scripts: a slow (or hung) disk under the spool sink, and
# a line on stdout when the profiler's shutdown begins, so the test can time its signals.
SLOW_SPOOL = """
import os, time
from cirron_otel.exporters.spool import SpoolSink
from cirron_otel import _profiler
_export = SpoolSink.export
def _slow_export(self, batches):
    time.sleep(SLOW_SECONDS)
    return _export(self, batches)
SpoolSink.export = _slow_export
_shutdown = _profiler.Profiler.shutdown
def _announced_shutdown(self, *args, **kwargs):
    os.write(1, b"SHUTDOWN-START\\n")
    return _shutdown(self, *args, **kwargs)
_profiler.Profiler.shutdown = _announced_shutdown
"""


def start(code: str, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_line(proc: subprocess.Popen[str], expected: str, timeout: float = 60) -> str:
    """The next stdout line starting with `expected`; fails after `timeout` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            proc.kill()
            pytest.fail(f"no {expected!r} line within {timeout} s; stderr: {proc.communicate()[1][-2000:]}")
        line = proc.stdout.readline()
        if not line:
            rc = proc.wait()
            pytest.fail(f"exited ({rc}) before printing {expected!r}: {proc.communicate()[1][-2000:]}")
        if line.startswith(expected):
            return line


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"did not exit within {timeout} s: {err[-2000:]}")
    return proc.returncode, err


def flat_out_producer(out: Path, slow_seconds: float) -> str:
    # The main thread marks 0, 1, 2, ... as fast as it can; the signal interrupts it, so the
    # marks recorded before the first signal are exactly 0..max.
    return f"""
        SLOW_SECONDS = {slow_seconds}
        {textwrap.indent(SLOW_SPOOL, "        ").lstrip()}
        import cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, flush_interval=0.05)
        i = 0
        while True:
            ci.mark("m", i)
            i += 1
            if i == 200_000:
                os.write(1, b"READY\\n")
        """


def test_second_sigterm_during_the_shutdown_does_not_cut_it_short(out, tmp_path):
    proc = start(flat_out_producer(out, slow_seconds=0.1), tmp_path)
    wait_line(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    wait_line(proc, "SHUTDOWN-START")  # the shutdown is under way (slow disk): now the second
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == -signal.SIGTERM, err  # died by the signal, as it would have without us
    spans, marks = spans_and_marks(out)  # also: no .json.tmp left behind
    values = sorted(m["value"] for m in marks)
    assert len(values) >= 200_000
    assert values == list(range(len(values))), "marks recorded before the signal were lost"
    assert [s["name"] for s in spans] == ["cirron.session"]
    assert spans[0]["end_ns"] is not None


def test_third_signal_ends_the_process_at_once(out, tmp_path):
    # A hung disk: the signal's flush would wait its whole timeout (5 s); the third signal
    # is the way out.
    proc = start(flat_out_producer(out, slow_seconds=60), tmp_path)
    wait_line(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    wait_line(proc, "SHUTDOWN-START")
    proc.send_signal(signal.SIGINT)  # held too, whichever signal it is
    time.sleep(0.5)
    assert proc.poll() is None, "the second signal ended the shutdown"
    third = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == -signal.SIGTERM, err
    assert time.monotonic() - third < 2.5, "the third signal did not end the process at once"


def test_sigterm_during_the_exit_hook_is_held_until_the_data_is_written(out, tmp_path):
    # What kills the workers of a multiprocessing Pool left through `with`: SIGTERM arrives
    # while the process is already shutting down on its way out.
    proc = start(
        f"""
        SLOW_SECONDS = 0.5
        {textwrap.indent(SLOW_SPOOL, "        ").lstrip()}
        import cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, flush_interval=60)
        with ci.scope("work"):
            for i in range(1000):
                ci.mark("m", i)
        """,
        tmp_path,
    )
    wait_line(proc, "SHUTDOWN-START")
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == -signal.SIGTERM, err  # acted on once the shutdown was done
    spans, marks = spans_and_marks(out)
    assert sorted(m["value"] for m in marks) == list(range(1000))
    assert sorted(s["name"] for s in spans) == ["cirron.session", "work"]


COUNT_ON_DISK = """
import glob, json
def on_disk():
    return sum(len(json.load(open(p))["marks"]) for p in glob.glob(OUT + "/spool/*.json"))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_the_spool_is_flushed_before_the_application_handler_runs(out, sig):
    r = run_script(
        f"""
        import os, signal, sys
        import cirron_otel as ci
        OUT = {str(out)!r}
        {textwrap.indent(COUNT_ON_DISK, "        ").lstrip()}
        seen = []
        signal.signal({int(sig)}, lambda s, f: seen.append(on_disk()))  # before profile()
        ci.profile(output_dir=OUT, flush_interval=60)
        for i in range(1000):
            ci.mark("m", i)
        os.kill(os.getpid(), {int(sig)})
        print(json.dumps(seen))
        """
    )
    assert r.returncode == 0, r.stderr
    # the application's handler ran once and found every mark already on disk
    assert json.loads(r.stdout) == [1000]


def test_sigint_flushes_before_keyboardinterrupt_is_raised(out):
    r = run_script(
        f"""
        import os, signal, time
        import cirron_otel as ci
        OUT = {str(out)!r}
        {textwrap.indent(COUNT_ON_DISK, "        ").lstrip()}
        ci.profile(output_dir=OUT, flush_interval=60)
        for i in range(1000):
            ci.mark("m", i)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", on_disk())
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["KeyboardInterrupt", "1000"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_an_ignored_signal_stays_ignored_and_still_flushes(out, tmp_path, sig):
    proc = start(
        f"""
        import os, signal, time
        import cirron_otel as ci
        OUT = {str(out)!r}
        {textwrap.indent(COUNT_ON_DISK, "        ").lstrip()}
        signal.signal({int(sig)}, signal.SIG_IGN)  # the application ignores it
        ci.profile(output_dir=OUT, flush_interval=60)
        for i in range(1000):
            ci.mark("m", i)
        os.write(1, b"READY\\n")
        deadline = time.monotonic() + 10
        while on_disk() < 1000 and time.monotonic() < deadline:  # written by the signal alone
            time.sleep(0.01)
        print("flushed", on_disk(), flush=True)
        time.sleep(1.0)  # more signals arrive meanwhile: still ignored
        ci.mark("after", 1)
        print("alive", flush=True)
        """,
        tmp_path,
    )
    wait_line(proc, "READY")
    proc.send_signal(sig)
    assert wait_line(proc, "flushed").split() == ["flushed", "1000"]
    for _ in range(3):  # three in a row: the way out is only for signals that would end us
        proc.send_signal(sig)
    wait_line(proc, "alive")
    rc, err = finish(proc)
    assert rc == 0, err
    spans, marks = spans_and_marks(out)
    assert len(marks) == 1001 and [s["name"] for s in spans] == ["cirron.session"]


def test_shutdown_on_another_thread_is_not_cut_short_by_a_signal(out, tmp_path):
    proc = start(
        f"""
        SLOW_SECONDS = 0.5
        {textwrap.indent(SLOW_SPOOL, "        ").lstrip()}
        import threading
        import cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, flush_interval=60)
        for i in range(1000):
            ci.mark("m", i)
        threading.Thread(target=ci.shutdown).start()
        time.sleep(30)
        """,
        tmp_path,
    )
    wait_line(proc, "SHUTDOWN-START")
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == -signal.SIGTERM, err
    spans, marks = spans_and_marks(out)
    assert sorted(m["value"] for m in marks) == list(range(1000))
    assert [s["name"] for s in spans] == ["cirron.session"]


# The main thread in native code that resumes after a signal instead of returning to Python
# (SA_RESTART on a read(): the same outcome as a signal landing just before a sem_wait, where
# Pool.terminate() once left a worker hanging): the C handler takes the signal, our Python
# handler never runs. Without us the default action would end the process at once; with us
# it must still end, by the same signal, with everything recorded written.
MAIN_THREAD_STUCK_IN_NATIVE_CODE = """
    import ctypes, os, signal, sys
    import cirron_otel as ci
    ci.profile(output_dir=sys.argv[1], flush_interval=60)
    with ci.scope("work"):
        for i in range(1000):
            ci.mark("m", i)
    signal.siginterrupt(signal.SIGTERM, False)  # read() below resumes after the signal
    r, w = os.pipe()
    os.write(1, b"READY\\n")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.read(r, ctypes.create_string_buffer(1), 1)  # never returns by itself
    os.write(1, b"READ RETURNED\\n")
"""


def test_sigterm_ends_the_process_when_the_main_thread_never_gets_back_to_python(out, tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(MAIN_THREAD_STUCK_IN_NATIVE_CODE))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_line(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc, timeout=30)
    assert rc == -signal.SIGTERM, err
    spans, marks = spans_and_marks(out)
    assert sorted(m["value"] for m in marks if m["name"] == "m") == list(range(1000))
    assert [s["name"] for s in spans if s["name"] == "work"] == ["work"]


def test_the_librarys_threads_leave_the_programs_signals_to_its_own_threads(out):
    # A process-directed signal goes to any thread that does not block it; one taken by our
    # threads cannot interrupt the main thread's wait (see cirron_otel._threads).
    r = run_script(
        f"""
        import json, signal, threading
        import cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, output=["spool", "otlp"])
        def blocked(t):
            mask = next(l for l in open(f"/proc/self/task/{{t.native_id}}/status") if l.startswith("SigBlk"))
            bits = int(mask.split()[1], 16)
            return [s.name for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if bits >> (s - 1) & 1]
        print(json.dumps({{t.name: blocked(t) for t in threading.enumerate()}}))
        """,
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    )
    assert r.returncode == 0, r.stderr
    masks = json.loads(r.stdout.strip().splitlines()[-1])
    ours = {name: m for name, m in masks.items() if name.startswith("cirron-otel")}
    assert {"cirron-otel-drainer", "cirron-otel-spool", "cirron-otel-otlp-sender-0"} <= set(ours), masks
    assert all(m == ["SIGTERM", "SIGINT", "SIGHUP"] for m in ours.values()), masks
    assert masks["MainThread"] == [], masks
