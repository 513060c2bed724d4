"""Cirron scopes and OpenTelemetry spans in one context, both ways, per thread and task."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import urllib.request

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Status, StatusCode

import cirron_otel as ci
from tests.support.helpers import spans_and_marks
from tests.support.otlp_receivers import GrpcReceiver, SpanDict

STATUS_ERROR = 2


@pytest.fixture
def provider(out):
    """A private SDK provider (never the global one: tests must not leak it)."""
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    ci.profile(output_dir=str(out), install_signal_handlers=False, tracer_provider=tp)
    yield tp.get_tracer("test"), exporter
    ci.shutdown()


def _spool_id(ctx) -> str:
    """The spool id of a foreign OpenTelemetry span: span id + first half of the trace id."""
    return f"{ctx.span_id:016x}{ctx.trace_id >> 64:016x}"


def test_get_current_span_and_inject_see_the_scope(provider):
    with ci.scope("step") as s:
        ctx = trace.get_current_span().get_span_context()
        assert ctx.span_id == s.span_id_int
        assert f"{ctx.trace_id:032x}" == s.trace_id
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        assert carrier["traceparent"] == f"00-{s.trace_id}-{s.id[:16]}-01"
    assert not trace.get_current_span().get_span_context().is_valid


def test_otel_span_inside_scope_and_scope_inside_otel_span(provider, out):
    tracer, _ = provider
    with tracer.start_as_current_span("otel-outer") as outer, ci.scope("cirron-mid") as mid:
        with tracer.start_as_current_span("otel-inner") as inner, ci.scope("cirron-deep") as deep:
            ci.mark("m", 1)
        with ci.scope("cirron-sibling") as sib:
            pass
    oc, ic = outer.get_span_context(), inner.get_span_context()
    assert mid.parent_id == _spool_id(oc) and mid.trace_id == f"{oc.trace_id:032x}"
    assert inner.parent.span_id == mid.span_id_int
    assert ic.trace_id == oc.trace_id
    assert deep.parent_id == _spool_id(ic)
    assert sib.parent_id == mid.id  # the OTel span ended: the scope is innermost again
    ci.flush()
    spans = {s["name"]: s for s in spans_and_marks(out)[0]}
    assert spans["cirron-deep"]["parent_id"] == _spool_id(ic)
    assert spans["cirron-deep"]["trace_id"] == f"{oc.trace_id:032x}"


def test_any_interleaving_to_depth(provider):
    tracer, _ = provider
    expected_parent = None
    with contextlib.ExitStack() as stack:
        for level in range(40):
            if level % 3 == 1:
                span = stack.enter_context(tracer.start_as_current_span(f"o{level}"))
                parent = span.parent.span_id
            else:
                scope = stack.enter_context(ci.scope(f"c{level}"))
                parent = int(scope.parent_id[:16], 16)
            if expected_parent is not None:
                assert parent == expected_parent, level
            expected_parent = trace.get_current_span().get_span_context().span_id
    assert ci.current_scope() is None
    assert not trace.get_current_span().get_span_context().is_valid


def test_per_task_and_per_thread(provider):
    tracer, _ = provider
    seen: dict[str, tuple[int, int]] = {}

    async def task(tag: str) -> None:
        with tracer.start_as_current_span(f"req-{tag}") as req:
            await asyncio.sleep(0.001)
            with ci.scope(f"work-{tag}") as w:
                await asyncio.sleep(0.001)
                assert trace.get_current_span().get_span_context().span_id == w.span_id_int
                seen[tag] = (int(w.parent_id[:16], 16), req.get_span_context().span_id)

    async def main() -> None:
        await asyncio.gather(*(task(t) for t in "abcd"))

    asyncio.run(main())
    assert all(parent == req for parent, req in seen.values()) and len(seen) == 4

    def in_thread() -> None:
        assert not trace.get_current_span().get_span_context().is_valid
        with ci.scope("t") as s:
            seen["thread"] = (trace.get_current_span().get_span_context().span_id, s.span_id_int)

    with ci.scope("main"):
        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
    assert seen["thread"][0] == seen["thread"][1]


def test_scope_span_decorates_the_scope(provider, out):
    with ci.scope("handler") as s:
        span = trace.get_current_span()
        assert span.is_recording()
        span.set_attribute("http.route", "/items")
        span.add_event("cache-miss", {"key": "k1"})
    assert not span.is_recording()
    ci.flush()
    spans, marks = spans_and_marks(out)
    handler = next(x for x in spans if x["name"] == "handler")
    assert handler["attrs"]["http.route"] == "/items"
    (event,) = [m for m in marks if m["name"] == "cache-miss"]
    assert event["span_id"] == s.id and event["attrs"] == {"key": "k1"}


def test_set_status_on_the_current_span_marks_the_scope_failed_in_the_spool(provider, out):
    with ci.scope("rejected") as rejected:
        trace.get_current_span().set_status(Status(StatusCode.ERROR, "bad input"))
    with ci.scope("bare") as bare:
        trace.get_current_span().set_status(StatusCode.ERROR)
    with ci.scope("fine") as fine:
        trace.get_current_span().set_status(Status(StatusCode.OK))
    with ci.scope("outer", phase="eval") as outer:
        span = trace.get_current_span()
    span.set_status(Status(StatusCode.ERROR, "too late"))  # the scope is closed: nothing changes
    ci.flush()
    spans = {s["id"]: s for s in spans_and_marks(out)[0]}
    assert spans[rejected.id]["attrs"] == {"error": True, "error.message": "bad input"}
    assert spans[bare.id]["attrs"] == {"error": True}
    assert spans[fine.id]["attrs"] == {}
    assert spans[outer.id]["attrs"] == {"phase": "eval"}


def test_record_exception_on_the_current_span_is_an_exception_event_in_the_spool(provider, out):
    """As in OpenTelemetry's SDK: record_exception adds an `exception` event (here a point mark
    on the scope) and leaves the status alone; set_status(ERROR) is what marks the span failed."""

    class Boom(Exception):
        pass

    error = Boom("é" * 300)
    with ci.scope("recorded") as recorded:
        trace.get_current_span().record_exception(error, {"retry": 2})  # handled: the scope goes on
        ci.mark("after", 1)
    with contextlib.suppress(Boom), ci.scope("raised") as raised:
        raise error
    ci.flush()
    spans, marks = spans_and_marks(out)
    by_id = {s["id"]: s for s in spans}
    assert "error" not in by_id[recorded.id]["attrs"]  # the status was not set
    (event,) = [m for m in marks if m["name"] == "exception"]
    assert event["span_id"] == recorded.id and event["kind"] == "point"
    assert event["id"] in by_id[recorded.id]["mark_ids"]
    # named as the exception that closes a scope is named; the full message in the attribute
    assert event["attrs"]["exception.type"] == by_id[raised.id]["attrs"]["error.type"]
    assert event["attrs"]["exception.type"].endswith("Boom") and "." in event["attrs"]["exception.type"]
    assert event["attrs"]["exception.message"] == str(error)
    assert "Boom" in event["attrs"]["exception.stacktrace"]
    assert event["attrs"]["retry"] == 2
    assert len(event["value"].encode()) <= 256  # the mark value keeps the string cap
    assert [m["span_id"] for m in marks if m["name"] == "after"] == [recorded.id]


def _exported(out, receiver: GrpcReceiver) -> dict[str, SpanDict]:
    """Shut down; every span the spool holds, as the receiver got it, by OTLP span id."""
    ci.shutdown()
    spans = spans_and_marks(out)[0]
    return {s["span_id"]: s for s in receiver.wait_for_spans(len(spans))}


def _profile_to(out, receiver: GrpcReceiver) -> None:
    ci.profile(
        output_dir=str(out),
        otlp_endpoint=receiver.endpoint,
        otlp_protocol="grpc",
        flush_interval=0.05,
        install_signal_handlers=False,
        tracer_provider=None,
    )


def test_set_status_on_the_current_span_reaches_the_exported_span(out, grpc_receiver):
    _profile_to(out, grpc_receiver)
    with contextlib.suppress(ValueError), ci.scope("raised") as raised:
        raise ValueError("boom")
    with ci.scope("rejected") as rejected:
        trace.get_current_span().set_status(Status(StatusCode.ERROR, "bad input"))
    exported = _exported(out, grpc_receiver)
    # control: what the mapping does for a scope an exception closed
    assert exported[raised.id[:16]]["status"] == {"code": STATUS_ERROR, "message": "boom"}
    assert exported[rejected.id[:16]]["status"] == {"code": STATUS_ERROR, "message": "bad input"}


def test_record_exception_on_the_current_span_reaches_the_exported_span(out, grpc_receiver):
    _profile_to(out, grpc_receiver)
    with ci.scope("recorded") as recorded:
        trace.get_current_span().record_exception(KeyError("k"))
    exported = _exported(out, grpc_receiver)[recorded.id[:16]]
    events = [e for e in exported["events"] if e["name"] == "exception"]
    assert len(events) == 1
    assert events[0]["attributes"]["exception.type"] == "KeyError"
    assert events[0]["attributes"]["exception.message"] == "'k'"
    assert "KeyError" in events[0]["attributes"]["exception.stacktrace"]
    assert exported["status"]["code"] != STATUS_ERROR  # as in the SDK: recording is not failing


def test_scope_under_unsampled_parent_is_marked_unsampled(out):
    tp = TracerProvider(sampler=ALWAYS_OFF)
    ci.profile(output_dir=str(out), install_signal_handlers=False, tracer_provider=None)
    with tp.get_tracer("t").start_as_current_span("dropped"), ci.scope("child") as child:
        assert child.sampled is False
        with ci.scope("grandchild") as gc:
            assert gc.sampled is False
    with ci.scope("free") as free:
        assert free.sampled is True
    ci.shutdown()
    names = {s["name"] for s in spans_and_marks(out)[0]}
    assert {"child", "grandchild", "free"} <= names  # the spool keeps everything


def test_otel_context_false_ignores_otel_spans(out):
    tp = TracerProvider()
    ci.profile(output_dir=str(out), install_signal_handlers=False, otel_context=False, tracer_provider=None)
    session = ci._native.session()
    with tp.get_tracer("t").start_as_current_span("outer"), ci.scope("s") as s:
        assert s.parent_id == session.id
    assert ci.health()["otel_context"] is False


SERVER = """
import json, sys, http.server
from opentelemetry import propagate, trace
import cirron_otel as ci
ci.profile(output_dir=sys.argv[1], install_signal_handlers=False)

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ctx = propagate.extract({k.lower(): v for k, v in self.headers.items()})
        token = __import__("opentelemetry.context", fromlist=["attach"]).attach(ctx)
        try:
            with ci.scope("server-handler") as s:
                body = json.dumps({"id": s.id, "parent_id": s.parent_id, "trace_id": s.trace_id}).encode()
        finally:
            __import__("opentelemetry.context", fromlist=["detach"]).detach(token)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

srv = http.server.HTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.handle_request()
ci.shutdown()
"""


def test_traceparent_continues_the_trace_in_another_process(provider, tmp_path):
    server_out = tmp_path / "server"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SERVER), str(server_out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        port = int(proc.stdout.readline())
        with ci.scope("client-call") as client:
            headers: dict[str, str] = {}
            propagate.inject(headers)
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as resp:
                remote = json.loads(resp.read())
    finally:
        proc.wait(timeout=20)
    assert remote["trace_id"] == client.trace_id
    assert remote["parent_id"] == client.id[:16] + client.trace_id[:16]
    spans = {s["name"]: s for s in spans_and_marks(server_out)[0]}
    assert spans["server-handler"]["trace_id"] == client.trace_id
