"""SpoolSpanExporter: OpenTelemetry spans into the Cirron spool v1."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from cirron_otel.exporters.otel_spool import SpoolSpanExporter, cap_utf8
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

import cirron_otel as ci
from cirron_otel._config import DEFAULT_OUTPUT_DIR
from cirron_otel._version import __version__
from tests.support.helpers import read_spool, spans_and_marks

Record = dict[str, Any]
NAN, INF = float("nan"), float("inf")


def _only_batch(out: Path) -> Record:
    batches = read_spool(out)
    assert len(batches) == 1, f"expected one batch file, got {len(batches)}"
    return batches[0]


def _by_name(records: Sequence[Record]) -> dict[str, Record]:
    return {r["name"]: r for r in records}


def _conventional(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}{span.context.trace_id:032x}"[:32]


# -- (a) spans from a plain OpenTelemetry SDK ---------------------------------------------

PLAIN_ATTRS: Record = {
    "s": "text",
    "b": True,
    "i": -7,
    "f": 2.5,
    "nan": NAN,
    "inf": INF,
    "ninf": -INF,
    "ls": ["a", "b"],
    "li": [1, 2],
    "lf": [1.5, NAN],
    "lb": [True, False],
    "empty": [],
    "raw": b"\x00\x01",
    "map": {"k": 1, "inner": {"z": [1, -INF]}},
}
PLAIN_ATTRS_JSON: Record = {
    "s": "text",
    "b": True,
    "i": -7,
    "f": 2.5,
    "nan": "nan",
    "inf": "inf",
    "ninf": "-inf",
    "ls": ["a", "b"],
    "li": [1, 2],
    "lf": [1.5, "nan"],
    "lb": [True, False],
    "empty": [],
    "raw": str(b"\x00\x01"),
    "map": {"k": 1, "inner": {"z": [1, "-inf"]}},
}


def _expected_json(kept: Any) -> dict[str, Any]:
    """PLAIN_ATTRS as the spool writes them, for what this SDK version kept: older SDKs
    (< 1.4x) drop mapping values and store bytes decoded as str."""
    expected = {k: v for k, v in PLAIN_ATTRS_JSON.items() if k in kept}
    for key, value in kept.items():
        if isinstance(value, str) and not isinstance(PLAIN_ATTRS[key], str):
            expected[key] = value
    return expected


def _plain_sdk_spans(resource: Resource | None = None) -> list[ReadableSpan]:
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "plain"}))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("plain")
    with tracer.start_as_current_span("request", attributes=PLAIN_ATTRS) as root:
        root.add_event("cache.miss", {"key": "k1", "size": 3, "ratio": NAN})
        root.add_event("bare")
        with tracer.start_as_current_span("child") as child:
            child.record_exception(KeyError("kept"))  # not an error span: the event stays a mark
        with contextlib.suppress(ValueError), tracer.start_as_current_span("fail"):
            raise ValueError("boom")
    provider.shutdown()
    return list(memory.get_finished_spans())


def test_plain_sdk_spans_become_one_valid_batch(out: Path) -> None:
    spans = _plain_sdk_spans(Resource.create({"service.name": "plain", "process.pid": 4242}))
    assert SpoolSpanExporter(out).export(spans) is SpanExportResult.SUCCESS
    batch = _only_batch(out)  # schema-valid, strict JSON
    assert batch["sdk_version"] == __version__ and batch["snapshots"] == []
    otel = {s.name: s for s in spans}
    got = _by_name(batch["spans"])
    assert set(got) == {"request", "child", "fail"}
    request, child, fail = got["request"], got["child"], got["fail"]
    for name, record in got.items():
        assert record["id"] == _conventional(otel[name])
        assert record["trace_id"] == f"{otel[name].context.trace_id:032x}"
        assert (record["start_ns"], record["end_ns"]) == (otel[name].start_time, otel[name].end_time)
        assert (record["pid"], record["thread_id"], record["rank"]) == (4242, 0, 0)
        assert record["index"] is record["cpu_ns"] is record["gpu_ns"] is record["memory_peak_bytes"] is None
    assert request["parent_id"] is None
    assert child["parent_id"] == fail["parent_id"] == request["id"]
    assert request["attrs"] == _expected_json(otel["request"].attributes)

    marks = {m["id"]: m for m in batch["marks"]}
    assert sorted(marks) == sorted(request["mark_ids"] + child["mark_ids"])
    cache, bare = (marks[i] for i in request["mark_ids"])
    events = {e.name: e for e in otel["request"].events}
    assert cache == {
        "id": cache["id"],
        "span_id": request["id"],
        "name": "cache.miss",
        "value_type": "string",
        "value": "cache.miss",
        "attrs": {"key": "k1", "size": 3, "ratio": "nan"},
        "ts_ns": events["cache.miss"].timestamp,
        "kind": "point",
    }
    assert (bare["name"], bare["value"], bare["attrs"]) == ("bare", "bare", {})
    (exc_mark,) = (marks[i] for i in child["mark_ids"])
    assert (exc_mark["name"], exc_mark["value"], exc_mark["attrs"]["exception.type"]) == (
        "exception",
        "exception",
        "KeyError",
    )
    assert "error" not in child["attrs"]

    # The error span: status ERROR -> error attrs; its exception event is not a mark.
    assert fail["mark_ids"] == []
    assert fail["attrs"] == {"error": True, "error.type": "ValueError", "error.message": "boom"}


def test_pid_defaults_to_this_process_and_empty_export_writes_nothing(out: Path) -> None:
    exporter = SpoolSpanExporter(out)
    assert exporter.export([]) is SpanExportResult.SUCCESS
    assert read_spool(out) == []
    assert exporter.export(_plain_sdk_spans()) is SpanExportResult.SUCCESS
    assert {s["pid"] for s in _only_batch(out)["spans"]} == {os.getpid()}


def test_error_without_exception_event_uses_the_status(out: Path) -> None:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("t").start_as_current_span("op") as span:
        span.set_status(Status(StatusCode.ERROR, "é" * 200))
    assert SpoolSpanExporter(out).export(memory.get_finished_spans()) is SpanExportResult.SUCCESS
    (record,) = _only_batch(out)["spans"]
    assert record["attrs"] == {"error": True, "error.message": "é" * 128}  # 256 UTF-8 bytes


def test_a_file_holds_at_most_100_000_records(out: Path) -> None:
    # one span and 100,000 of its events: 100,001 records
    big = _span("big", 1, 1, events=[Event("e", None, timestamp=10 + i) for i in range(100_000)])
    assert SpoolSpanExporter(out).export([big]) is SpanExportResult.SUCCESS
    batches = read_spool(out)
    assert [len(b["spans"]) + len(b["marks"]) for b in batches] == [100_000, 1]


def test_more_than_max_records_are_split_across_files(out: Path) -> None:
    events = [Event(f"e{i}", {"i": i}, timestamp=10 + i) for i in range(25)]
    big = _span("big", 1, 1, events=events)
    small = [_span(f"s{i}", 1, 100 + i) for i in range(3)]
    exporter = SpoolSpanExporter(out)
    exporter.max_records_per_file = 10
    assert exporter.export([*small[:2], big, small[2]]) is SpanExportResult.SUCCESS
    batches = read_spool(out)
    assert len(batches) > 1 and exporter.files_written == len(batches)
    assert all(len(b["spans"]) + len(b["marks"]) <= 10 for b in batches)
    spans, marks = spans_and_marks(out)
    assert sorted(s["name"] for s in spans) == ["big", "s0", "s1", "s2"]
    (big_record,) = (s for s in spans if s["name"] == "big")
    assert [m["id"] for m in marks] == big_record["mark_ids"]
    assert [m["name"] for m in marks] == [f"e{i}" for i in range(25)]


def test_a_failing_disk_is_reported_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    exporter = SpoolSpanExporter(blocker)  # <file>/spool cannot be created
    assert exporter.export(_plain_sdk_spans()) is SpanExportResult.FAILURE
    assert exporter.last_error and "Error" in exporter.last_error
    assert exporter.failed_exports == 1


def test_shutdown_force_flush_and_default_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRRON_OUTPUT_DIR", str(tmp_path / "env"))
    assert SpoolSpanExporter().directory.path == os.path.join(tmp_path / "env", "spool")
    monkeypatch.delenv("CIRRON_OUTPUT_DIR")
    assert SpoolSpanExporter().directory.path == os.path.join(DEFAULT_OUTPUT_DIR, "spool")
    exporter = SpoolSpanExporter(tmp_path / "x")
    assert exporter.force_flush() is True
    exporter.shutdown()
    assert exporter.export(_plain_sdk_spans()) is SpanExportResult.FAILURE
    assert read_spool(tmp_path / "x") == []


def test_max_bytes_evicts_the_oldest_files(tmp_path: Path) -> None:
    spans = _plain_sdk_spans()
    assert SpoolSpanExporter(tmp_path / "probe").export(spans) is SpanExportResult.SUCCESS
    (probe,) = (tmp_path / "probe" / "spool").glob("*.json")
    cap = probe.stat().st_size * 5 // 2  # room for two such files, not three
    exporter = SpoolSpanExporter(tmp_path / "capped", max_bytes=cap)
    spool = tmp_path / "capped" / "spool"
    newest = []
    for _ in range(4):
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        files = sorted(spool.glob("*.json"))  # <created_ns>-<id>.json: oldest first
        assert sum(f.stat().st_size for f in files) <= cap
        newest.append(files[-1].name)
    assert sorted(f.name for f in spool.glob("*.json")) == newest[-2:]  # the two oldest went
    assert len(read_spool(tmp_path / "capped")) == 2


# -- (b) round trip: spans shaped exactly as the Cirron mapping makes them -----------------


def _span(
    name: str,
    trace_id: int,
    span_id: int,
    *,
    parent: SpanContext | None = None,
    attributes: Record | None = None,
    events: Sequence[Event] = (),
    start: int = 1,
    end: int = 2,
    status: Status | None = None,
    links: Sequence[Link] = (),
    resource: Resource | None = None,
) -> ReadableSpan:
    return ReadableSpan(
        name,
        context=SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(1)),
        parent=parent,
        resource=resource or Resource({}),
        attributes=attributes or {},
        events=events,
        links=links,
        kind=SpanKind.INTERNAL,
        status=status or Status(StatusCode.UNSET),
        start_time=start,
        end_time=end,
        instrumentation_scope=InstrumentationScope("cirron_otel", __version__),
    )


def _mark_value(mark: Record) -> Any:
    return float(mark["value_nonfinite"]) if "value_nonfinite" in mark else mark["value"]


def _as_otel(span: Record, marks: Sequence[Record], by_id: dict[str, Record]) -> ReadableSpan:
    """The Cirron → OpenTelemetry mapping of one spool span."""
    attributes: Record = dict(span["attrs"])
    if span["attrs"].get("error"):  # the status and the exception event carry these
        del attributes["error"], attributes["error.message"]
    if span["index"] is not None:
        attributes["cirron.index"] = span["index"]
    attributes["cirron.span_id"] = span["id"]
    attributes["thread.id"] = span["thread_id"]
    attributes["thread.name"] = "MainThread"  # added by the mapping, not kept in the spool
    attributes["cirron.rank"] = span["rank"]
    if span["cpu_ns"] is not None:
        attributes["cirron.cpu_ns"] = span["cpu_ns"]
    trace_id, parent_id = int(span["trace_id"], 16), span["parent_id"]
    parent_record = by_id.get(parent_id) if parent_id else None
    new_trace = parent_record is not None and parent_record["trace_id"] != span["trace_id"]
    parent, links = None, ()
    if new_trace:  # a direct child of the session: a trace of its own, linked to the session
        attributes["cirron.session.id"] = parent_id
        session = SpanContext(int(parent_record["trace_id"], 16), int(parent_id[:16], 16), is_remote=False)
        links = (Link(session, {"cirron.link": "session"}),)
    elif parent_id is not None:
        parent = SpanContext(trace_id, int(parent_id[:16], 16), is_remote=False)
    events = []
    for mark in marks:
        if mark["kind"] == "summary":
            attributes[f"cirron.summary.{mark['name']}"] = _mark_value(mark)
            continue
        event_attrs = {
            "cirron.mark.value": _mark_value(mark),
            "cirron.mark.kind": "point",
            "cirron.mark.id": mark["id"],
            **mark["attrs"],
        }
        events.append(Event(mark["name"], event_attrs, timestamp=mark["ts_ns"]))
    status = None
    if span["attrs"].get("error"):
        status = Status(StatusCode.ERROR, span["attrs"]["error.message"])
        events.append(
            Event(
                "exception",
                {
                    "exception.type": span["attrs"]["error.type"],
                    "exception.message": span["attrs"]["error.message"],
                    "exception.stacktrace": "Traceback (most recent call last): ...",
                },
                timestamp=span["end_ns"],
            )
        )
    resource = Resource({"service.name": "cirron", "process.pid": span["pid"], "cirron.rank": span["rank"]})
    return _span(
        span["name"],
        trace_id,
        int(span["id"][:16], 16),
        parent=parent,
        attributes=attributes,
        events=events,
        start=span["start_ns"],
        end=span["end_ns"],
        status=status,
        links=links,
        resource=resource,
    )


def _to_otel(spans: Sequence[Record], marks: Sequence[Record]) -> list[ReadableSpan]:
    by_id = {s["id"]: s for s in spans}
    return [_as_otel(s, [m for m in marks if m["span_id"] == s["id"]], by_id) for s in spans]


def _assert_round_trip(spans: Sequence[Record], marks: Sequence[Record], out: Path) -> None:
    back = _only_batch(out)
    got_spans = {s["id"]: s for s in back["spans"]}
    got_marks = {m["id"]: m for m in back["marks"]}
    assert sorted(got_spans) == sorted(s["id"] for s in spans)
    for span in spans:
        got = got_spans[span["id"]]
        assert {**got, "mark_ids": None} == {**span, "mark_ids": None}
        mine = [m for m in marks if m["span_id"] == span["id"]]
        points = [m for m in mine if m["kind"] == "point"]
        assert got["mark_ids"][: len(points)] == [m["id"] for m in points]
        for mark in points:  # exactly the original mark: id, typed value, nonfinite, attrs, time
            assert got_marks[mark["id"]] == mark
        summaries = [got_marks[i] for i in got["mark_ids"][len(points) :]]
        last = {m["name"]: m for m in mine if m["kind"] == "summary"}  # the last of a name wins
        assert [
            (m["name"], m["value_type"], m["value"], m.get("value_nonfinite"), m["kind"], m["span_id"])
            for m in summaries
        ] == [
            (m["name"], m["value_type"], m["value"], m.get("value_nonfinite"), "summary", span["id"])
            for m in last.values()
        ]
        assert all(m["ts_ns"] == span["end_ns"] and m["attrs"] == {} for m in summaries)
    assert len(got_marks) == sum(len(s["mark_ids"]) for s in back["spans"])


def _hex(n: int) -> str:
    return f"{n:032x}"


SESSION, EPOCH, BATCH, BAD = (
    _hex(0xA1 << 64 | 0x11),
    _hex(0xB2 << 64 | 0x22),
    _hex(0xC3 << 64 | 0x33),
    _hex(0xD4 << 64 | 0x44),
)
T_SESSION, T_EPOCH = _hex(0x5E55), _hex(0xE90C)


def _record(id_: str, name: str, parent: str | None, trace: str, start: int, end: int, **over: Any) -> Record:
    return {
        "id": id_,
        "name": name,
        "parent_id": parent,
        "index": None,
        "start_ns": start,
        "end_ns": end,
        "cpu_ns": None,
        "gpu_ns": None,
        "memory_peak_bytes": None,
        "thread_id": 140_000_000_001,
        "pid": 31337,
        "rank": 3,
        "attrs": {},
        "mark_ids": [],
        "trace_id": trace,
        **over,
    }


def _mark(
    id_: int, span: str, name: str, value_type: str, value: Any, ts: int, kind: str = "point", **attrs: Any
) -> Record:
    mark = {
        "id": _hex(id_),
        "span_id": span,
        "name": name,
        "value_type": value_type,
        "value": value,
        "attrs": attrs,
        "ts_ns": ts,
        "kind": kind,
    }
    if value_type == "float" and value in ("nan", "inf", "-inf"):
        mark["value"], mark["value_nonfinite"] = None, value
    return mark


ROUND_TRIP_SPANS = [
    _record(BATCH, "batch", EPOCH, T_EPOCH, 110, 190, index=5, cpu_ns=77),
    _record(
        BAD,
        "bad",
        EPOCH,
        T_EPOCH,
        200,
        210,
        attrs={"error": True, "error.type": "ValueError", "error.message": "boom"},
    ),
    _record(
        EPOCH,
        "epoch",
        SESSION,
        T_EPOCH,
        100,
        300,
        index=0,
        cpu_ns=1234,
        attrs={"variant": "fp16", "lr": 0.001, "layers": [64, 32], "fused": False},
    ),
    _record(SESSION, "cirron.session", None, T_SESSION, 1, 400, attrs={"run": "r1"}),
]
ROUND_TRIP_MARKS = [
    _mark(1, BATCH, "loss", "float", 0.25, 120, step=3, phase="train"),
    _mark(2, BATCH, "loss_nan", "float", "nan", 121),
    _mark(3, BATCH, "grad_inf", "float", "inf", 122),
    _mark(4, BATCH, "grad_ninf", "float", "-inf", 123),
    _mark(5, BATCH, "tokens", "int", -(2**63), 124),
    _mark(6, BATCH, "finite", "bool", True, 125),
    _mark(7, BATCH, "note", "string", cap_utf8("é" * 300), 126),
    _mark(8, EPOCH, "acc", "float", 0.5, 150, kind="summary"),
    _mark(9, EPOCH, "acc", "float", "nan", 290, kind="summary"),
    _mark(10, EPOCH, "epoch_loss", "float", 1.5, 291),
    _mark(11, SESSION, "hello", "string", "", 2),
]
for _m in ROUND_TRIP_MARKS:
    next(s for s in ROUND_TRIP_SPANS if s["id"] == _m["span_id"])["mark_ids"].append(_m["id"])


def test_cirron_shaped_spans_come_back_exactly(out: Path) -> None:
    otel = _to_otel(ROUND_TRIP_SPANS, ROUND_TRIP_MARKS)  # children first, as the SDK exports them
    assert SpoolSpanExporter(out).export(otel) is SpanExportResult.SUCCESS
    _assert_round_trip(ROUND_TRIP_SPANS, ROUND_TRIP_MARKS, out)


def test_real_profile_spool_round_trips(out: Path, tmp_path: Path) -> None:
    ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False, capture_cpu_time=True)
    with ci.scope("outer", variant="fp16", lr=0.001, layers=[64, 32]):
        ci.mark("loss", 0.5, step=3)
        ci.mark("nan", NAN)
        ci.mark("neg_inf", -INF)
        ci.mark("text", "é" * 300)
        for _ in ci.epochs(range(2)):
            ci.mark("flag", True)
            ci.mark("n", 7, kind="point")
        ci.mark("acc", 0.9, kind="summary")
    with contextlib.suppress(ValueError), ci.scope("bad"):
        raise ValueError("boom")
    ci.shutdown()
    spans, marks = spans_and_marks(out)
    marks = [m for m in marks if m["span_id"] != "root"]  # spool-only by the mapping
    assert any("value_nonfinite" in m for m in marks) and any(m["kind"] == "summary" for m in marks)
    again = tmp_path / "again"
    assert SpoolSpanExporter(again).export(_to_otel(spans, marks)[::-1]) is SpanExportResult.SUCCESS
    _assert_round_trip(spans, marks, again)


def test_parent_ids_across_exports(out: Path) -> None:
    by_id = {s["id"]: s for s in ROUND_TRIP_SPANS}
    epoch = _as_otel(by_id[EPOCH], [], by_id)
    assert epoch.context is not None
    under_epoch = SpanContext(epoch.context.trace_id, epoch.context.span_id, is_remote=False)
    early = _span("plain.early", epoch.context.trace_id, 0xEA, parent=under_epoch)
    late = _span("plain.late", epoch.context.trace_id, 0x1A7E, parent=under_epoch)
    exporter = SpoolSpanExporter(out)
    for spans in ([early], [epoch], [late]):
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    got = {s["name"]: s for s in spans_and_marks(out)[0]}
    assert got["epoch"]["id"] == EPOCH and got["epoch"]["parent_id"] == SESSION
    assert got["plain.late"]["parent_id"] == EPOCH  # the Cirron parent was seen: its full id
    # Exported before its Cirron parent: only the convention is available from the child.
    assert got["plain.early"]["parent_id"] == f"{int(EPOCH[:16], 16):016x}{T_EPOCH[:16]}"
    assert got["plain.late"]["id"] == _conventional(late)


# -- (c) the real opentelemetry-instrument, through the entry point ------------------------

APP = """
    import json, os
    from opentelemetry import trace

    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("request", attributes={"http.route": "/items"}) as span:
        span.add_event("cache.miss", {"key": "k1"})
        with tracer.start_as_current_span("db.query", attributes={"db.rows": 3}):
            pass
    print(json.dumps({"pid": os.getpid()}))
"""


def _entry_point_registered() -> bool:
    return any(ep.name == "cirron_spool" for ep in entry_points(group="opentelemetry_traces_exporter"))


@pytest.mark.real_backend
@pytest.mark.skipif(
    not _entry_point_registered(),
    reason="entry point opentelemetry_traces_exporter:cirron_spool is not registered "
    "(add it to pyproject.toml and reinstall)",
)
@pytest.mark.parametrize("exporters", ["cirron_spool", "cirron_spool,console"])
def test_opentelemetry_instrument_writes_the_spool(tmp_path: Path, exporters: str) -> None:
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    if not instrument.exists():
        pytest.skip("opentelemetry-instrument is not installed (pip install opentelemetry-distro)")
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(APP))
    out = tmp_path / "cirron"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CIRRON_"))}
    env.update(
        OTEL_TRACES_EXPORTER=exporters,
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_SERVICE_NAME="plain-app",
        CIRRON_OUTPUT_DIR=str(out),
    )
    run = subprocess.run(
        [str(instrument), sys.executable, str(app)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    pid = json.loads(run.stdout.splitlines()[0])["pid"]
    spans, marks = spans_and_marks(out)
    got = _by_name(spans)
    assert set(got) == {"request", "db.query"}
    request, query = got["request"], got["db.query"]
    assert query["parent_id"] == request["id"] and request["parent_id"] is None
    assert query["trace_id"] == request["trace_id"] and request["id"][16:] == request["trace_id"][:16]
    assert request["pid"] == query["pid"] == pid
    assert request["attrs"] == {"http.route": "/items"} and query["attrs"] == {"db.rows": 3}
    (mark,) = marks
    assert (mark["name"], mark["value"], mark["attrs"], mark["span_id"]) == (
        "cache.miss",
        "cache.miss",
        {"key": "k1"},
        request["id"],
    )
    assert request["mark_ids"] == [mark["id"]]
    if "console" in exporters:
        assert '"name": "request"' in run.stdout and '"name": "db.query"' in run.stdout
