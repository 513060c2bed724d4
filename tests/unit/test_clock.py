"""The records' clock (tsc.h): wall-clock ns from the invariant TSC, clock_gettime elsewhere.

Timestamps must agree with time.time_ns() to within a few microseconds, never go back within
a thread when the drainer re-bases the clock, and CIRRON_CLOCK=realtime must force the
clock_gettime fallback.
"""

from __future__ import annotations

import os
import platform
import threading
import time

import pytest

import cirron_otel as ci
from cirron_otel import _native
from tests.support.helpers import run_script, spans_and_marks

# How far a record's timestamp may be from time.time_ns() read around the call.
SLACK_NS = 20_000


def _invariant_tsc() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = line.split()
                return "constant_tsc" in flags and "nonstop_tsc" in flags
    return False


def _calibrated() -> None:
    """Wait until the TSC rate is measured (20 ms after import), as in a running profile."""
    deadline = time.monotonic() + 2
    while not _native.clock_info(True)["calibrated"] and time.monotonic() < deadline:
        time.sleep(0.005)


needs_tsc = pytest.mark.skipif(
    _native.clock_info()["source"] != "tsc", reason="the TSC clock is not in use here"
)


def test_source_is_the_tsc_where_it_is_invariant():
    if os.environ.get("CIRRON_CLOCK") == "realtime" or not _invariant_tsc():
        pytest.skip("no invariant TSC, or the fallback is forced")
    info = _native.clock_info()
    assert info["source"] == "tsc"
    _calibrated()
    info = _native.clock_info()
    assert info["calibrated"] and 0.1 < info["tsc_ghz"] < 10


def test_clock_ns_agrees_with_time_ns():
    _calibrated()
    worst = []
    for _ in range(20):
        best = None
        for _ in range(200):  # the tightest bracket of a few: a preempted one says nothing
            a = time.time_ns()
            t = _native.clock_ns()
            b = time.time_ns()
            if best is None or b - a < best[1] - best[0]:
                best = (a, b, t)
        a, b, t = best
        worst.append(max(a - t, t - b, 0))
        time.sleep(0.01)
    assert max(worst) < SLACK_NS, worst


def test_records_agree_with_time_ns(prof, out):
    _calibrated()
    brackets = []
    for i in range(300):
        a = time.time_ns()
        ci.mark("m", i)
        with ci.scope("s", index=i):
            pass
        b = time.time_ns()
        brackets.append((a, b))
        if i % 30 == 0:
            time.sleep(0.01)  # spread over several drainer re-bases
    ci.flush()
    spans, marks = spans_and_marks(out)
    marks = sorted((m for m in marks if m["name"] == "m"), key=lambda m: m["value"])
    spans = sorted((s for s in spans if s["name"] == "s"), key=lambda s: s["index"])
    assert len(marks) == len(spans) == 300
    for (a, b), m, s in zip(brackets, marks, spans, strict=True):
        assert a - SLACK_NS <= m["ts_ns"] <= s["start_ns"] <= s["end_ns"] <= b + SLACK_NS


@needs_tsc
def test_a_thread_never_goes_back_when_the_clock_is_rebased(prof, out):
    _calibrated()
    ci.mark("a", 0)
    _native._clock_shift(-2_000_000)  # a re-base 2 ms back (wrong rate, NTP step)
    ci.mark("b", 0)
    with ci.scope("s"):
        pass
    _native.clock_info(True)  # back on time
    ci.mark("c", 0)
    ci.flush()
    spans, marks = spans_and_marks(out)
    ts = {m["name"]: m["ts_ns"] for m in marks}
    (s,) = [s for s in spans if s["name"] == "s"]
    assert ts["a"] <= ts["b"] <= s["start_ns"] <= s["end_ns"] <= ts["c"]


@needs_tsc
def test_a_large_step_back_is_kept(prof, out):
    """A wall clock set back by a second is a real change, not re-base noise: followed."""
    _calibrated()
    ci.mark("a", 0)
    _native._clock_shift(-1_000_000_000)
    ci.mark("b", 0)
    _native.clock_info(True)
    ci.flush()
    _, marks = spans_and_marks(out)
    ts = {m["name"]: m["ts_ns"] for m in marks}
    assert ts["a"] - 1_100_000_000 < ts["b"] < ts["a"] - 900_000_000


def test_threads_stay_ordered_across_rebases(prof, out):
    _calibrated()
    stop = threading.Event()

    def rebase() -> None:
        while not stop.is_set():
            _native.clock_info(True)

    def work(k: int) -> None:
        for i in range(3000):
            ci.mark(f"t{k}", i)

    rebaser = threading.Thread(target=rebase)
    rebaser.start()
    workers = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    rebaser.join()
    ci.flush()
    _, marks = spans_and_marks(out)
    for k in range(3):
        mine = sorted((m for m in marks if m["name"] == f"t{k}"), key=lambda m: m["value"])
        assert len(mine) == 3000
        ts = [m["ts_ns"] for m in mine]
        assert ts == sorted(ts)


def test_realtime_fallback_when_forced(tmp_path):
    code = f"""
        import time
        import cirron_otel as ci
        from cirron_otel import _native
        from tests.support.helpers import spans_and_marks
        assert _native.clock_info()["source"] == "realtime", _native.clock_info()
        ci.profile(output_dir={str(tmp_path)!r}, install_signal_handlers=False)
        brackets = []
        for i in range(100):
            a = time.time_ns()
            ci.mark("m", i)
            brackets.append((a, time.time_ns()))
        ci.flush()
        _, marks = spans_and_marks({str(tmp_path)!r})
        marks = sorted(marks, key=lambda m: m["value"])
        assert len(marks) == 100
        for (a, b), m in zip(brackets, marks, strict=True):
            assert a <= m["ts_ns"] <= b, (a, m["ts_ns"], b)
        ci.shutdown()
        print("OK")
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = run_script(code, env={"CIRRON_CLOCK": "realtime"}, cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK"
