"""User code run by cirron_otel's own threads may call back into it.

An attribute's `__str__` runs on the drainer thread (inside its native claim step, which
holds a native mutex); a span processor of the application's TracerProvider runs on that sink's
worker thread. `ci.flush()` / `ci.trace()` from there used to deadlock the drainer for
good (records stopped being written, `health()` still said alive) or make the worker wait
for itself. Now flush() returns False at once (warning once), and trace() and a scope
handle's `.marks` return what they have.
Each case runs in a subprocess with a timeout: a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.helpers import run_script, spans_and_marks

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("call", ["flush", "trace", "both", "marks"])
def test_attr_str_calling_flush_or_trace_does_not_stop_the_drainer(out: Path, call: str) -> None:
    r = run_script(
        f"""
        import json, cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, flush_interval=0.05, install_signal_handlers=False)
        results = []

        class Reentrant:
            def __str__(self):
                if {call!r} in ("flush", "both"):
                    results.append(("flush", ci.flush()))
                if {call!r} in ("trace", "both"):
                    results.append(("trace", type(ci.trace(format="dict")).__name__))
                if {call!r} == "marks":
                    results.append(("marks", type(outer.marks).__name__))
                return "reentrant"

        outer = ci.scope("outer").__enter__()

        ci.mark("before", 1)
        ci.mark("evil", 2, obj=Reentrant())
        with ci.scope("evil_scope", obj=Reentrant()):
            pass
        assert ci.flush(timeout=20), "the drainer stopped"
        for i in range(3):
            ci.mark("after", i)
        ok = ci.flush(timeout=20)
        outer.__exit__(None, None, None)
        health = ci.health()
        ci.shutdown()
        print(json.dumps({{"ok": ok, "results": results, "alive": health["flush_mode"]}}))
        """,
        timeout=90,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"] is True
    flushes = [v for k, v in res["results"] if k == "flush"]
    assert flushes == [False] * len(flushes)
    if call in ("trace", "both"):
        assert [v for k, v in res["results"] if k == "trace"] == ["dict", "dict"]
    if call in ("flush", "both"):
        assert "flush() called from cirron_otel's own thread" in r.stderr
    if call == "marks":
        assert [v for k, v in res["results"] if k == "marks"] == ["list", "list"]
        assert "claim() called from cirron_otel's own thread" in r.stderr
    spans, marks = spans_and_marks(out)
    names = [m["name"] for m in marks]
    assert names.count("after") == 3 and "before" in names
    by = {m["name"]: m for m in marks}
    assert by["evil"]["attrs"] == {"obj": "reentrant"}
    assert next(s for s in spans if s["name"] == "evil_scope")["attrs"] == {"obj": "reentrant"}
    assert any(s["name"] == "cirron.session" for s in spans)


def test_span_processor_calling_flush_on_the_sink_worker_returns_at_once(out: Path) -> None:
    # The provider sink hands spans to the app's processors on its worker thread.
    r = run_script(
        f"""
        import json, time
        from opentelemetry import trace
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
        import cirron_otel as ci

        calls = []

        class FlushingProcessor(SpanProcessor):
            def on_end(self, span):
                t0 = time.monotonic()
                calls.append([span.name, ci.flush(timeout=30), 0.0])
                calls[-1][2] = time.monotonic() - t0

        provider = TracerProvider()
        provider.add_span_processor(FlushingProcessor())
        ci.profile(output_dir={str(out)!r}, flush_interval=0.05, install_signal_handlers=False,
                   tracer_provider=provider)
        for i in range(3):
            with ci.scope("step", index=i):
                ci.mark("x", i)
        ok = ci.flush(timeout=60)
        ci.shutdown(timeout=60)
        print(json.dumps({{"ok": ok, "calls": calls}}))
        """,
        timeout=100,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    steps = [c for c in res["calls"] if c[0] == "step"]
    assert len(steps) == 3 and all(c[1] is False for c in steps), res
    # waiting for itself, each call used to take its whole 30 s timeout (the subprocess's
    # timeout then fails the test); the bound here is that timeout, not a speed claim
    assert all(c[2] < 30 for c in steps), res
    _, marks = spans_and_marks(out)
    assert sorted(m["value"] for m in marks if m["name"] == "x") == [0, 1, 2]


def test_collect_reentered_from_the_gil_pass_returns_nothing(out: Path) -> None:
    # The native guard under the Python one: collect() reached from inside itself (user code
    # run while it holds its mutex) returns None instead of waiting for itself.
    r = run_script(
        f"""
        import json, cirron_otel as ci
        from cirron_otel import _native
        ci.profile(output_dir={str(out)!r}, flush_interval=0.05, install_signal_handlers=False)
        got = []

        class Collects:
            def __str__(self):
                got.append(_native.drain())
                return "collects"

        ci.mark("evil", 1, obj=Collects())
        ok1 = ci.flush(timeout=10)
        ci.mark("after", 2)
        ok2 = ci.flush(timeout=10)
        ci.shutdown()
        print(json.dumps({{"ok": [ok1, ok2], "got": got}}))
        """,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"ok": [True, True], "got": [None]}
    _, marks = spans_and_marks(out)
    assert sorted(m["name"] for m in marks) == ["after", "evil"]
