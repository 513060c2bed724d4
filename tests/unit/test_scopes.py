"""scope(), epochs(), batches(): nesting, parents, errors, decorators, tasks, depth limit."""

from __future__ import annotations

import asyncio
import threading
import warnings

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cirron_otel as ci
from tests.support.helpers import spans_and_marks


def _spans(out) -> list[dict]:
    ci.flush()
    return spans_and_marks(out)[0]


def test_handle_properties_and_tree(prof, out):
    session = ci._native.session()
    with ci.scope("outer", 3, variant="fp16") as outer:
        assert outer.parent_id == session.id
        assert ci.current_scope() is outer
        outer.attrs["late"] = 1  # attrs stay mutable while the scope is open
        with ci.scope("inner") as inner:
            assert inner.parent_id == outer.id and inner.index is None
            assert ci.current_scope() is inner
            ci.mark("x", 1)
        assert ci.current_scope() is outer
    assert ci.current_scope() is None
    spans = {s["name"]: s for s in _spans(out)}
    assert spans["outer"]["id"] == outer.id and spans["inner"]["id"] == inner.id
    assert spans["outer"]["parent_id"] == session.id
    assert spans["inner"]["parent_id"] == outer.id
    assert spans["outer"]["attrs"] == {"variant": "fp16", "late": 1}
    assert spans["outer"]["index"] == 3
    assert spans["outer"]["start_ns"] <= spans["inner"]["start_ns"] <= spans["inner"]["end_ns"]
    assert spans["inner"]["end_ns"] <= spans["outer"]["end_ns"]
    assert spans["inner"]["trace_id"] == spans["outer"]["trace_id"] == outer.trace_id


def test_attrs_changed_after_the_scope_closed_do_not_reach_the_spool(out):
    # flush_interval=30: the closed scope's record waits in the ring until flush()
    ci.profile(output_dir=str(out), flush_interval=30.0, install_signal_handlers=False)
    with ci.scope("step", a=1) as step:
        step.attrs["b"] = 2
    step.attrs["after_close"] = 3
    (record,) = [s for s in _spans(out) if s["name"] == "step"]
    assert record["attrs"] == {"a": 1, "b": 2}


def test_span_id_starts_with_the_otel_span_id(out):
    """The first 16 hex of a scope's id are its OpenTelemetry span id: the one the current span
    shows inside it, the parent of an SDK span started in it, and the id its spool record has."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()  # the test's own, not the global one
    provider.add_span_processor(SimpleSpanProcessor(memory))
    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False, tracer_provider=None)
    with ci.scope("outer") as outer:
        current = trace.get_current_span().get_span_context()
        with provider.get_tracer("t").start_as_current_span("sdk-child"):
            pass
    (child,) = memory.get_finished_spans()
    assert child.parent is not None
    assert f"{current.span_id:016x}" == outer.id[:16] == f"{child.parent.span_id:016x}"
    assert f"{current.trace_id:032x}" == outer.trace_id == f"{child.context.trace_id:032x}"
    (record,) = [s for s in _spans(out) if s["name"] == "outer"]
    assert record["id"] == outer.id


ID_SAMPLE = 2048


def assert_unique_and_random(ids: list[str]) -> None:
    """All distinct, and each of the 128 bits set in about half of them (binomial: with 2048 ids
    the standard deviation is 23, the bounds are 9 of it away): a counter, a clock or a fixed
    half would leave whole bit ranges constant."""
    values = [int(i, 16) for i in ids]
    assert len(set(values)) == len(values), "a span id repeats"
    n = len(values)
    for bit in range(128):
        ones = sum((v >> bit) & 1 for v in values)
        assert 0.4 * n < ones < 0.6 * n, f"bit {bit} of the span ids is set in {ones} of {n}"


def test_span_ids_are_unique_and_random_across_threads(prof):
    ids: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        mine = []
        for _ in range(ID_SAMPLE // 4):
            with ci.scope("s") as s:
                mine.append(s.id)
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join()
    assert len(ids) == ID_SAMPLE
    assert_unique_and_random(ids)


def test_the_id_check_rejects_ids_that_are_not_random():
    """The check above fails for ids from a counter or a clock (the generator itself is native)."""
    counter = [f"{i:032x}" for i in range(1, ID_SAMPLE + 1)]
    clock = [f"{(1_700_000_000_000_000_000 + 977 * i) << 64 | i:032x}" for i in range(ID_SAMPLE)]
    for ids in (counter, clock, counter[:-1] + counter[:1]):
        with pytest.raises(AssertionError):
            assert_unique_and_random(ids)


def test_marks_attach_to_innermost_then_session_then_root(out):
    ci.mark("before", 1)  # no profile yet: "root"
    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False)
    session_id = ci._native.session().id
    with ci.scope("a") as a:
        ci.mark("in_a", 1)
        with ci.scope("b") as b:
            ci.mark("in_b", 1)
        ci.mark("in_a_again", 1)
    ci.mark("in_session", 1)
    ci.shutdown()
    ci.mark("after", 1)  # after shutdown: "root" again
    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False)
    ci.shutdown()
    spans, marks = spans_and_marks(out)
    by = {m["name"]: m for m in marks}
    assert by["before"]["span_id"] == "root" and by["after"]["span_id"] == "root"
    assert by["in_a"]["span_id"] == by["in_a_again"]["span_id"] == a.id
    assert by["in_b"]["span_id"] == b.id
    assert by["in_session"]["span_id"] == session_id
    span_by_id = {s["id"]: s for s in spans}
    assert set(span_by_id[a.id]["mark_ids"]) == {by["in_a"]["id"], by["in_a_again"]["id"]}
    assert span_by_id[b.id]["mark_ids"] == [by["in_b"]["id"]]
    assert by["in_session"]["id"] in span_by_id[session_id]["mark_ids"]
    sessions = [s for s in spans if s["name"] == "cirron.session"]
    assert len(sessions) == 2 and all(s["parent_id"] is None for s in sessions)


def test_exception_closes_scope_records_error_and_propagates(prof, out):
    class Boom(Exception):
        pass

    with pytest.raises(Boom, match="kaput") as info, ci.scope("step", keep="me"):
        raise Boom("kaput " + "x" * 400)
    assert isinstance(info.value, Boom)
    assert ci.current_scope() is None
    (span,) = [s for s in _spans(out) if s["name"] == "step"]
    assert span["attrs"]["error"] is True
    assert span["attrs"]["error.type"].endswith("Boom")
    assert span["attrs"]["keep"] == "me"
    assert span["attrs"]["error.message"].startswith("kaput x")
    assert len(span["attrs"]["error.message"].encode()) <= 256


def test_epochs_and_batches_index_and_close(prof, out):
    items = []
    for e in ci.epochs(["a", "b"]):
        for b in ci.batches(range(3)):
            items.append((e, b))
    assert items == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert ci.current_scope() is None
    spans = _spans(out)
    epochs = sorted((s for s in spans if s["name"] == "epoch"), key=lambda s: s["index"])
    assert [s["index"] for s in epochs] == [0, 1]
    session_id = ci._native.session().id
    assert all(s["parent_id"] == session_id for s in epochs)
    batches = [s for s in spans if s["name"] == "batch"]
    assert sorted(s["index"] for s in batches) == [0, 0, 1, 1, 2, 2]
    assert {s["parent_id"] for s in batches} == {s["id"] for s in epochs}


def test_epochs_close_on_break_exception_and_abandon(prof, out):
    for i in ci.epochs(range(10)):
        if i == 2:
            break
    assert ci.current_scope() is None
    with pytest.raises(KeyError):
        for _ in ci.batches(range(10)):
            raise KeyError("x")
    assert ci.current_scope() is None

    def gen():
        yield 1
        raise ValueError("source failed")

    with pytest.raises(ValueError):
        for _ in ci.epochs(gen()):
            pass
    assert ci.current_scope() is None
    it = ci.batches(range(5))
    next(it)
    assert ci.current_scope() is not None
    del it
    assert ci.current_scope() is None
    spans = _spans(out)
    epochs = [s for s in spans if s["name"] == "epoch"]
    batches = [s for s in spans if s["name"] == "batch"]
    assert sorted(s["index"] for s in epochs) == [0, 0, 1, 2]
    failed = [s for s in batches if s["attrs"].get("error")]
    assert len(failed) == 1 and failed[0]["index"] == 0
    assert sorted(s["index"] for s in batches) == [0, 0]


def test_decorator_sync_and_async(prof, out):
    @ci.scope("work", kind_of="sync")
    def work(x):
        ci.mark("in_work", x)
        return x * 2

    @ci.scope("awork")
    async def awork(x):
        await asyncio.sleep(0)
        ci.mark("in_awork", x)
        return x + 1

    assert work(2) == 4 and work(3) == 6
    assert work.__name__ == "work"
    assert asyncio.run(awork(1)) == 2
    spans, marks = spans_and_marks(out) if ci.flush() else ([], [])
    names = [s["name"] for s in spans]
    assert names.count("work") == 2 and names.count("awork") == 1
    work_ids = {s["id"] for s in spans if s["name"] == "work"}
    assert {m["span_id"] for m in marks if m["name"] == "in_work"} == work_ids
    assert all(s["attrs"] == {"kind_of": "sync"} for s in spans if s["name"] == "work")


def test_asyncio_tasks_do_not_see_each_others_scopes(prof, out):
    seen: dict[str, list[str | None]] = {}

    async def worker(tag: str, delay: float) -> None:
        with ci.scope(f"task-{tag}") as s:
            seen[tag] = []
            for i in range(5):
                await asyncio.sleep(delay)
                cur = ci.current_scope()
                seen[tag].append(cur.id if cur else None)
                assert cur is s
                with ci.scope(f"step-{tag}", i) as inner:
                    await asyncio.sleep(delay / 2)
                    assert ci.current_scope() is inner
                    ci.mark(f"m-{tag}", i)

    async def main() -> None:
        with ci.scope("request") as parent:
            await asyncio.gather(worker("a", 0.001), worker("b", 0.0015), worker("c", 0.0005))
            assert ci.current_scope() is parent

    asyncio.run(main())
    spans, marks = spans_and_marks(out) if ci.flush() else ([], [])
    by_id = {s["id"]: s for s in spans}
    request = next(s for s in spans if s["name"] == "request")
    for tag in "abc":
        task = next(s for s in spans if s["name"] == f"task-{tag}")
        assert task["parent_id"] == request["id"]
        steps = [s for s in spans if s["name"] == f"step-{tag}"]
        assert len(steps) == 5 and all(s["parent_id"] == task["id"] for s in steps)
        for m in (m for m in marks if m["name"] == f"m-{tag}"):
            assert by_id[m["span_id"]]["name"] == f"step-{tag}"
            assert by_id[m["span_id"]]["index"] == m["value"]


def test_threads_get_their_own_stack_under_the_session(prof, out):
    ids = {}

    def run(tag):
        assert ci.current_scope() is None
        with ci.scope(tag) as s:
            ids[tag] = s.parent_id

    with ci.scope("main-scope"):
        ts = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    session_id = ci._native.session().id
    assert set(ids.values()) == {session_id}


def test_depth_limit_drops_counts_and_stays_balanced(prof, out):
    before = ci.health()["scope_drop_count"]

    def nest(n):
        if n == 0:
            ci.mark("deepest", 1)
            return
        with ci.scope("lvl", n):
            nest(n - 1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = threading.Thread(target=lambda: (nest(70), nest(70)))
        t.start()
        t.join()
    msgs = [str(w.message) for w in caught if issubclass(w.category, ci.CirronWarning)]
    assert sum("deeper than 64" in m for m in msgs) == 1  # once per thread
    assert ci.health()["scope_drop_count"] - before == 12
    spans = [s for s in _spans(out) if s["name"] == "lvl"]
    assert len(spans) == 128
    assert sorted({s["index"] for s in spans}) == list(range(7, 71))
    marks = spans_and_marks(out)[1]
    deepest = [m for m in marks if m["name"] == "deepest"]
    by_id = {s["id"]: s for s in spans}
    assert all(by_id[m["span_id"]]["index"] == 7 for m in deepest)


def test_scope_argument_errors(prof):
    with pytest.raises(TypeError, match="name"):
        ci.scope()
    with pytest.raises(TypeError, match="name must be a str"):
        ci.scope(5)
    with pytest.raises(ValueError, match="non-empty"):
        ci.scope("")
    with pytest.raises(TypeError, match="index must be an int"):
        ci.scope("x", "3")
    with pytest.raises(TypeError, match="index must be an int"):
        ci.scope("x", True)
    s = ci.scope("once")
    with s:
        pass
    with pytest.raises(RuntimeError, match="entered once"), s:
        pass


def test_scope_by_keyword_and_index_keyword(prof, out):
    with ci.scope(name="kw", index=4, a=1):
        pass
    (span,) = [s for s in _spans(out) if s["name"] == "kw"]
    assert span["index"] == 4 and span["attrs"] == {"a": 1}


def test_capture_cpu_time(out):
    ci.profile(output_dir=str(out), capture_cpu_time=True, install_signal_handlers=False)
    with ci.scope("busy") as busy:
        sum(i * i for i in range(200_000))
        assert busy.cpu_ns is None  # as in the SDK: known once closed
    with ci.scope("idle"):
        pass
    spans = {s["name"]: s for s in _spans(out)}
    assert spans["busy"]["cpu_ns"] > 1_000_000
    assert spans["idle"]["cpu_ns"] is not None and spans["idle"]["cpu_ns"] < spans["busy"]["cpu_ns"]
    assert busy.cpu_ns == spans["busy"]["cpu_ns"]  # the handle says what the record says
    ci.shutdown()
    ci.profile(output_dir=str(out) + "2", install_signal_handlers=False)
    with ci.scope("plain") as plain_handle:
        pass
    (plain,) = [s for s in _spans(str(out) + "2") if s["name"] == "plain"]
    assert plain["cpu_ns"] is None and plain_handle.cpu_ns is None


def test_enter_and_exit_as_objects(prof, out):
    """__enter__/__exit__ are bound without allocating (scope.c): every way of reaching them
    behaves like a method, and the bound objects keep their scope alive."""
    import contextlib
    import gc
    import sys

    s = ci.scope("bound")
    base = sys.getrefcount(s)
    enter, exit_ = s.__enter__, s.__exit__
    assert enter.__self__ is s and exit_.__name__ == "__exit__"
    assert "__enter__" in repr(enter) and "__exit__" in repr(ci.Scope.__exit__)
    assert sys.getrefcount(s) == base + 2  # one reference each, however often bound
    again = s.__enter__
    assert again is enter and sys.getrefcount(s) == base + 2
    del again
    assert s.__exit__ is exit_  # a temporary reference, released at once
    assert sys.getrefcount(s) == base + 2
    del s
    gc.collect()
    assert enter() is exit_.__self__  # still alive through the bound objects
    assert exit_(None, None, None) is False
    assert enter.__self__.state == "closed"
    s = enter.__self__
    del enter, exit_
    assert sys.getrefcount(s) == base  # released with the bound objects
    del s

    s = ci.scope("unbound")
    assert type(s).__enter__(s) is s
    assert ci.Scope.__exit__(s, None, None, None) is False
    with pytest.raises(TypeError):
        ci.Scope.__enter__(object())
    with pytest.raises(TypeError):
        ci.scope("args").__enter__(1)

    with contextlib.ExitStack() as stack:
        inner = stack.enter_context(ci.scope("stacked"))
        assert ci.current_scope() is inner
    assert inner.state == "closed" and ci.current_scope() is None

    def gen():
        with ci.scope("in_gen") as g:
            yield g

    it = gen()
    g = next(it)
    assert g.state == "open"
    it.close()
    assert g.state == "closed"

    with pytest.raises(KeyError), ci.scope("raises") as r:
        raise KeyError("k")
    base = sys.getrefcount(r)
    for _ in range(100):
        with ci.scope("loop"):
            pass
    assert sys.getrefcount(r) == base
    by_name = {s["name"]: s for s in _spans(out)}
    assert set(by_name) >= {"bound", "unbound", "stacked", "in_gen", "raises", "loop"}
    assert by_name["raises"]["attrs"]["error.type"] == "KeyError"
