"""Spool records → OTLP `ExportTraceServiceRequest`s, with the live export's mapping.

Why not the native encoder: `_native.otlp_encode` takes only native `Batch` objects, which
exist only inside a profiling process (records claimed from its rings); it cannot be fed
records read back from a spool. So this module applies the same mapping (README, "The
mapping"; `otlp_add_span` / `otlp_add_mark` in `otlp.c`) to spool records, with the same
resource and scope, the same span limits (`OTEL_SPAN_*`, through the SDK's `SpanLimits`, as
`profile()` reads them), the same oldest-first event dropping, and requests cut between spans
near 1 MiB, then fitted under the collector's limit by the live `otlp_fit`.

What the spool cannot give back (documented gaps): `thread.name` and `code.*` attributes
(not in the spool), the `exception.stacktrace` of a failed scope's `exception` event (the
event carries `exception.type` and `exception.message`), the host (`host.name` only when the
session attrs carry it), the sampling decision (every span in the spool is sent), and the
exact type of a non-finite float inside attrs (the spool wrote it as the string "nan").

Marks as metrics (README, "Marks as metrics"), with `metrics_prefix` set: every numeric mark
is also one data point, as `otlp_add_point` / `metric_points.h` make it live. A point needs
its span's name (`cirron.scope`) and OTLP ids (the exemplar), known only when the span's record
arrives, so it waits with the span's events; a mark on a session goes at once (the session's
ids are known from the first pass), as live. Each spool file's points ready after its spans
become requests of their own (`Part.signal == "metrics"`), one per process and session (the
resource, `start_time_unix_nano` and `cirron.session.id` are per process live), one Metric per
name, points ordered by (scope, rank, time). Not replayed: a `profile(metric_attrs=...)`
allow-list (the spool does not say which attrs were labels) and points of a process whose
session span is not in the spool (its start and id are unknown: counted, not sent).

Snapshots (`ci.watch`): each spool snapshot record is the `cirron.snapshot` event the live
OTLP sinks put on its epoch span (`snapshot_event_attrs`, the statistics' non-finite values
restored from the spool's null + `nonfinite`), a file's snapshots before its marks (the live
sink adds the snapshots it takes before it encodes that export's batches), under the same
event limit. Not replayed: one captured after its span had closed (live adds none), and the
histogram of a tensor whose histogram edges were not finite (the spool leaves it out).

Memory: marks wait for their span (as in the live `OtlpState`): per open span at most
`event_limit` encoded events plus its summaries, and at most `PENDING_POINTS_MAX` points;
spans are encoded as they arrive.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import _native
from . import reader

SESSION = "cirron.session"
SPLIT_BYTES = 1 << 20  # the native encoder's request size before fitting (otlp_encode's default)
INT64 = (-(1 << 63), (1 << 63) - 1)
PENDING_POINTS_MAX = 100_000  # points an open span keeps (otlp.c's PENDING_POINTS_MAX)
# What closing a metrics request may still add, and what a point's or a Metric's framing costs
# beyond ByteSize() (tags and length varints): the size estimate errs on the large side.
_MREQ_RESERVE = 16
_FRAME = 6
_SESSION_NAME = re.compile(rb'"name"\s*:\s*"cirron\.session"')


@dataclass
class Limits:
    """The OpenTelemetry span limits, read from the environment as `profile()` reads them."""

    attributes: int = 128
    events: int = 128
    event_attributes: int = 128
    links: int = 128
    link_attributes: int = 128
    value_length: int | None = None

    @classmethod
    def from_env(cls) -> Limits:
        from opentelemetry.sdk.trace import SpanLimits

        big = (1 << 31) - 1
        s = SpanLimits()
        return cls(
            attributes=big if s.max_span_attributes is None else s.max_span_attributes,
            events=big if s.max_events is None else s.max_events,
            event_attributes=big if s.max_event_attributes is None else s.max_event_attributes,
            links=big if s.max_links is None else s.max_links,
            link_attributes=big if s.max_link_attributes is None else s.max_link_attributes,
            value_length=s.max_attribute_length,
        )


@dataclass
class _Open:
    """Marks and snapshots of a span that has not been seen yet (it closes later, in a later file)."""

    events: deque[Any]
    total: int = 0
    summaries: dict[str, Any] = field(default_factory=dict)
    points: list[tuple[str, int, int | float]] = field(default_factory=list)  # (name, ts, value)
    snapshots: int = 0  # of `total`: snapshot events


@dataclass
class Point:
    """A metric data point, complete: its span's name and ids are known."""

    name: str
    ts: int
    value: int | float  # an int goes as as_int, a float (and a bool, as 0.0 / 1.0) as as_double
    scope: str
    rank: int
    trace_id: bytes
    span_id: bytes
    process: tuple[int, int, str | None]  # (pid, rank, host): the resource
    session: tuple[int, str]  # (start_ns, 32-hex id) of the process's session

    def order(self) -> tuple[bytes, bytes, int, int]:
        # metric_points.h's mpoint_cmp: name, scope (bytewise), rank, time
        return (self.name.encode(), self.scope.encode(), self.rank, self.ts)


@dataclass
class Part:
    """One request: the unit that is sent, acknowledged and resumed."""

    file: str  # the spool file it came from
    index: int  # its position among that file's requests
    data: bytes  # a serialized ExportTraceServiceRequest (ExportMetricsServiceRequest for metrics)
    spans: int
    signal: str = "traces"  # or "metrics": the marks' data points
    points: int = 0

    @property
    def key(self) -> str:
        # metrics requests have keys of their own in the same state file
        return f"{self.file}#{self.index}" if self.signal == "traces" else f"metrics:{self.file}#{self.index}"


@dataclass
class Counters:
    spans: int = 0
    marks: int = 0
    root_marks: int = 0  # attached to "root": spool only, as in live export
    events_dropped: int = 0
    truncated_values: int = 0
    dropped_spans: int = 0  # too large even truncated
    pending_marks: int = 0  # at the end: marks whose span is not in the spool
    points: int = 0  # metric points made (marks as metrics)
    points_dropped: int = 0  # over PENDING_POINTS_MAX on one open span, or too large for a request
    points_no_session: int = 0  # their process's session span is not in the spool
    pending_points: int = 0  # at the end: on spans the spool does not hold
    snapshots: int = 0  # snapshot records read
    snapshots_after_close: int = 0  # captured after their span closed in the same file: no event
    pending_snapshots: int = 0  # at the end: on spans the spool does not hold (or sent before them)


@dataclass
class Sessions:
    """What the encoder needs to know of the spool's sessions before their children."""

    traces: dict[str, str] = field(default_factory=dict)  # session span id -> its trace id
    hosts: dict[tuple[int, int], str] = field(default_factory=dict)  # (pid, rank) -> host.name
    spans: dict[int, list[tuple[int, int, str]]] = field(default_factory=dict)  # pid -> (start, end, id)
    info: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # session id -> (pid, rank, start)

    def around(self, pid: int, ts: int) -> str | None:
        """The session of process `pid` open at `ts` (a root that is not a session, such as
        an inference request, starts a trace linked to it, as in the live export)."""
        return next((sid for start, end, sid in self.spans.get(pid, ()) if start <= ts <= end), None)


def sessions_of(files: list[reader.SpoolFile]) -> Sessions:
    """Session span id → its trace id (for the links of traces that start under a session),
    (pid, rank) → `host.name` from the session attrs, when the program set one, and each
    process's sessions by time.

    The sessions close last, so they come after their children: a first pass finds them,
    reading bytes and parsing only the files that name a session (few)."""
    found = Sessions()
    traces, hosts = found.traces, found.hosts
    for file in files:
        try:
            with open(file.path, "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if not _SESSION_NAME.search(raw):
            continue
        for span in reader.read_batch(file).spans:
            if not isinstance(span, dict) or span.get("name") != SESSION:
                continue
            if span.get("trace_id"):
                traces[span["id"]] = span["trace_id"]
            host = (span.get("attrs") or {}).get("host.name")
            if isinstance(host, str):
                hosts[(span["pid"], span["rank"])] = host
            if isinstance(span.get("start_ns"), int):
                found.info[span["id"]] = (span["pid"], span["rank"], span["start_ns"])
            if isinstance(span.get("start_ns"), int) and isinstance(span.get("end_ns"), int):
                found.spans.setdefault(span["pid"], []).append((span["start_ns"], span["end_ns"], span["id"]))
    return found


class Encoder:
    """Feeds spool batches in order; yields the requests the live export would have sent."""

    def __init__(
        self,
        *,
        sessions: Sessions,
        limits: Limits | None = None,
        service_name: str | None = None,
        max_request_bytes: int | None = None,
        metrics_prefix: str | None = None,
    ) -> None:
        from cirron_otel.exporters import otlp as live

        self.live = live
        self.sessions = sessions.traces
        self.session_spans = sessions
        self.hosts = sessions.hosts
        self.limits = limits or Limits.from_env()
        self.service_name = service_name
        self.max_request_bytes = max_request_bytes or live.DEFAULT_MAX_REQUEST_BYTES
        self.counters = Counters()
        self._open: dict[str, _Open] = {}
        self._resources: dict[tuple[int, int, str | None], bytes] = {}
        self.metrics_prefix = metrics_prefix  # None: no metric points
        self._ready: list[Point] = []  # points complete, for the next file's metrics requests

    # -- resource ------------------------------------------------------------------------

    def resource(self, pid: int, rank: int, host: str | None) -> Any:
        """The producing process's Resource, as `build_resource` makes it live, except that
        pid, rank and host are the spool's (not this process's)."""
        from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
        from opentelemetry.sdk.resources import Resource

        key = (pid, rank, host)
        data = self._resources.get(key)
        if data is None:
            base: dict[str, Any] = {"process.pid": pid, _native.KEY_RANK: rank, **self.live.TELEMETRY_ATTRS}
            if host:
                base["host.name"] = host
            res = Resource.create(base)
            if self.service_name:
                res = res.merge(Resource({"service.name": self.service_name}))
            elif str(res.attributes.get("service.name", "")).startswith("unknown_service"):
                res = res.merge(Resource({"service.name": "cirron"}))
            data = self._resources[key] = self.live.encode_resource(dict(res.attributes))
        return PbResource.FromString(data)

    # -- values --------------------------------------------------------------------------

    def _str(self, av: Any, text: str) -> None:
        limit = self.limits.value_length
        av.string_value = text if limit is None else text[:limit]

    def any_value(self, av: Any, value: Any) -> None:
        """As `otlp_any_value`: scalars kept, homogeneous lists of scalars as arrays, the rest str()."""
        if self._scalar(av, value):
            return
        if (
            isinstance(value, list)
            and value
            and all(type(v) is type(value[0]) for v in value)
            and type(value[0]) in (str, bool, int, float)
        ):
            for item in value:
                if not self._scalar(av.array_value.values.add(), item):
                    self._str(av.array_value.values[-1], str(item))
            return
        if isinstance(value, list) and not value:
            av.array_value.SetInParent()
            return
        # str() as live; a JSON true/null inside a container comes back as Python's True/None
        self._str(av, str(value))

    def _scalar(self, av: Any, value: Any) -> bool:
        if isinstance(value, bool):
            av.bool_value = value
        elif isinstance(value, int):
            if not INT64[0] <= value <= INT64[1]:
                return False
            av.int_value = value
        elif isinstance(value, float):
            av.double_value = value
        elif isinstance(value, str):
            self._str(av, value)
        else:
            return False
        return True

    def _attrs(self, target: Any, attrs: dict[str, Any], limit: int, *, span_error: bool = False) -> int:
        """Append `attrs` to a repeated KeyValue field; returns how many did not fit."""
        dropped = 0
        for key, value in attrs.items():
            if value is None:
                continue  # OpenTelemetry attributes cannot be null
            if span_error and key in ("error", "error.message"):
                continue  # the status carries them
            if len(target) >= limit:
                dropped += 1
                continue
            kv = target.add()
            kv.key = key
            self.any_value(kv.value, value)
        return dropped

    # -- marks and spans -------------------------------------------------------------------

    def _opened(self, span_id: str) -> _Open:
        st = self._open.get(span_id)
        if st is None:
            st = self._open[span_id] = _Open(deque(maxlen=self.limits.events))
        return st

    def add_mark(self, mark: dict[str, Any]) -> None:
        from opentelemetry.proto.common.v1.common_pb2 import AnyValue
        from opentelemetry.proto.trace.v1.trace_pb2 import Span

        self.counters.marks += 1
        if mark.get("span_id") == "root":
            self.counters.root_marks += 1
            return
        st = self._opened(mark["span_id"])
        value = reader.mark_value(mark)
        if self.metrics_prefix is not None and mark.get("value_type") in ("int", "float", "bool"):
            self._add_point(st, mark, value)
        if mark.get("kind") == "summary":
            av = AnyValue()
            self.any_value(av, value)
            st.summaries[mark["name"]] = av  # the last one wins, in the first one's place (as native)
            return
        ev = Span.Event(time_unix_nano=mark["ts_ns"], name=mark["name"])
        kv = ev.attributes.add()
        kv.key = _native.KEY_MARK_VALUE
        self.any_value(kv.value, value)
        ev.attributes.add(key=_native.KEY_MARK_KIND).value.string_value = "point"
        ev.attributes.add(key=_native.KEY_MARK_ID).value.string_value = mark["id"]
        attrs = mark.get("attrs") or {}
        room = max(self.limits.event_attributes - 3, 0)
        kept = Span.Event()
        dropped = self._attrs(kept.attributes, attrs, room)
        ev.attributes.extend(kept.attributes)
        ev.dropped_attributes_count = dropped
        self._keep(st, ev)

    def _keep(self, st: _Open, ev: Any) -> None:
        """One more event of the span, among its last `limits.events` (marks and snapshots
        share the limit, as in the live `ospan_event_end`)."""
        if len(st.events) == st.events.maxlen:
            self.counters.events_dropped += 1  # the oldest goes, as in the SDK
        st.events.append(ev)
        st.total += 1

    def add_snapshot(self, record: dict[str, Any], end_ns: int | None) -> None:
        """A snapshot record as the live `cirron.snapshot` event on its epoch span
        (`OtlpEncodingSink.encode_requests`): the same attributes (`snapshot_event_attrs`, on
        the statistics with their non-finite values restored) and time. `end_ns`: the span's
        end when it closes in the same file."""
        from opentelemetry.proto.trace.v1.trace_pb2 import Span

        from cirron_otel._snapshots import stats_from_wire
        from cirron_otel.exporters.otlp_encoding import snapshot_event_attrs
        from cirron_otel.sink import Snapshot

        self.counters.snapshots += 1
        ts = record["ts_ns"]
        if end_ns is not None and ts > end_ns:
            # captured after its span closed: live adds no event then (capture_epoch: it would
            # wait in the encoder for good). One whose span went in an earlier file stays pending.
            self.counters.snapshots_after_close += 1
            return
        st = self._opened(record["span_id"])
        stats = stats_from_wire(record.get("stats"))
        attrs = snapshot_event_attrs(Snapshot(record, b"", stats, (0, 0, True)))
        ev = Span.Event(time_unix_nano=ts, name=_native.EVENT_SNAPSHOT)
        ev.dropped_attributes_count = self._attrs(ev.attributes, attrs, self.limits.event_attributes)
        st.snapshots += 1
        self._keep(st, ev)

    def _add_point(self, st: _Open, mark: dict[str, Any], value: Any) -> None:
        """A numeric mark (point or summary: each is a point) as a metric point, as live."""
        self.counters.points += 1
        if isinstance(value, bool) or not isinstance(value, int) or not INT64[0] <= value <= INT64[1]:
            value = float(value)  # a bool as 0.0 / 1.0; NaN and ±inf stay themselves
        session = self.session_spans.info.get(mark["span_id"])
        if session is not None:
            # on the session: its name and ids are known, so the point is complete at once (as live)
            pid, rank, _ = session
            self._settle(
                [(mark["name"], mark["ts_ns"], value)],
                scope=SESSION,
                span_id=mark["span_id"],
                trace_id=self.sessions.get(mark["span_id"]) or mark["span_id"],
                pid=pid,
                rank=rank,
                session_id=mark["span_id"],
            )
            return
        if len(st.points) >= PENDING_POINTS_MAX:
            self.counters.points_dropped += 1  # as live: an open span must not grow without bound
            return
        st.points.append((mark["name"], mark["ts_ns"], value))

    def _settle(
        self,
        points: list[tuple[str, int, int | float]],
        *,
        scope: str,
        span_id: str,
        trace_id: str,
        pid: int,
        rank: int,
        session_id: str | None,
    ) -> None:
        """Complete a span's waiting points with its name, OTLP ids and process's session."""
        info = self.session_spans.info.get(session_id) if session_id else None
        if info is None:
            self.counters.points_no_session += len(points)
            return
        process = (pid, rank, self.hosts.get((pid, rank)))
        for name, ts, value in points:
            self._ready.append(
                Point(
                    name=name,
                    ts=ts,
                    value=value,
                    scope=scope,
                    rank=rank,
                    trace_id=bytes.fromhex(trace_id),
                    span_id=bytes.fromhex(span_id[:16]),
                    process=process,
                    session=(info[2], session_id or ""),
                )
            )

    def span(self, record: dict[str, Any]) -> Any:
        """The OTLP Span of one spool span record (its waiting marks attached)."""
        from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

        self.counters.spans += 1
        attrs = record.get("attrs") or {}
        error = attrs.get("error") is True
        trace_id = record.get("trace_id") or record["id"]  # (a writer without trace_id: best effort)
        span = Span(
            trace_id=bytes.fromhex(trace_id),
            span_id=bytes.fromhex(record["id"][:16]),
            name=record["name"],
            kind=Span.SPAN_KIND_INTERNAL,
            start_time_unix_nano=record["start_ns"],
            end_time_unix_nano=record["end_ns"],
            flags=0x101,
        )
        parent = record.get("parent_id")
        if parent is None and record["name"] != SESSION:  # a root under a session (a request)
            parent = self.session_spans.around(record["pid"], record["start_ns"])
        session_trace = self.sessions.get(parent) if parent else None
        new_trace = session_trace is not None and session_trace != trace_id
        if parent and not new_trace:
            span.parent_span_id = bytes.fromhex(parent[:16])
        limit = self.limits.attributes
        dropped = self._attrs(span.attributes, attrs, limit, span_error=error)
        extra: list[tuple[str, Any]] = []
        if record.get("index") is not None:
            extra.append((_native.KEY_INDEX, record["index"]))
        extra += [
            (_native.KEY_SPAN_ID, record["id"]),
            (_native.KEY_THREAD_ID, record["thread_id"]),
            (_native.KEY_RANK, record["rank"]),
        ]
        if record.get("cpu_ns") is not None:
            extra.append((_native.KEY_CPU_NS, record["cpu_ns"]))
        if new_trace:
            extra.append((_native.KEY_SESSION_ID, parent))
        st = self._open.pop(record["id"], None)
        if st is not None and st.points:
            # the span's name and ids are known now: its points are complete (the exemplar
            # carries the ids this span is exported with)
            self._settle(
                st.points,
                scope=record["name"],
                span_id=record["id"],
                trace_id=trace_id,
                pid=record["pid"],
                rank=record["rank"],
                session_id=record["id"]
                if record["name"] == SESSION
                else self.session_spans.around(record["pid"], record["start_ns"]),
            )
        if st is not None:
            extra += [(_native.KEY_SUMMARY_PREFIX + name, av) for name, av in st.summaries.items()]
        for key, value in extra:
            if len(span.attributes) >= limit:
                dropped += 1
                continue
            kv = span.attributes.add(key=key)
            if isinstance(value, str | int) and not isinstance(value, bool):
                self._scalar(kv.value, value)
            else:
                kv.value.CopyFrom(value)
        span.dropped_attributes_count = dropped
        has_exception = error and bool(attrs.get("error.type"))
        events_dropped = 0
        if st is not None:
            events = list(st.events)
            if has_exception and self.limits.events and len(events) >= self.limits.events:
                events = events[len(events) - (self.limits.events - 1) :]
            span.events.extend(events)
            events_dropped = st.total - len(events)
        if has_exception:
            if self.limits.events == 0:
                events_dropped += 1
            else:
                ev = span.events.add(time_unix_nano=record["end_ns"], name="exception")
                ev.attributes.add(key=_native.KEY_EXCEPTION_TYPE).value.string_value = str(
                    attrs["error.type"]
                )
                ev.attributes.add(key=_native.KEY_EXCEPTION_MESSAGE).value.string_value = str(
                    attrs.get("error.message", "")
                )
        span.dropped_events_count = events_dropped
        if new_trace:
            assert session_trace is not None
            if self.limits.links == 0:
                span.dropped_links_count = 1
            else:
                link = span.links.add(
                    trace_id=bytes.fromhex(session_trace), span_id=bytes.fromhex(parent[:16])
                )
                if self.limits.link_attributes > 0:
                    link.attributes.add(key=_native.KEY_LINK).value.string_value = "session"
                else:
                    link.dropped_attributes_count = 1
        if error:
            span.status.CopyFrom(
                Status(code=Status.STATUS_CODE_ERROR, message=str(attrs.get("error.message") or ""))
            )
        return span

    # -- requests ------------------------------------------------------------------------

    def encode(self, batch: reader.Batch) -> list[Part]:
        """The requests of one spool file (marks first: they arrive before their span closes)."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

        if batch.doc is None:
            return []
        # The file's snapshots before its marks: the live sink adds the snapshots it takes to
        # their spans before it encodes that export's batches (which the spool wrote in this file)
        if batch.snapshots:
            ends = {s["id"]: s["end_ns"] for s in batch.spans}
            for record in batch.snapshots:
                self.add_snapshot(record, ends.get(record["span_id"]))
        for mark in batch.marks:
            self.add_mark(mark)
        version = str(batch.doc.get("sdk_version") or "")
        scope = InstrumentationScope(name=self.live.SCOPE_NAME, version=version)
        chunks: list[tuple[Any, int]] = []
        request = ExportTraceServiceRequest()
        groups: dict[tuple[int, int], Any] = {}
        size = spans = 0
        for record in batch.spans:
            span = self.span(record)
            cost = span.ByteSize() + 8
            if spans and size + cost > SPLIT_BYTES:
                chunks.append((request, spans))
                request, groups, size, spans = ExportTraceServiceRequest(), {}, 0, 0
            key = (record["pid"], record["rank"])
            group = groups.get(key)
            if group is None:
                rs = request.resource_spans.add()
                rs.resource.CopyFrom(self.resource(*key, self.hosts.get(key)))
                group = groups[key] = rs.scope_spans.add(scope=scope)
            group.spans.append(span)
            size += cost
            spans += 1
        if spans:
            chunks.append((request, spans))
        from cirron_otel.exporters.otlp_fit import fit_request

        parts: list[Part] = []
        for request, n in chunks:
            data = request.SerializeToString()
            if len(data) > self.max_request_bytes:
                fitted = fit_request(data, self.max_request_bytes)
                self.counters.truncated_values += fitted.truncated_values
                self.counters.dropped_spans += fitted.dropped_spans
                pieces = fitted.parts
            else:
                pieces = [(data, n)]
            for piece, piece_spans in pieces:
                parts.append(Part(batch.file.name, len(parts), piece, piece_spans))
        return parts + self._metric_parts(batch.file.name, scope)

    # -- metrics -------------------------------------------------------------------------

    def _metric_parts(self, file: str, scope: Any) -> list[Part]:
        """The points completed by this file, as metrics requests (after its traces: a point's
        exemplar names a span sent in this file's traces, or earlier for the session)."""
        if not self._ready:
            return []
        groups: dict[tuple[tuple[int, int, str | None], tuple[int, str]], list[Point]] = {}
        for point in self._ready:
            groups.setdefault((point.process, point.session), []).append(point)
        self._ready = []
        parts: list[Part] = []
        for (process, session), points in groups.items():
            points.sort(key=Point.order)
            for data, n in self._metric_requests(points, self.resource(*process), scope, session):
                parts.append(Part(file, len(parts), data, 0, signal="metrics", points=n))
        return parts

    def _metric_requests(
        self, points: list[Point], resource: Any, scope: Any, session: tuple[int, str]
    ) -> list[tuple[bytes, int]]:
        """`mpoints_encode`: one Metric per name (a non-monotonic cumulative Sum), requests cut
        between points at max_request_bytes (a lone point larger than that is dropped, counted,
        as the live sink's `_fit` does)."""
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )
        from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, NumberDataPoint

        prefix = self.metrics_prefix or ""
        start_ns, session_id = session
        out: list[tuple[bytes, int]] = []
        request: Any = None
        metric: Any = None
        size = count = 0
        base = resource.ByteSize() + scope.ByteSize() + 4 * _FRAME

        def seal() -> None:
            nonlocal request, metric, size, count
            if request is not None and count:
                data = request.SerializeToString()
                if len(data) <= self.max_request_bytes:
                    out.append((data, count))
                else:
                    self.counters.points_dropped += count
            request, metric, size, count = None, None, 0, 0

        for point in points:
            dp = NumberDataPoint(start_time_unix_nano=start_ns, time_unix_nano=point.ts)
            # attribute order as live: scope, rank, session
            dp.attributes.add(key=_native.KEY_SCOPE).value.string_value = point.scope
            dp.attributes.add(key=_native.KEY_RANK).value.int_value = point.rank
            dp.attributes.add(key=_native.KEY_SESSION_ID).value.string_value = session_id
            ex = dp.exemplars.add(time_unix_nano=point.ts, span_id=point.span_id, trace_id=point.trace_id)
            if isinstance(point.value, int):
                dp.as_int = ex.as_int = point.value
            else:
                dp.as_double = ex.as_double = point.value
            name = prefix + point.name
            opens = metric is None or metric.name != name
            cost = dp.ByteSize() + _FRAME + (len(name.encode()) + 4 * _FRAME if opens else 0)
            if count and size + cost + _MREQ_RESERVE > self.max_request_bytes:
                seal()
                opens = True
            if request is None:
                request = ExportMetricsServiceRequest()
                rm = request.resource_metrics.add()
                rm.resource.CopyFrom(resource)
                rm.scope_metrics.add(scope=scope)
                size = base
                opens = True
            if opens:
                metric = request.resource_metrics[0].scope_metrics[0].metrics.add(name=name)
                metric.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
                metric.sum.is_monotonic = False
                cost = dp.ByteSize() + _FRAME + len(name.encode()) + 4 * _FRAME
            metric.sum.data_points.append(dp)
            size += cost
            count += 1
        seal()
        return out

    def finish(self) -> None:
        self.counters.pending_marks = sum(
            st.total - st.snapshots + len(st.summaries) for st in self._open.values()
        )
        self.counters.pending_snapshots = sum(st.snapshots for st in self._open.values())
        self.counters.pending_points = sum(len(st.points) for st in self._open.values())


def iter_parts(
    path: str | os.PathLike[str],
    encoder_args: dict[str, Any] | None = None,
    files: list[reader.SpoolFile] | None = None,
) -> Iterator[tuple[Encoder, Part]]:
    """Every request of the spool, in order."""
    files = reader.list_files(path) if files is None else files
    enc = Encoder(sessions=sessions_of(files), **(encoder_args or {}))
    for batch in reader.iter_batches(path, files):
        if batch.doc is None:
            reader.warn_unreadable(batch)
        for part in enc.encode(batch):
            yield enc, part
    enc.finish()


def to_otlp_json(data: bytes) -> dict[str, Any]:
    """The OTLP/JSON encoding of a serialized request (OTLP spec: lowerCamelCase fields, enums as
    integers, trace and span ids as hex rather than protobuf JSON's base64)."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(data)
    doc = json_format.MessageToDict(request, use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                _hex_ids(span)
                for link in span.get("links", ()):
                    _hex_ids(link)
    return doc


def _hex_ids(obj: dict[str, Any]) -> None:
    import base64

    for key in ("traceId", "spanId", "parentSpanId"):
        if key in obj:
            obj[key] = base64.b64decode(obj[key]).hex()
