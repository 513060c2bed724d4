"""Concurrency: 8 producer threads, mark_ids across threads, thread exit, fork, multiprocessing.

Counts are exact: every record a thread recorded is either in the spool or counted as dropped.
The native counters are process-wide and cumulative, so every count here is a delta.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cirron_otel as ci
from cirron_otel import _native
from tests.support.helpers import run_script, spans_and_marks

DEFAULT_CAPACITY = 65536

pytestmark = pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning")


@pytest.fixture(autouse=True)
def _default_capacity() -> Iterator[None]:
    _native.random_u64()  # the test thread's ring exists before a tiny capacity is configured
    yield
    ci.shutdown()
    _native.configure(ring_capacity=DEFAULT_CAPACITY, full_wait=0.0)


def _counters() -> dict[str, int]:
    h = ci.health()
    return {k: h[k] for k in ("marks_recorded", "spans_recorded", "mark_drop_count", "span_drop_count")}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _run_threads(n: int, target: Any) -> None:
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            start.wait()
            target(k)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


THREADS = 8
ITERATIONS = 1500
MARKS_PER_STEP = 9


def _producer(k: int) -> None:
    for i in range(ITERATIONS):
        with ci.scope("step", i, thread=k):
            for j in range(MARKS_PER_STEP):
                ci.mark("m", j, thread=k)


def _eight_threads(out: Path, **profile_kwargs: Any) -> tuple[dict[str, int], list[dict], list[dict]]:
    """Run the 8-thread workload; return counter deltas and the records it wrote."""
    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False, **profile_kwargs)
    assert ci.flush() is True  # anything an earlier test left pending goes out first
    assert ci.health()["records_pending"] == 0
    spans0, marks0 = spans_and_marks(out)
    before = _counters()
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.02)  # long GIL slices: a producer outruns the collector
    try:
        _run_threads(THREADS, _producer)
        ci.mark("main", 1)
    finally:
        sys.setswitchinterval(old_interval)
    ci.shutdown()
    delta = _delta(_counters(), before)
    spool = ci.health()["sinks"]["spool"]
    assert spool["pending"] == 0 and spool["dropped"] == 0 and spool["failed"] == 0
    spans, marks = spans_and_marks(out)
    old_spans = {s["id"] for s in spans0}
    old_marks = {m["id"] for m in marks0}
    return (
        delta,
        [s for s in spans if s["id"] not in old_spans],
        [m for m in marks if m["id"] not in old_marks],
    )


def _assert_ids_unique(spans: list[dict], marks: list[dict]) -> None:
    assert len({s["id"] for s in spans}) == len(spans)
    assert len({m["id"] for m in marks}) == len(marks)


def test_eight_threads_small_ring_recorded_equals_written_plus_dropped(out):
    delta, spans, marks = _eight_threads(out, ring_capacity=1024, ring_full_wait=0)
    step_records = THREADS * ITERATIONS
    assert delta["marks_recorded"] == step_records * MARKS_PER_STEP + 1
    assert delta["spans_recorded"] == step_records + 1  # + this session's root
    assert delta["marks_recorded"] == len(marks) + delta["mark_drop_count"]
    assert delta["spans_recorded"] == len(spans) + delta["span_drop_count"]
    assert delta["mark_drop_count"] + delta["span_drop_count"] > 0  # the ring really overflowed
    _assert_ids_unique(spans, marks)
    # What survived is consistent: a listed mark is written and points back at its span.
    mark_by_id = {m["id"]: m for m in marks}
    listed = Counter(mid for s in spans for mid in s["mark_ids"])
    assert all(n == 1 for n in listed.values())
    for s in spans:
        for mid in s["mark_ids"]:
            assert mark_by_id[mid]["span_id"] == s["id"]


def test_eight_threads_with_backpressure_lose_nothing(out):
    delta, spans, marks = _eight_threads(out)  # default ring and ring_full_wait
    assert delta["mark_drop_count"] == 0 and delta["span_drop_count"] == 0
    assert delta["marks_recorded"] == len(marks) == THREADS * ITERATIONS * MARKS_PER_STEP + 1
    assert delta["spans_recorded"] == len(spans) == THREADS * ITERATIONS + 1
    steps = Counter((s["attrs"]["thread"], s["index"]) for s in spans if s["name"] == "step")
    assert steps == Counter({(k, i): 1 for k in range(THREADS) for i in range(ITERATIONS)})

    # mark_ids: every span lists exactly the marks attached to it, across threads.
    _assert_ids_unique(spans, marks)
    attached: dict[str, set[str]] = {}
    for m in marks:
        assert m["span_id"] != "root"
        attached.setdefault(m["span_id"], set()).add(m["id"])
    listed = Counter(mid for s in spans for mid in s["mark_ids"])
    assert all(n == 1 for n in listed.values()), "a mark id is listed by two spans"
    assert set(listed) == {m["id"] for m in marks}, "a mark is missing from its span's mark_ids"
    by_id = {s["id"]: s for s in spans}
    for sid, ids in attached.items():
        assert set(by_id[sid]["mark_ids"]) == ids
    thread_of = {m["id"]: m["attrs"].get("thread") for m in marks}
    for s in spans:
        if s["name"] == "step":
            assert len(s["mark_ids"]) == MARKS_PER_STEP
            assert {thread_of[mid] for mid in s["mark_ids"]} == {s["attrs"]["thread"]}


# -- thread exit ---------------------------------------------------------------------------

WAVE = 50
SHORT_LIVED = 10_000


def _short_lived_threads(first: int) -> None:
    def one(i: int) -> None:
        with ci.scope("t", i):
            ci.mark("x", i)

    for base in range(first, first + SHORT_LIVED, WAVE):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(base, base + WAVE)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _wait_rings_freed(target: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        ci.flush()
        freed = ci.health()["drainer"]["rings_freed"]
        if freed >= target or time.monotonic() > deadline:
            return freed
        time.sleep(0.05)


def test_short_lived_threads_deliver_everything_and_free_their_rings(prof, out):
    freed0 = ci.health()["drainer"]["rings_freed"]
    _short_lived_threads(0)
    freed1 = _wait_rings_freed(freed0 + SHORT_LIVED - 10)
    assert freed1 - freed0 >= SHORT_LIVED - 10
    rss1 = _rss_kib()
    live1 = ci.health()["drainer"]["threads_with_rings"]

    _short_lived_threads(SHORT_LIVED)
    freed2 = _wait_rings_freed(freed1 + SHORT_LIVED - 10)
    assert freed2 - freed1 >= SHORT_LIVED - 10
    rss2 = _rss_kib()
    assert rss2 - rss1 < 20 * 1024, f"RSS grew by {(rss2 - rss1) // 1024} MiB over 10,000 threads"
    assert ci.health()["drainer"]["threads_with_rings"] <= live1

    spans, marks = spans_and_marks(out)
    t_spans = [s for s in spans if s["name"] == "t"]
    x_marks = [m for m in marks if m["name"] == "x"]
    assert sorted(s["index"] for s in t_spans) == list(range(2 * SHORT_LIVED))
    assert sorted(m["value"] for m in x_marks) == list(range(2 * SHORT_LIVED))
    by_id = {s["id"]: s for s in t_spans}
    for m in x_marks:
        span = by_id[m["span_id"]]
        assert span["index"] == m["value"] and span["mark_ids"] == [m["id"]]


# -- fork ----------------------------------------------------------------------------------


def _child_results(r: Any) -> dict[str, Any]:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_fork_child_has_empty_rings_its_own_session_and_flushes_at_exit(out):
    r = run_script(
        f"""
        import json, os, sys, cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, flush_interval=60, install_signal_handlers=False)
        session = ci._native.session().id
        for i in range(50):
            ci.mark("parent", i)
        with ci.scope("pscope"):
            for i in range(50, 100):
                ci.mark("parent", i)
        # nothing flushed: all of it is pending in this thread's ring at fork time
        pid = os.fork()
        if pid == 0:
            with ci.scope("cscope"):
                for i in range(10):
                    ci.mark("child", i)
            sys.exit(0)  # atexit flushes
        _, status = os.waitpid(pid, 0)
        ci.shutdown()
        print(json.dumps({{"session": session, "parent": os.getpid(), "child": pid, "status": status}}))
        """,
        timeout=60,
    )
    res = _child_results(r)
    assert res["status"] == 0
    spans, marks = spans_and_marks(out)
    parent_marks = [m["value"] for m in marks if m["name"] == "parent"]
    assert sorted(parent_marks) == list(range(100))  # each exactly once: no copy from the child
    child_marks = [m for m in marks if m["name"] == "child"]
    assert sorted(m["value"] for m in child_marks) == list(range(10))
    by_id = {s["id"]: s for s in spans}
    assert [s["name"] for s in spans].count("pscope") == 1
    assert {by_id[m["span_id"]]["name"] for m in child_marks} == {"cscope"}
    assert {by_id[m["span_id"]]["pid"] for m in child_marks} == {res["child"]}
    sessions = {s["pid"]: s for s in spans if s["name"] == "cirron.session"}
    assert set(sessions) == {res["parent"], res["child"]}
    assert sessions[res["parent"]]["id"] == res["session"]
    assert sessions[res["parent"]]["parent_id"] is None
    assert sessions[res["child"]]["parent_id"] == res["session"]
    assert sessions[res["child"]]["id"] != res["session"]
    cscope = next(s for s in spans if s["name"] == "cscope")
    assert cscope["parent_id"] == sessions[res["child"]]["id"]
    assert len({m["id"] for m in marks}) == len(marks)


def test_fork_while_another_thread_marks_flat_out_does_not_deadlock(out):
    r = run_script(
        f"""
        import json, os, sys, threading, time, cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, flush_interval=0.01, install_signal_handlers=False)
        stop = threading.Event()
        def spin():
            i = 0
            while not stop.is_set():
                with ci.scope("bg"):
                    for _ in range(50):
                        ci.mark("bg", i)
                i += 1
                if i % 4 == 0:
                    time.sleep(0.0005)
        t = threading.Thread(target=spin)
        t.start()
        time.sleep(0.05)
        kids = {{}}
        for k in range(12):
            pid = os.fork()
            if pid == 0:
                with ci.scope("child-work", k):
                    for j in range(10):
                        ci.mark("child", j)
                sys.exit(0)
            kids[pid] = k
            time.sleep(0.005)
        stop.set()
        t.join()
        done, deadline = {{}}, time.monotonic() + 30
        while len(done) < len(kids) and time.monotonic() < deadline:
            for pid in kids:
                if pid not in done:
                    got, status = os.waitpid(pid, os.WNOHANG)
                    if got:
                        done[pid] = status
            time.sleep(0.01)
        hung = [k for pid, k in kids.items() if pid not in done]
        for pid in kids:
            if pid not in done:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        ci.shutdown()
        print(json.dumps({{"kids": {{str(p): k for p, k in kids.items()}}, "hung": hung,
                          "statuses": list(done.values())}}))
        """,
        timeout=90,
    )
    res = _child_results(r)
    assert res["hung"] == [], f"forked children deadlocked: {res['hung']}"
    assert res["statuses"] == [0] * 12
    spans, marks = spans_and_marks(out)
    by_id = {s["id"]: s for s in spans}
    work = {s["pid"]: s for s in spans if s["name"] == "child-work"}
    assert {str(p) for p in work} == set(res["kids"])
    per_child = Counter(by_id[m["span_id"]]["pid"] for m in marks if m["name"] == "child")
    assert per_child == Counter({int(p): 10 for p in res["kids"]})
    for pid, s in work.items():
        assert s["index"] == res["kids"][str(pid)]
        assert len(s["mark_ids"]) == 10
    assert len({m["id"] for m in marks}) == len(marks)


def test_fork_while_the_warning_lock_is_held_does_not_deadlock(out):
    r = run_script(
        f"""
        import json, os, threading, time, cirron_otel as ci
        from cirron_otel import _warn
        ci.profile(output_dir={str(out)!r}, flush_interval=0.05, install_signal_handlers=False)
        held, release = threading.Event(), threading.Event()
        def hold():  # stands in for a sink worker inside warn_once() at fork time
            with _warn._lock:
                held.set()
                release.wait()
        t = threading.Thread(target=hold)
        t.start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            ci.mark("child", 1)
            ci.shutdown()
            os._exit(0)
        release.set()
        t.join()
        deadline, status = time.monotonic() + 5, None
        while time.monotonic() < deadline:
            got, st = os.waitpid(pid, os.WNOHANG)
            if got:
                status = st
                break
            time.sleep(0.01)
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        ci.shutdown()
        print(json.dumps({{"status": status}}))
        """,
        timeout=60,
    )
    assert _child_results(r)["status"] == 0, "the forked child deadlocked"
    assert [m["name"] for m in spans_and_marks(out)[1]].count("child") == 1


def test_fork_inside_an_open_scope_leaves_one_copy_of_it(out):
    r = run_script(
        f"""
        import json, os, sys, cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, flush_interval=60, install_signal_handlers=False)
        with ci.scope("outer") as outer:
            ci.mark("before-fork", 1)
            pid = os.fork()
            if pid == 0:
                ci.mark("in-child", 1)
        if pid == 0:
            with ci.scope("after-outer"):
                ci.mark("child-after", 1)
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        ci.shutdown()
        print(json.dumps({{"outer": outer.id, "parent": os.getpid(), "child": pid, "status": status}}))
        """,
        timeout=60,
    )
    res = _child_results(r)
    assert res["status"] == 0
    spans, marks = spans_and_marks(out)
    outers = [s for s in spans if s["name"] == "outer"]
    assert len(outers) == 1, "the child wrote a second copy of a scope opened before fork"
    assert outers[0]["id"] == res["outer"] and outers[0]["pid"] == res["parent"]
    by_name = {m["name"]: m for m in marks}
    assert [m["name"] for m in marks].count("before-fork") == 1
    assert by_name["before-fork"]["id"] in outers[0]["mark_ids"]
    assert by_name["in-child"]["span_id"] == res["outer"]  # still inside `outer` in the child
    after = next(s for s in spans if s["name"] == "after-outer")
    assert after["pid"] == res["child"]
    assert after["mark_ids"] == [by_name["child-after"]["id"]]
    child_session = next(s for s in spans if s["name"] == "cirron.session" and s["pid"] == res["child"])
    assert after["parent_id"] == child_session["id"]


def test_multiprocessing_fork_child_marks_reach_the_spool(out):
    r = run_script(
        f"""
        import json, multiprocessing as mp, cirron_otel as ci

        def work():
            with ci.scope("mp-work"):
                for i in range(10):
                    ci.mark("mp", i)

        ci.profile(output_dir={str(out)!r}, flush_interval=60, install_signal_handlers=False)
        p = mp.get_context("fork").Process(target=work)
        p.start()
        p.join(30)
        ci.shutdown()
        print(json.dumps({{"exitcode": p.exitcode, "pid": p.pid}}))
        """,
        timeout=60,
    )
    res = _child_results(r)
    assert res["exitcode"] == 0
    spans, marks = spans_and_marks(out)
    assert sorted(m["value"] for m in marks if m["name"] == "mp") == list(range(10))
    work = [s for s in spans if s["name"] == "mp-work"]
    assert len(work) == 1 and work[0]["pid"] == res["pid"]
