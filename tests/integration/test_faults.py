"""Faults: an unwritable or full spool, a full ring, `-W error`, and use around shutdown().

Telemetry never raises into user code: a failing spool keeps what it could not write and says
so in health() with one CirronWarning; a full ring drops the oldest records and counts them
exactly. The native counters are process-wide and cumulative, so every count is a delta.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cirron_otel as ci
from cirron_otel import _native, _warn
from tests.support.helpers import read_spool, spans_and_marks

DEFAULT_CAPACITY = 65536
PROC_DIR = "/proc/cirron-otel-test/out"  # mkdir fails here even for root

# The warnings these tests provoke are asserted where they matter; keep the summary quiet.
pytestmark = pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning")


@pytest.fixture(autouse=True)
def _fresh_warnings_and_default_capacity() -> Iterator[None]:
    # warn_once() is once per process: forget earlier tests' warnings so "exactly one" holds.
    _warn.reset()
    # The calling thread's ring is created with the capacity configured at the time: make
    # sure it exists (at the default size) before a test configures a tiny one.
    _native.random_u64()
    yield
    ci.shutdown()
    _native.configure(ring_capacity=DEFAULT_CAPACITY, full_wait=0.0)


def _cirron_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ci.CirronWarning)]


def _spool_health() -> dict[str, Any]:
    return ci.health()["sinks"]["spool"]


def _record_some(n: int, tag: str) -> None:
    for i in range(n):
        ci.mark(tag, i)
    with ci.scope(f"{tag}-scope", 1, note="x"):
        ci.mark(tag + "-in", 1.5)


def _run_in_thread(fn: Any) -> None:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]


# -- 1. uncreatable output directory ---------------------------------------------------------


def _profile_on_blocked_dir(tmp_path: Path) -> tuple[Path, Path, list[warnings.WarningMessage]]:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where a directory should be")
    out = blocker / "out"
    caught: list[warnings.WarningMessage] = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ci.profile(output_dir=str(out), flush_interval=60, install_signal_handlers=False)
        for round_ in range(3):  # three failed writes, still one warning
            _record_some(10, f"r{round_}")
            ci.flush()
        caught.extend(rec)
    return blocker, out, caught


def test_uncreatable_output_dir_keeps_profiling_warns_once_and_recovers(tmp_path):
    blocker, out, caught = _profile_on_blocked_dir(tmp_path)
    msgs = _cirron_warnings(caught)
    assert len(msgs) == 1, msgs
    assert "spool" in msgs[0] and "write failed" in msgs[0]
    h = ci.health()
    assert h["enabled"] is True and h["drainer_state"] == "background"
    spool = h["sinks"]["spool"]
    assert spool["failed"] >= 3
    assert spool["pending"] == 3 * 12  # 10 marks + 1 mark + 1 span per round, none lost
    assert spool["exported"] == 0
    assert spool["last_error"] and "Not a directory" in spool["last_error"]

    blocker.unlink()  # the directory can be created now
    ci.shutdown()  # the final drain retries what the spool could not write
    assert _spool_health()["pending"] == 0
    spans, marks = spans_and_marks(out)
    for round_ in range(3):
        assert sorted(m["value"] for m in marks if m["name"] == f"r{round_}") == list(range(10))
        assert [m["value"] for m in marks if m["name"] == f"r{round_}-in"] == [1.5]
        assert [s["attrs"] for s in spans if s["name"] == f"r{round_}-scope"] == [{"note": "x"}]
    assert len(marks) == 3 * 11
    assert [s["name"] for s in spans].count("cirron.session") == 1


def test_flush_after_the_directory_becomes_writable_writes_the_backlog(tmp_path):
    # flush_interval=60: only the flush itself (not the sink's idle retry timer) can write it
    blocker, out, _ = _profile_on_blocked_dir(tmp_path)
    assert _spool_health()["pending"] == 36
    blocker.unlink()
    assert ci.flush() is True
    assert _spool_health()["pending"] == 0
    assert len(spans_and_marks(out)[1]) == 33


# -- 2. read-only location ----------------------------------------------------------------


def test_read_only_location_keeps_profiling_and_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ci.profile(output_dir=PROC_DIR, flush_interval=60, install_signal_handlers=False)
        for _ in range(3):
            _record_some(5, "ro")
            ci.flush()
        h = ci.health()
        ci.shutdown()  # the last retry fails too: still no exception, no second warning
    msgs = _cirron_warnings(caught)
    assert len(msgs) == 1, msgs
    assert "write failed" in msgs[0]
    spool = h["sinks"]["spool"]
    assert spool["failed"] >= 3 and spool["pending"] == 3 * 7 and spool["exported"] == 0
    assert spool["last_error"] and "No such file or directory" in spool["last_error"]
    assert h["spool_dir"] == os.path.join(PROC_DIR, "spool")
    assert not os.path.exists(PROC_DIR)
    after = _spool_health()
    assert after["pending"] == 3 * 7 + 1  # + the session span closed at shutdown
    assert after["failed"] > spool["failed"]


# -- 3. disk full --------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here: cannot make a 256 KiB tmpfs for the disk-full test")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 256 KiB tmpfs (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        ci.shutdown()  # nothing may still write into the mount
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.real_backend  # a real tmpfs needs root: under CI a skip fails the run
def test_disk_full_never_raises_and_leaves_no_half_file(tiny_fs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ci.profile(output_dir=str(tiny_fs), flush_interval=60, install_signal_handlers=False)
        payload = "x" * 200
        recorded = 0
        for _ in range(200):  # 256 KiB fill up after a few rounds
            for i in range(300):
                ci.mark("fill", payload, i=i)
            recorded += 300
            ci.flush()
            if _spool_health()["failed"]:
                break
        for _ in range(3):  # more failing rounds: still fine, still one warning
            ci.mark("fill", payload)
            recorded += 1
            ci.flush()
        h = ci.health()
    spool = h["sinks"]["spool"]
    assert spool["failed"] >= 4
    err = spool["last_error"] or ""
    assert "No space left" in err or "Errno 28" in err, err
    assert spool["pending"] > 0
    assert spool["exported"] + spool["pending"] == recorded  # kept for retry, not lost
    msgs = _cirron_warnings(caught)
    assert sum("write failed" in m for m in msgs) == 1, msgs
    # Every sealed file is whole (strict parse + schema), and no .json.tmp is left behind.
    spool_dir = tiny_fs / "spool"
    assert not [p.name for p in spool_dir.iterdir() if not p.name.endswith(".json")]
    written = sum(len(doc["marks"]) for doc in read_spool(tiny_fs))
    assert written == spool["marks_written"] == spool["exported"] > 0


# -- 4. full ring: exact counts ------------------------------------------------------------


def _real_capacity(configured: int) -> int:
    cap = 64
    while cap < configured:
        cap <<= 1
    return cap


@pytest.mark.parametrize(("configured", "capacity"), [(1024, 1024), (1000, 1024), (64, 64)])
def test_full_ring_drops_oldest_marks_with_exact_counts(out, configured, capacity):
    assert _real_capacity(configured) == capacity
    ci.profile(output_dir=str(out), ring_capacity=configured, install_signal_handlers=False)
    ci.shutdown()  # no drainer from here on; rings created later still get `configured`
    n = 5000
    before = ci.health()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_in_thread(lambda: [ci.mark("v", i) for i in range(n)])
    after = ci.health()
    assert after["mark_drop_count"] - before["mark_drop_count"] == n - capacity
    assert after["marks_recorded"] - before["marks_recorded"] == n
    msgs = _cirron_warnings(caught)
    assert sum("ring is full" in m for m in msgs) == 1, msgs

    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False)
    assert ci.flush() is True
    marks = [m for m in spans_and_marks(out)[1] if m["name"] == "v"]
    assert sorted(m["value"] for m in marks) == list(range(n - capacity, n))
    assert {m["span_id"] for m in marks} == {"root"}
    assert len({m["id"] for m in marks}) == capacity


def test_full_ring_with_spans_keeps_counts_exact(out):
    ci.profile(output_dir=str(out), ring_capacity=1024, install_signal_handlers=False)
    ci.shutdown()
    n = 2000

    def work() -> None:
        for i in range(n):
            with ci.scope("s", i):
                ci.mark("m", i)  # 1 slot, then the span's 2 slots

    before = ci.health()
    _run_in_thread(work)
    after = ci.health()
    # 3 slots per iteration: the newest 341 iterations (1023 slots) fit in 1024.
    kept = 1024 // 3
    assert after["mark_drop_count"] - before["mark_drop_count"] == n - kept
    assert after["span_drop_count"] - before["span_drop_count"] == n - kept
    assert after["spans_recorded"] - before["spans_recorded"] == n

    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False)
    ci.flush()
    spans, marks = spans_and_marks(out)
    spans = [s for s in spans if s["name"] == "s"]
    marks = [m for m in marks if m["name"] == "m"]
    assert sorted(s["index"] for s in spans) == list(range(n - kept, n))
    assert sorted(m["value"] for m in marks) == list(range(n - kept, n))
    by_id = {s["id"]: s for s in spans}
    for m in marks:
        span = by_id[m["span_id"]]
        assert span["index"] == m["value"] and span["mark_ids"] == [m["id"]]
        assert span["parent_id"] is None  # recorded with no session


def test_only_spans_overflow_counts_two_slots_each(out):
    ci.profile(output_dir=str(out), ring_capacity=256, install_signal_handlers=False)
    ci.shutdown()
    before = ci.health()
    _run_in_thread(lambda: [ci.scope("only", i).__enter__().__exit__(None, None, None) for i in range(1000)])
    after = ci.health()
    assert after["span_drop_count"] - before["span_drop_count"] == 1000 - 128
    assert after["mark_drop_count"] == before["mark_drop_count"]
    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False)
    ci.flush()
    spans = [s for s in spans_and_marks(out)[0] if s["name"] == "only"]
    assert sorted(s["index"] for s in spans) == list(range(872, 1000))


# -- 5. -W error ---------------------------------------------------------------------------


def test_warnings_as_errors_never_raise_into_user_code(out):
    code = textwrap.dedent(
        f"""
        import json, threading, cirron_otel as ci

        def overflow():
            for i in range(3000):
                ci.mark("v", i)
                with ci.scope("s", i):
                    pass

        ci.profile(output_dir={PROC_DIR!r}, flush_interval=0.05, install_signal_handlers=False)
        for i in range(100):
            ci.mark("m", i)
        ok_flush = ci.flush()
        failing = ci.health()["sinks"]["spool"]
        ci.shutdown()

        ci.profile(output_dir={str(out)!r}, ring_capacity=64, install_signal_handlers=False)
        ci.shutdown()
        before = ci.health()
        for _ in range(2):  # two new threads, each with a 64-slot ring and no drainer
            t = threading.Thread(target=overflow)
            t.start(); t.join()
        after = ci.health()
        ci.profile(output_dir={str(out)!r}, install_signal_handlers=False)
        ci.flush()
        ci.shutdown()
        print(json.dumps({{
            "failed": failing["failed"], "last_error": failing["last_error"],
            "mark_drops": after["mark_drop_count"] - before["mark_drop_count"],
            "span_drops": after["span_drop_count"] - before["span_drop_count"],
        }}))
        """
    )
    r = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr
    res = json.loads(r.stdout)
    assert res["failed"] >= 1 and res["last_error"]
    # per ring: 3000 marks + 3000 spans = 9000 slots; the newest 21 iterations (63 slots) stay
    assert res["mark_drops"] == 2 * (3000 - 21)
    assert res["span_drops"] == 2 * (3000 - 21)
    marks = [m for m in spans_and_marks(out)[1] if m["name"] == "v"]
    assert sorted(m["value"] for m in marks) == sorted(2 * list(range(3000 - 21, 3000)))


# -- 6. around shutdown() -----------------------------------------------------------------


def test_mark_and_scope_keep_working_after_shutdown(out):
    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False)
    first_session = _native.session().id
    straddle = ci.scope("straddle")
    straddle.__enter__()
    ci.shutdown()
    straddle.__exit__(None, None, None)  # closes after its session ended
    ci.mark("after", 1)
    with ci.scope("late", 7, k="v") as late:
        ci.mark("in_late", 2)
        assert ci.current_scope() is late
    assert late.parent_id is None
    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False)
    ci.shutdown()
    spans, marks = spans_and_marks(out)
    by_name = {m["name"]: m for m in marks}
    assert by_name["after"]["span_id"] == "root"
    assert by_name["in_late"]["span_id"] == late.id
    late_spans = [s for s in spans if s["name"] == "late"]
    assert len(late_spans) == 1
    assert late_spans[0]["parent_id"] is None and late_spans[0]["index"] == 7
    assert late_spans[0]["attrs"] == {"k": "v"}
    assert late_spans[0]["mark_ids"] == [by_name["in_late"]["id"]]
    straddles = [s for s in spans if s["name"] == "straddle"]
    assert len(straddles) == 1 and straddles[0]["parent_id"] == first_session


def test_profile_shutdown_cycles_make_one_session_each(out):
    sessions = []
    for cycle in range(3):
        p = ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False)
        assert p.running and ci.health()["drainer_state"] == "background"
        sessions.append(_native.session().id)
        with ci.scope("work", cycle):
            ci.mark("cycle", cycle)
        ci.mark("session-level", cycle)
        ci.shutdown()
        assert ci.health()["drainer_state"] == "stopped"
        assert _native.session() is None
    assert len(set(sessions)) == 3
    spans, marks = spans_and_marks(out)
    roots = [s for s in spans if s["name"] == "cirron.session"]
    assert sorted(s["id"] for s in roots) == sorted(sessions)
    assert all(s["parent_id"] is None for s in roots)
    by_id = {s["id"]: s for s in spans}
    for m in marks:
        if m["name"] == "session-level":
            assert m["span_id"] == sessions[m["value"]]
            assert m["id"] in by_id[m["span_id"]]["mark_ids"]
        elif m["name"] == "cycle":
            work = by_id[m["span_id"]]
            assert work["name"] == "work" and work["index"] == m["value"]
            assert work["parent_id"] == sessions[m["value"]]
    assert sorted(m["value"] for m in marks if m["name"] == "cycle") == [0, 1, 2]
