"""OTLP export (the mapping and the exporters): what the spool holds arrives over OTLP.

Every test runs a real in-process OTLP receiver (gRPC or HTTP/protobuf, see support/otlp_receivers.py),
profiles a small workload with both sinks on (unless the test is about sink selection), shuts
the profiler down and compares the decoded `ExportTraceServiceRequest`s with the spool.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cirron_otel.exporters.otlp import BACKOFF_BASE, BACKOFF_CAP
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import cirron_otel as ci
from tests.support.helpers import run_script, spans_and_marks
from tests.support.otlp import Receiver, protocol, start
from tests.support.otlp_receivers import GrpcReceiver, HttpReceiver, SpanDict, decode_spans

_FRAMEWORK_KEYS = ("framework", "mixed_precision", "cuda_count")  # the session span's, when found


@pytest.fixture(autouse=True)
def _clean_env(clean_env: None) -> None:
    """No OTEL_*, CIRRON_* or rank variable of the calling environment leaks into these tests."""


Record = dict[str, Any]

NAN, INF = float("nan"), float("inf")
SPAN_KIND_INTERNAL = 1
STATUS_UNSET, STATUS_ERROR = 0, 2
OUTBOX = "otlp-outbox"

# Export failures provoked on purpose warn once (CirronWarning); they are asserted via health().
pytestmark = pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning")


# -- fixtures and helpers -------------------------------------------------------------------


def otlp_health() -> Record:
    return ci.health()["sinks"]["otlp"]


def finish(out: Path, receiver: Receiver) -> tuple[list[Record], list[Record], list[SpanDict]]:
    """Shut down, then return (spool spans, spool marks, OTLP spans) once all spool spans arrived."""
    ci.shutdown()
    spans, marks = spans_and_marks(out)
    assert spans, "the spool holds no span"
    received = receiver.wait_for_spans(len(spans))
    return spans, marks, received


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def otel_id(spool_id: str) -> str:
    """The OTLP span id of a spool span: the first 16 hex digits of its 32-hex id."""
    return spool_id[:16]


def by_otel_id(received: list[SpanDict]) -> dict[str, SpanDict]:
    table = {s["span_id"]: s for s in received}
    assert len(table) == len(received), "a span id arrived twice"
    return table


def one(spans: list[Record], name: str) -> Record:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, f"{len(found)} spool spans named {name!r}"
    return found[0]


def mark_value(mark: Record) -> Any:
    """A spool mark's value as the Python value OTLP must carry (non-finite floats included)."""
    if mark.get("value_nonfinite"):
        return float(mark["value_nonfinite"])
    return mark["value"]


def norm(value: Any) -> Any:
    """Comparable form of a decoded OTLP value: keeps the type (1 != 1.0 != True) and NaN == NaN."""
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    if isinstance(value, list):
        return ("list", tuple(norm(v) for v in value))
    return (type(value).__name__, value)


def norm_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: norm(v) for k, v in attrs.items()}


def session_of(spans: list[Record]) -> Record:
    return one(spans, "cirron.session")


# -- 1. round trip --------------------------------------------------------------------------

CFG = {"lr": 0.1, "layers": [64, 32]}
MIXED = [1, "a"]
NESTED = [[1], [2]]
FORWARD_ATTRS = dict(
    variant="fp16",
    n=3,
    f=1.5,
    ok=True,
    tags=["a", "b"],
    sizes=[1, 2],
    pair=(3, 4),
    cfg=CFG,
    mixed=MIXED,
    nested=NESTED,
    huge=2**70,
)
# What OTLP must carry: values an attribute can hold as they are, anything else as its str().
FORWARD_OTLP = dict(
    variant="fp16",
    n=3,
    f=1.5,
    ok=True,
    tags=["a", "b"],
    sizes=[1, 2],
    pair=[3, 4],
    cfg=str(CFG),
    mixed=str(MIXED),
    nested=str(NESTED),
    huge=str(2**70),
    late="set-later",
)
POINT_VALUES: list[tuple[str, Any]] = [
    ("f", 0.25),
    ("i", -7),
    ("big", 2**62),
    ("s", "text"),
    ("b", True),
    ("b0", False),
    ("nan", NAN),
    ("inf", INF),
    ("ninf", -INF),
]


def round_trip_workload() -> None:
    ci.mark("sess_point", 2.5, tag="on-session")
    ci.mark("sess_summary", 7, kind="summary")
    for epoch in ci.epochs(range(2)):
        for step in ci.batches(range(2)):
            with ci.scope("forward", **FORWARD_ATTRS) as handle:
                handle.attrs["late"] = "set-later"  # attrs stay mutable until the scope closes
                for name, value in POINT_VALUES:
                    ci.mark(name, value)
                ci.mark("loss", 0.5 + step, step=step, phase="train", good=True, w=0.5)
                ci.mark("acc", 0.5, kind="summary")
                ci.mark("acc", 0.75 + epoch, kind="summary", src="val")  # the last one wins
        ci.mark("epoch_loss", 1.0 / (epoch + 1), kind="summary")
    with pytest.raises(ValueError, match="boom"), ci.scope("bad", phase="eval"):
        ci.mark("before_error", 1)
        raise ValueError("boom")


def test_round_trip_every_spool_span_and_mark_arrives_as_the_mapping_says(out: Path, receiver: Receiver):
    ci.mark("early", 1)  # before profile(): attached to "root", spool only
    start(out, receiver, session_attrs={"run": "r1"})
    round_trip_workload()
    spans, marks, received = finish(out, receiver)

    # every spool span arrived exactly once, with the span id the mapping gives it
    assert sorted(s["span_id"] for s in received) == sorted(otel_id(s["id"]) for s in spans)
    table = by_otel_id(received)
    session = session_of(spans)
    own_attrs: dict[str, Record] = {
        "forward": FORWARD_OTLP,
        # a failed scope: status ERROR + error.type over OTLP (the spool keeps error, error.message)
        "bad": {"phase": "eval", "error.type": "ValueError"},
        # cirron-sdk's session attributes, then the caller's session_attrs
        "cirron.session": {"pid": os.getpid(), "rank": 0, "device": "cpu", "run": "r1"},
        "epoch": {},
        "batch": {},
    }
    assert {s["name"] for s in spans} == set(own_attrs)
    assert one(spans, "bad")["attrs"] == {
        "phase": "eval",
        "error": True,
        "error.type": "ValueError",
        "error.message": "boom",
    }
    assert len([s for s in spans if s["name"] == "forward"]) == 4

    for s in spans:
        o = table[otel_id(s["id"])]
        where = f"span {s['name']} {s['id']}"
        assert o["trace_id"] == s["trace_id"], where
        assert (o["start_ns"], o["end_ns"]) == (s["start_ns"], s["end_ns"]), where
        assert o["name"] == s["name"], where
        assert o["kind"] == SPAN_KIND_INTERNAL, where
        # parents and links (trace_per="child"): the session is a root; each direct child of it
        # roots a trace of its own, linked to the session span; deeper spans name their parent
        if s["id"] == session["id"]:
            assert (o["parent_span_id"], o["links"]) == ("", []), where
        elif s["parent_id"] == session["id"]:
            assert o["parent_span_id"] == "", where
            assert o["trace_id"] != session["trace_id"], where
            assert o["links"] == [
                {
                    "trace_id": session["trace_id"],
                    "span_id": otel_id(session["id"]),
                    "attributes": {"cirron.link": "session"},
                    "dropped_attributes_count": 0,
                }
            ], where
        else:
            parent = table[otel_id(s["parent_id"])]
            assert o["parent_span_id"] == parent["span_id"], where
            assert o["trace_id"] == parent["trace_id"], where
            assert o["links"] == [], where
        assert o["dropped_links_count"] == 0, where
        # attributes: the scope's own, then cirron.*, then the summaries (last of a name wins)
        expected: Record = dict(own_attrs[s["name"]])
        if s["name"] == "cirron.session":
            # what this environment has installed and imported (torch, in .ci/run's run), as
            # the spool recorded it: these keys are cirron-sdk's (tests/compat checks them)
            expected.update({k: v for k, v in s["attrs"].items() if k in _FRAMEWORK_KEYS})
        if s["index"] is not None:
            expected["cirron.index"] = s["index"]
        expected["cirron.span_id"] = s["id"]
        expected["thread.id"] = s["thread_id"]
        expected["thread.name"] = threading.main_thread().name
        expected["cirron.rank"] = s["rank"]
        if s["parent_id"] == session["id"]:
            expected["cirron.session.id"] = session["id"]
        own_marks = [m for m in marks if m["span_id"] == s["id"]]
        assert sorted(m["id"] for m in own_marks) == sorted(s["mark_ids"]), where
        for m in own_marks:
            if m["kind"] == "summary":
                expected[f"cirron.summary.{m['name']}"] = mark_value(m)
        assert norm_attrs(o["attributes"]) == norm_attrs(expected), where
        assert o["dropped_attributes_count"] == 0 and o["dropped_events_count"] == 0, where
        # point marks: one event each, in recording order, typed value, id and attrs
        events = [e for e in o["events"] if e["name"] != "exception"]
        want_events = [
            (
                m["name"],
                m["ts_ns"],
                norm_attrs(
                    {
                        "cirron.mark.value": mark_value(m),
                        "cirron.mark.id": m["id"],
                        "cirron.mark.kind": "point",
                        **m["attrs"],
                    }
                ),
            )
            for m in own_marks
            if m["kind"] == "point"
        ]
        assert [(e["name"], e["time_ns"], norm_attrs(e["attributes"])) for e in events] == want_events, where
        if s["name"] == "bad":
            assert o["status"] == {"code": STATUS_ERROR, "message": "boom"}
            exc = [e for e in o["events"] if e["name"] == "exception"]
            assert len(exc) == 1
            attrs = exc[0]["attributes"]
            assert attrs["exception.type"] == "ValueError"
            assert attrs["exception.message"] == "boom"
            assert attrs["exception.stacktrace"].startswith("Traceback (most recent call last):")
            assert 'raise ValueError("boom")' in attrs["exception.stacktrace"]
            assert attrs["exception.stacktrace"].rstrip().endswith("ValueError: boom")
            assert s["start_ns"] <= exc[0]["time_ns"] <= s["end_ns"]
        else:
            assert o["status"]["code"] == STATUS_UNSET, where
            assert all(e["name"] != "exception" for e in o["events"]), where

    # the values of every type really are typed on the wire (not all strings or doubles)
    first_forward = min((s for s in spans if s["name"] == "forward"), key=lambda s: s["start_ns"])
    forward = table[otel_id(first_forward["id"])]
    values = {e["name"]: e["attributes"]["cirron.mark.value"] for e in forward["events"]}
    assert type(values["f"]) is float and values["f"] == 0.25
    assert type(values["i"]) is int and values["i"] == -7
    assert type(values["big"]) is int and values["big"] == 2**62
    assert type(values["s"]) is str and values["s"] == "text"
    assert values["b"] is True and values["b0"] is False
    assert math.isnan(values["nan"]) and values["inf"] == INF and values["ninf"] == -INF
    assert forward["attributes"]["cirron.summary.acc"] == 0.75  # epoch 0: the second of 0.5, 0.75

    # both summaries of a name stay in the spool, with their ids and attrs
    accs = [m for m in marks if m["span_id"] == first_forward["id"] and m["name"] == "acc"]
    assert [(m["kind"], m["value"], m["attrs"]) for m in accs] == [
        ("summary", 0.5, {}),
        ("summary", 0.75, {"src": "val"}),
    ]
    assert len({m["id"] for m in accs}) == 2

    # marks on the session root land on cirron.session; "root" marks are spool-only, counted
    sess = table[otel_id(session["id"])]
    assert [e["name"] for e in sess["events"]] == ["sess_point"]
    assert sess["attributes"]["cirron.summary.sess_summary"] == 7
    root_marks = [m for m in marks if m["span_id"] == "root"]
    assert "early" in [m["name"] for m in root_marks]
    exported_ids = Counter(e["attributes"].get("cirron.mark.id") for o in received for e in o["events"])
    for m in marks:
        if m["kind"] == "point" and m["span_id"] != "root":
            assert exported_ids[m["id"]] == 1, m
        else:
            assert exported_ids[m["id"]] == 0, m
    health = otlp_health()
    assert health["root_marks"] == len(root_marks) >= 1
    assert health["exported"] == len(spans)
    assert (health["pending"], health["failed"], health["dropped"]) == (0, 0, 0)
    assert health["last_error"] is None


def test_cpu_time_when_measured(out: Path, grpc_receiver: GrpcReceiver):
    start(out, grpc_receiver, capture_cpu_time=True)
    with ci.scope("busy"):
        sum(i * i for i in range(20000))
    spans, _, received = finish(out, grpc_receiver)
    table = by_otel_id(received)
    busy = one(spans, "busy")
    assert isinstance(busy["cpu_ns"], int) and busy["cpu_ns"] > 0
    for s in spans:
        assert table[otel_id(s["id"])]["attributes"].get("cirron.cpu_ns") == s["cpu_ns"], s["name"]


# -- 2. trace shape -------------------------------------------------------------------------


def _nested_workload() -> None:
    for _ in ci.epochs(range(3)):
        for _ in ci.batches(range(2)):
            with ci.scope("forward"):
                pass

    def other_thread() -> None:
        with ci.scope("worker"), ci.scope("worker_step"):
            pass

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()


def test_default_trace_per_child_every_direct_child_of_the_session_starts_a_linked_trace(
    out: Path, receiver: Receiver
):
    start(out, receiver)
    _nested_workload()
    spans, _, received = finish(out, receiver)
    table = by_otel_id(received)
    spool = {s["id"]: s for s in spans}
    session = session_of(spans)
    sess = table[otel_id(session["id"])]
    assert sess["parent_span_id"] == "" and sess["trace_id"] == session["trace_id"]
    assert sess["links"] == []

    children = [s for s in spans if s["parent_id"] == session["id"]]
    assert sorted(s["name"] for s in children) == ["epoch", "epoch", "epoch", "worker"]
    child_traces = set()
    for child in children:
        o = table[otel_id(child["id"])]
        assert o["parent_span_id"] == "", child["name"]
        assert o["trace_id"] == child["trace_id"] != session["trace_id"]
        child_traces.add(o["trace_id"])
        assert [(lk["trace_id"], lk["span_id"]) for lk in o["links"]] == [
            (session["trace_id"], otel_id(session["id"]))
        ]
        assert o["attributes"]["cirron.session.id"] == session["id"]
    assert len(child_traces) == len(children), "each direct child has a trace of its own"

    # grandchildren (and deeper) share their top-level ancestor's trace, with parent span ids
    for s in spans:
        if s["id"] == session["id"] or s["parent_id"] == session["id"]:
            continue
        o = table[otel_id(s["id"])]
        parent = spool[s["parent_id"]]
        assert o["parent_span_id"] == otel_id(parent["id"]), s["name"]
        assert o["trace_id"] == parent["trace_id"] == s["trace_id"], s["name"]
        assert o["links"] == [] and "cirron.session.id" not in o["attributes"], s["name"]
    assert len([s for s in spans if s["name"] == "forward"]) == 6


def test_an_inference_request_is_a_root_in_the_spool_and_a_linked_trace_of_its_own(
    out: Path, receiver: Receiver
):
    # As cirron-sdk's: the request span is a root (parent_id null) in the spool; in
    # OpenTelemetry it starts a trace linked to the session, even with trace_per="session".
    start(out, receiver, trace_per="session")

    @ci.inference
    def complete(prompt: str) -> dict[str, Any]:
        with ci.scope("tokenize"):
            ci.mark("prompt_len", len(prompt))
        return {"usage": {"prompt_tokens": 3, "completion_tokens": 5}}

    with ci.scope("outer") as outer:
        complete("hello")
    assert outer.parent_id is not None
    spans, marks, received = finish(out, receiver)
    table = by_otel_id(received)
    session = session_of(spans)
    (request,) = [s for s in spans if s["name"] == "request"]
    (tokenize,) = [s for s in spans if s["name"] == "tokenize"]
    assert request["parent_id"] is None and tokenize["parent_id"] == request["id"]
    assert [m["span_id"] for m in marks if m["name"] == "prompt_len"] == [tokenize["id"]]
    o = table[otel_id(request["id"])]
    assert o["parent_span_id"] == "" and o["trace_id"] == request["trace_id"] != session["trace_id"]
    assert [(lk["trace_id"], lk["span_id"]) for lk in o["links"]] == [
        (session["trace_id"], otel_id(session["id"]))
    ]
    assert o["attributes"]["cirron.session.id"] == session["id"]
    t = table[otel_id(tokenize["id"])]
    assert t["parent_span_id"] == otel_id(request["id"]) and t["trace_id"] == o["trace_id"]
    # the caller's scope is untouched, in the session's trace
    assert table[otel_id(outer.id)]["trace_id"] == session["trace_id"]


def test_an_inference_request_under_a_services_otel_span_is_its_child(out: Path, receiver: Receiver):
    provider = TracerProvider()  # the test's own, not the global one
    tracer = provider.get_tracer("app")
    start(out, receiver)

    @ci.inference
    def complete(prompt: str) -> dict[str, Any]:
        return {"usage": {"prompt_tokens": 3, "completion_tokens": 5}}

    with tracer.start_as_current_span("POST /complete") as http:
        complete("hello")
    spans, _, received = finish(out, receiver)
    (request,) = [s for s in spans if s["name"] == "request"]
    o = by_otel_id(received)[otel_id(request["id"])]
    ctx = http.get_span_context()
    assert o["trace_id"] == f"{ctx.trace_id:032x}" and o["parent_span_id"] == f"{ctx.span_id:016x}"
    assert o["links"] == []


def test_trace_per_session_keeps_everything_in_one_trace(out: Path, receiver: Receiver):
    start(out, receiver, trace_per="session")
    _nested_workload()
    spans, _, received = finish(out, receiver)
    table = by_otel_id(received)
    session = session_of(spans)
    assert len(spans) == 1 + 3 + 6 + 6 + 2
    for s in spans:
        o = table[otel_id(s["id"])]
        assert o["trace_id"] == s["trace_id"] == session["trace_id"], s["name"]
        if s["id"] == session["id"]:
            assert o["parent_span_id"] == ""
        else:
            assert o["parent_span_id"] == otel_id(s["parent_id"]), s["name"]
            assert "cirron.session.id" not in o["attributes"], s["name"]


def test_scope_inside_an_otel_sdk_span_joins_that_trace_and_an_sdk_span_inside_a_scope_is_its_child(
    out: Path, receiver: Receiver
):
    memory = InMemorySpanExporter()
    provider = TracerProvider()  # the test's own, not the global one
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("app")
    start(out, receiver)
    with (
        tracer.start_as_current_span("request") as request,
        ci.scope("handler") as handler,
        ci.scope("inner"),
        tracer.start_as_current_span("db"),
        ci.scope("in_db"),
    ):
        pass
    with ci.scope("epoch_like"):  # outside the OTel span again: a fresh trace per child
        pass
    spans, _, received = finish(out, receiver)
    table = by_otel_id(received)
    ctx = request.get_span_context()
    trace_hex, span_hex = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"

    handler_rec = one(spans, "handler")
    assert handler.id == handler_rec["id"]
    assert handler_rec["parent_id"] == span_hex + trace_hex[:16]
    assert handler_rec["trace_id"] == trace_hex
    o = table[otel_id(handler_rec["id"])]
    assert (o["trace_id"], o["parent_span_id"]) == (trace_hex, span_hex)

    inner = one(spans, "inner")
    o = table[otel_id(inner["id"])]
    assert (o["trace_id"], o["parent_span_id"]) == (trace_hex, otel_id(handler_rec["id"]))

    (db,) = [s for s in memory.get_finished_spans() if s.name == "db"]
    assert db.context is not None and db.parent is not None
    assert db.context.trace_id == ctx.trace_id
    assert f"{db.parent.span_id:016x}" == otel_id(inner["id"])
    in_db = one(spans, "in_db")
    o = table[otel_id(in_db["id"])]
    assert (o["trace_id"], o["parent_span_id"]) == (trace_hex, f"{db.context.span_id:016x}")
    assert in_db["parent_id"] == f"{db.context.span_id:016x}" + trace_hex[:16]

    other = table[otel_id(one(spans, "epoch_like")["id"])]
    assert other["trace_id"] != trace_hex and other["parent_span_id"] == ""


# -- 3. sampling ----------------------------------------------------------------------------


def _unsampled_parent_always_off() -> Any:
    return TracerProvider(sampler=ALWAYS_OFF).get_tracer("app").start_as_current_span("unsampled")


def _unsampled_parent_non_recording() -> Any:
    ctx = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.DEFAULT),
    )
    return trace.use_span(NonRecordingSpan(ctx), end_on_exit=False)


@pytest.mark.parametrize(
    "parent",
    [_unsampled_parent_always_off, _unsampled_parent_non_recording],
    ids=["always_off", "non_recording"],
)
def test_scope_under_unsampled_otel_parent_is_spool_only(
    out: Path, receiver: Receiver, parent: Callable[[], Any]
):
    start(out, receiver)
    with parent() as otel_span, ci.scope("hidden") as hidden:
        ci.mark("hidden_mark", 1)
        ci.mark("hidden_summary", 2, kind="summary")
        with ci.scope("hidden_child"):
            ci.mark("hidden_child_mark", 2.0)
    with ci.scope("visible"):
        ci.mark("visible_mark", 3)
    ci.shutdown()
    spans, marks = spans_and_marks(out)
    names = {s["name"] for s in spans}
    assert {"hidden", "hidden_child", "visible", "cirron.session"} <= names
    mark_names = {m["name"] for m in marks}
    assert {"hidden_mark", "hidden_summary", "hidden_child_mark", "visible_mark"} <= mark_names
    ctx = otel_span.get_span_context()
    assert not ctx.trace_flags.sampled
    trace_hex = f"{ctx.trace_id:032x}"
    assert one(spans, "hidden")["trace_id"] == trace_hex == one(spans, "hidden_child")["trace_id"]
    assert hidden.id == one(spans, "hidden")["id"]

    received = receiver.wait_for_spans(len(spans) - 2)
    assert sorted(s["name"] for s in received) == ["cirron.session", "visible"]
    assert all(e["name"] == "visible_mark" for s in received for e in s["events"])
    health = otlp_health()
    assert health["unsampled_spans"] == 2
    assert health["exported"] == len(spans) - 2
    assert health["pending"] == 0
    assert receiver.span_count() == len(spans) - 2  # nothing else came later


# -- 4. resource and instrumentation scope ---------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "env", "expected"),
    [
        ("from-arg", "from-env", "from-arg"),
        (None, "from-env", "from-env"),
        (None, None, "cirron"),
    ],
)
def test_resource_and_instrumentation_scope(
    out: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    arg: str | None,
    env: str | None,
    expected: str,
):
    if env is not None:
        monkeypatch.setenv("OTEL_SERVICE_NAME", env)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci,team=ml")
    monkeypatch.setenv("RANK", "3")
    start(out, receiver, service_name=arg)
    with ci.scope("work"):
        pass
    spans, _, received = finish(out, receiver)
    assert len(received) == len(spans) == 2
    for o in received:
        r = o["resource"]
        assert r["service.name"] == expected
        assert r["deployment.environment"] == "ci" and r["team"] == "ml"
        assert r["process.pid"] == os.getpid()
        assert r["host.name"] == socket.gethostname()
        assert r["cirron.rank"] == 3
        # what encoded the spans: this package, not the OpenTelemetry SDK (test_semconv.py)
        assert r["telemetry.sdk.name"] == "cirron_otel"
        assert r["telemetry.sdk.language"] == "python"
        assert r["telemetry.sdk.version"] == r["telemetry.distro.version"] == ci.__version__
        assert r["telemetry.distro.name"] == "cirron-otel"
        assert o["scope"] == {"name": "cirron_otel", "version": ci.__version__}
        assert o["attributes"]["cirron.rank"] == 3
    assert {s["rank"] for s in spans} == {3}


# -- 5. span limits ------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["one_batch", "across_batches"])
def test_event_count_limit_keeps_the_last_events_and_counts_the_dropped(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, split: bool
):
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "5")
    start(out, receiver)
    with ci.scope("busy") as busy:
        for i in range(12):
            ci.mark("m", i)
            if split and i in (3, 8):
                assert ci.flush()  # the open span's marks reach the encoder in several batches
    with ci.scope("quiet"):
        for i in range(5):
            ci.mark("q", i)
    spans, marks, received = finish(out, receiver)
    assert len([m for m in marks if m["span_id"] == busy.id]) == 12  # the spool keeps every mark
    o = by_otel_id(received)[otel_id(busy.id)]
    assert [e["attributes"]["cirron.mark.value"] for e in o["events"]] == [7, 8, 9, 10, 11]
    assert o["dropped_events_count"] == 7
    q = by_otel_id(received)[otel_id(one(spans, "quiet")["id"])]
    assert len(q["events"]) == 5 and q["dropped_events_count"] == 0
    assert otlp_health()["events_dropped"] == 7


@pytest.mark.parametrize(
    "limits",
    [{}, {"OTEL_SPAN_LINK_COUNT_LIMIT": "0"}, {"OTEL_LINK_ATTRIBUTE_COUNT_LIMIT": "0"}],
    ids=["default", "links", "attrs"],
)
def test_link_limits_of_zero_drop_the_session_link_or_its_attribute(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch, limits: dict[str, str]
):
    for key, value in limits.items():
        monkeypatch.setenv(key, value)
    start(out, grpc_receiver)  # trace_per="child": the epoch links to the session span
    with ci.scope("epoch") as epoch:
        pass
    _, _, received = finish(out, grpc_receiver)
    o = by_otel_id(received)[otel_id(epoch.id)]
    if "OTEL_SPAN_LINK_COUNT_LIMIT" in limits:
        assert o["links"] == [] and o["dropped_links_count"] == 1
        return
    (link,) = o["links"]
    assert o["dropped_links_count"] == 0
    if "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT" in limits:
        assert link["attributes"] == {} and link["dropped_attributes_count"] == 1
    else:
        assert link["attributes"] == {"cirron.link": "session"} and link["dropped_attributes_count"] == 0


def test_event_count_limit_includes_the_exception_event(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "5")
    start(out, grpc_receiver)
    with pytest.raises(KeyError), ci.scope("failing") as failing:
        for i in range(5):
            ci.mark("m", i)
        raise KeyError("k")
    _, _, received = finish(out, grpc_receiver)
    o = by_otel_id(received)[otel_id(failing.id)]
    assert [e["name"] for e in o["events"]] == ["m", "m", "m", "m", "exception"]
    assert o["dropped_events_count"] == 1


def test_attribute_count_limits_drop_and_count(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "3")
    monkeypatch.setenv("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "4")
    start(out, receiver)
    own = dict(a=1, b="two", c=3.0, d=True, e=[1, 2])
    with ci.scope("wide", **own) as wide:
        ci.mark("m", 1, x=1, y=2, z=3)
    spans, marks, received = finish(out, receiver)
    rec = one(spans, "wide")
    assert rec["attrs"] == own  # the spool keeps them all
    assert [m["attrs"] for m in marks if m["span_id"] == wide.id] == [{"x": 1, "y": 2, "z": 3}]
    full = {
        **own,
        "cirron.span_id": rec["id"],
        "thread.id": rec["thread_id"],
        "thread.name": threading.current_thread().name,
        "cirron.rank": 0,
        "cirron.session.id": session_of(spans)["id"],
    }
    o = by_otel_id(received)[otel_id(wide.id)]
    assert len(o["attributes"]) == 3
    for key, value in o["attributes"].items():
        assert norm(value) == norm(full[key]), key
    assert o["dropped_attributes_count"] == len(full) - 3
    (event,) = o["events"]
    assert len(event["attributes"]) == 4
    mark_keys = {"cirron.mark.value", "cirron.mark.kind", "cirron.mark.id"}
    assert mark_keys <= set(event["attributes"])  # the mapping's own keys come first
    assert event["attributes"]["cirron.mark.value"] == 1
    assert len(set(event["attributes"]) - mark_keys) == 1
    assert set(event["attributes"]) - mark_keys <= {"x", "y", "z"}
    # dropped_attributes_count of the event, read from the raw request
    raw = [
        e
        for req in receiver.requests
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
        if s.span_id.hex() == otel_id(wide.id)
        for e in s.events
    ]
    assert [e.dropped_attributes_count for e in raw] == [2]


def test_attribute_value_length_limit_truncates_string_attributes(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "40")  # longer than a 32-hex id
    long_text = "x" * 50
    start(out, receiver)
    with ci.scope("s", long=long_text, short="ok", words=[long_text, "y"], n=12345678901234) as s:
        ci.mark("m", 1, note=long_text)
    spans, marks, received = finish(out, receiver)
    assert one(spans, "s")["attrs"]["long"] == long_text  # the spool is not truncated
    assert [m["attrs"]["note"] for m in marks if m["name"] == "m"] == [long_text]
    o = by_otel_id(received)[otel_id(s.id)]
    assert o["attributes"]["long"] == "x" * 40
    assert o["attributes"]["short"] == "ok"
    assert o["attributes"]["words"] == ["x" * 40, "y"]
    assert o["attributes"]["n"] == 12345678901234
    assert o["attributes"]["cirron.span_id"] == s.id
    (event,) = o["events"]
    assert event["attributes"]["note"] == "x" * 40
    assert event["attributes"]["cirron.mark.id"] == next(m["id"] for m in marks if m["name"] == "m")


def test_attribute_value_length_limit_counts_characters(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "40")
    start(out, grpc_receiver)
    with ci.scope("s", text="é" * 50) as s:
        pass
    _, _, received = finish(out, grpc_receiver)
    assert by_otel_id(received)[otel_id(s.id)]["attributes"]["text"] == "é" * 40


def test_attribute_value_length_limit_applies_to_mark_values_and_exception_attributes(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "40")
    long_text = "v" * 60
    start(out, grpc_receiver)
    with pytest.raises(RuntimeError), ci.scope("s") as s:
        ci.mark("note", long_text)
        ci.mark("label", long_text, kind="summary")
        raise RuntimeError("e" * 60)
    _, _, received = finish(out, grpc_receiver)
    o = by_otel_id(received)[otel_id(s.id)]
    events = {e["name"]: e["attributes"] for e in o["events"]}
    assert events["note"]["cirron.mark.value"] == "v" * 40
    assert o["attributes"]["cirron.summary.label"] == "v" * 40
    assert events["exception"]["exception.message"] == "e" * 40
    assert len(events["exception"]["exception.stacktrace"]) == 40


# -- 6. sink selection and OTEL_EXPORTER_OTLP_* ---------------------------------------------


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_endpoint_from_the_environment_turns_on_both_sinks(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, variable: str
):
    traces_only = variable.endswith("TRACES_ENDPOINT") and isinstance(receiver, HttpReceiver)
    monkeypatch.setenv(variable, receiver.traces_url if traces_only else receiver.endpoint)  # type: ignore[union-attr]
    if isinstance(receiver, HttpReceiver):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    prof = ci.profile(
        output_dir=str(out), flush_interval=0.05, install_signal_handlers=False, tracer_provider=None
    )
    assert prof.settings.otlp_protocol == protocol(receiver)
    health = ci.health()
    assert health["otel_transport"] == "otlp"
    # marks as metrics: on with OTLP, unless only the traces have an endpoint of their own
    metrics = variable == "OTEL_EXPORTER_OTLP_ENDPOINT"
    assert set(health["sinks"]) == {"spool", "otlp"} | ({"otlp_metrics"} if metrics else set())
    with ci.scope("work"):
        ci.mark("m", 1)
    spans, _, received = finish(out, receiver)
    assert sorted(s["span_id"] for s in received) == sorted(otel_id(s["id"]) for s in spans)
    assert len(spans) == 2
    if metrics:
        (point,) = receiver.wait_for_metric_points(1, "cirron.mark.")
        assert point[0] == "cirron.mark.m" and point[1]["cirron.scope"] == "work" and point[2] == 1
    else:
        assert receiver.metric_requests == []


def test_traces_protocol_variable_beats_the_general_one(
    out: Path, http_receiver: HttpReceiver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", http_receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False, tracer_provider=None)
    with ci.scope("work"):
        pass
    spans, _, received = finish(out, http_receiver)
    assert sorted(s["span_id"] for s in received) == sorted(otel_id(s["id"]) for s in spans)


def test_without_an_endpoint_only_the_spool(out: Path):
    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False, tracer_provider=None)
    health = ci.health()
    assert health["otel_transport"] is None
    assert set(health["sinks"]) == {"spool"}
    with ci.scope("work"):
        pass
    ci.shutdown()
    spans, _ = spans_and_marks(out)
    assert len(spans) == 2
    assert not (out / OUTBOX).exists()


def test_output_otlp_alone_writes_no_spool_and_no_outbox(out: Path, receiver: Receiver):
    start(out, receiver, output="otlp")
    health = ci.health()
    assert set(health["sinks"]) == {"otlp", "otlp_metrics"}
    assert health["otel_transport"] == "otlp"
    assert health["sinks"]["otlp"]["outbox"] is None and health["sinks"]["otlp_metrics"]["outbox"] is None
    with ci.scope("work"):
        ci.mark("m", 1)
    ci.shutdown()
    received = receiver.wait_for_spans(2)
    assert sorted(s["name"] for s in received) == ["cirron.session", "work"]
    assert [e["name"] for s in received for e in s["events"]] == ["m"]
    assert [p[0] for p in receiver.wait_for_metric_points(1, "cirron.mark.")] == ["cirron.mark.m"]
    assert not (out / "spool").exists()
    assert not (out / OUTBOX).exists()
    assert otlp_health()["exported"] == 2


def test_standard_headers_arrive_at_the_receiver(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme,authorization=Bearer%20s3cret")
    start(out, receiver)
    with ci.scope("work"):
        pass
    finish(out, receiver)
    assert receiver.headers
    for headers in receiver.headers:
        assert headers["x-tenant"] == "acme"
        assert headers["authorization"] == "Bearer s3cret"


def test_gzip_compression_over_http(out: Path, http_receiver: HttpReceiver, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    start(out, http_receiver)
    with ci.scope("work"):
        ci.mark("m", 1.5)
    spans, _, received = finish(out, http_receiver)
    assert http_receiver.headers
    assert all(h.get("content-encoding") == "gzip" for h in http_receiver.headers)
    assert sorted(s["span_id"] for s in received) == sorted(otel_id(s["id"]) for s in spans)


@pytest.mark.parametrize("gzip", [False, True])
def test_gzip_compression_over_grpc(out: Path, monkeypatch: pytest.MonkeyPatch, gzip: bool):
    # A receiver that only accepts identity encoding tells a compressing client apart.
    if gzip:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
    with GrpcReceiver(accept_gzip=False) as receiver:
        start(out, receiver)
        with ci.scope("work"):
            pass
        ci.shutdown(timeout=1)
        health = otlp_health()
        if gzip:
            assert receiver.span_count() == 0
            # UNIMPLEMENTED is permanent (OTLP specification): dropped and counted, not retried forever
            assert health["failed"] >= 1 and health["exported"] == 0 and health["pending"] == 0
            assert health["dropped"] == 2 and "UNIMPLEMENTED" in health["last_error"]
        else:
            assert receiver.wait_for_spans(2)
            assert health["failed"] == 0 and health["exported"] == 2


# -- 7. outage and recovery -------------------------------------------------------------------


def _spool_ids(out: Path) -> Counter[str]:
    spans, _ = spans_and_marks(out)
    return Counter(otel_id(s["id"]) for s in spans)


def _received_ids(receiver: Receiver) -> Counter[str]:
    return Counter(s["span_id"] for s in receiver.spans())


OUTAGE_RING, OUTAGE_CHUNKS = 1024, 40


@pytest.mark.parametrize("mode", ["stopped", "failing"])
def test_outage_then_recovery_delivers_every_span_exactly_once(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, mode: str
):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")  # a failed send returns within a second
    # ring_full_wait=0: a producer whose ring is full drops the oldest record at once (counted)
    # instead of waiting, so a drop count of 0 below means no ring ever filled up: the only
    # moment a producer waits.
    start(out, receiver, ring_capacity=OUTAGE_RING, ring_full_wait=0)
    # the drop counters are the process's (earlier tests may have dropped): compare with now
    drops_before = (ci.health()["mark_drop_count"], ci.health()["span_drop_count"])
    with ci.scope("before"):
        ci.mark("m", 0)
    assert ci.flush()
    receiver.wait_for_spans(1)

    if mode == "stopped":
        receiver.stop()
    else:
        receiver.fail_next(10**6)
    with ci.scope("during", index=0):
        ci.mark("m", 1)
    ci.flush(timeout=3)
    wait_until(lambda: otlp_health()["failed"] >= 1 and otlp_health()["pending"] > 0, what="a failed export")
    health = ci.health()["sinks"]["otlp"]
    assert health["last_error"]
    assert health["pending"] >= 1

    # The program never waits on the failing sink: the collector keeps claiming every ring for
    # the spool. Chunks of a quarter ring each, OUTAGE_CHUNKS / 4 rings in all: were the OTLP
    # sink holding the pipeline back, the rings would fill (and a producer would wait).
    for i in range(OUTAGE_CHUNKS):
        with ci.scope("during", index=i + 1):  # 2 slots
            for j in range(OUTAGE_RING // 4 - 2):
                ci.mark("loss", j * 0.5)
        wait_until(
            lambda: ci.health()["records_pending"] == 0,
            timeout=10,
            what="the collector to claim the rings while the OTLP sink fails",
        )
    health = ci.health()
    assert (health["mark_drop_count"], health["span_drop_count"]) == drops_before
    assert health["records_recorded"] >= OUTAGE_CHUNKS * (OUTAGE_RING // 4 - 1)  # a scope: 1 record, 2 slots
    assert ci.flush(timeout=5) is False  # everything reached the spool, OTLP still holds spans back
    health = otlp_health()
    assert health["pending"] > 0 and health["failed"] >= 1 and health["last_error"]
    assert ci.health()["sinks"]["spool"]["pending"] == 0

    if mode == "stopped":
        receiver.start()
    else:
        receiver.fail_next(0)
    # flush() tries again at once; a gRPC channel may need one more attempt to reconnect
    wait_until(lambda: ci.flush(timeout=2), timeout=15, what="a flush that delivers everything")
    assert otlp_health()["pending"] == 0
    ci.shutdown()
    spool = _spool_ids(out)
    assert len(spool) == 1 + 1 + 1 + OUTAGE_CHUNKS
    receiver.wait_for_spans(len(spool))
    assert _received_ids(receiver) == spool  # every span, exactly once
    health = otlp_health()
    assert health["pending"] == 0 and health["exported"] == len(spool)
    assert not list((out / OUTBOX).glob("*.pb"))


def test_flush_after_recovery_delivers_what_the_outbox_holds(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
    start(out, receiver, flush_interval=30.0)  # no periodic export or idle retry within the test
    receiver.fail_next(10**6)
    with ci.scope("work"):
        ci.mark("m", 1)
    # Each flush() tries at once and fails, and the sink's own backoff doubles up to its cap:
    # then its next attempt of its own is at least half the cap away (jitter 0.5 to 1).
    while otlp_health()["failed"] <= math.log2(BACKOFF_CAP / BACKOFF_BASE) + 1:
        assert ci.flush(timeout=5) is False
    health = otlp_health()
    assert health["pending"] == 1
    receiver.fail_next(0)  # the collector accepts again
    # only flush() trying at once can deliver before the sink would try again
    assert ci.flush(timeout=BACKOFF_CAP / 4) is True
    assert receiver.span_count() == 1
    assert otlp_health()["pending"] == 0
    ci.shutdown()  # while the receiver still runs
    assert receiver.wait_for_spans(2)


_FIRST_RUN = """
    import json, os, sys
    import cirron_otel as ci
    ci.profile(output_dir=sys.argv[1], otlp_endpoint=sys.argv[2], otlp_protocol=sys.argv[3],
               flush_interval=0.05, install_signal_handlers=False, tracer_provider=None)
    for epoch in ci.epochs(range(3)):
        with ci.scope("step", lr=0.1):
            ci.mark("loss", 1.0 / (epoch + 1))
    ci.shutdown(timeout=1)  # the collector is down: give up after a second, keep the outbox
    print(json.dumps({"pid": os.getpid(), "otlp": ci.health()["sinks"]["otlp"]}))
"""


def test_outbox_survives_a_process_restart_and_is_delivered_once(out: Path, receiver: Receiver):
    endpoint = receiver.endpoint
    receiver.stop()
    env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "1000"}
    code = "import sys; sys.argv[1:] = " + repr([str(out), endpoint, protocol(receiver)]) + "\n"
    result = run_script(code + _FIRST_RUN.replace("\n    ", "\n"), env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    first_ids = _spool_ids(out)
    assert len(first_ids) == 1 + 3 + 3
    assert report["otlp"]["exported"] == 0
    assert report["otlp"]["pending"] == len(first_ids)
    assert report["otlp"]["failed"] >= 1 and report["otlp"]["last_error"]

    # the outbox holds exactly the first run's spans, as ready-to-send requests
    files = sorted((out / OUTBOX).glob("*.pb"))
    assert files
    in_outbox: Counter[str] = Counter()
    for path in files:
        for span in decode_spans(ExportTraceServiceRequest.FromString(path.read_bytes())):
            in_outbox[span["span_id"]] += 1
    assert in_outbox == first_ids

    receiver.start()  # the same port
    start(out, receiver)
    # the outbox is delivered by the next run on its own, before it records anything
    receiver.wait_for_spans(len(first_ids))
    assert _received_ids(receiver) == first_ids
    with ci.scope("second_run"):
        pass
    ci.shutdown()
    spool = _spool_ids(out)
    assert len(spool) == len(first_ids) + 2
    receiver.wait_for_spans(len(spool))
    assert _received_ids(receiver) == spool  # both runs, every span exactly once
    first_pids = {s["resource"]["process.pid"] for s in receiver.spans() if s["span_id"] in first_ids}
    assert first_pids == {report["pid"]}  # the first run's requests, as that run encoded them
    assert not list((out / OUTBOX).glob("*.pb"))
    health = otlp_health()
    assert health["pending"] == 0 and health["exported"] == len(spool)


# Processes sharing an outbox (ranks, a forked child): tests/reliability/test_otlp_outbox.py, where
# every process has found the leftovers before any delivers (deterministic, not by chance).
