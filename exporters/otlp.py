"""OTLP export of Cirron spans and marks, through the official OpenTelemetry exporters.

The mapping itself is native (`_native.otlp_encode`, see the README's mapping table): the
collector's batches become one `ExportTraceServiceRequest` without building Python span
objects. The request bytes then travel through the official `opentelemetry-exporter-otlp`
transports (gRPC by default, HTTP/protobuf on request), so endpoints, headers, timeouts,
compression and TLS follow the standard `OTEL_EXPORTER_OTLP_*` variables.

Durability: when an output directory is available, each request is first written to the
outbox (`<output_dir>/otlp-outbox/`, atomic and fsynced like the spool) and deleted only
once the collector has accepted it. A collector outage therefore loses nothing: requests
wait in the outbox and are sent again, oldest first, when it is back, including by the
next run of the program. Without a directory, a bounded in-memory queue plays that role.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cirron_otel import _native
from cirron_otel._version import __version__

from .base import Sink
from .spool_dir import SpoolDirectory, new_file_name

OUTBOX_DIR = "otlp-outbox"
SCOPE_NAME = "cirron_otel"


class Transport(Protocol):
    def send(self, request: bytes) -> str | None:
        """Deliver one serialized ExportTraceServiceRequest; None on success, else the error."""


class GrpcTransport:
    """OTLP/gRPC through the official exporter (its retries, headers, TLS, compression)."""

    def __init__(self, endpoint: str | None) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        class _PreEncoded(OTLPSpanExporter):
            # The request is already built natively: hand it to the exporter's send path.
            def _translate_data(self, data: Any) -> Any:
                return data

            def _count_data(self, data: Any) -> int:
                return sum(len(ss.spans) for rs in data.resource_spans for ss in rs.scope_spans)

        self._parse = ExportTraceServiceRequest.FromString
        self._exporter = _PreEncoded(endpoint=endpoint) if endpoint else _PreEncoded()

    def send(self, request: bytes) -> str | None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        result = self._exporter._export(self._parse(request))
        return None if result == SpanExportResult.SUCCESS else "the collector did not accept the request"

    def shutdown(self) -> None:
        self._exporter.shutdown(timeout_millis=1000)


class HttpTransport:
    """OTLP/HTTP (protobuf) through the official exporter's client."""

    def __init__(self, endpoint: str | None) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        self._exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()

    def send(self, request: bytes) -> str | None:
        result = self._exporter._client.export(request)
        if result.success:
            return None
        return f"HTTP {result.status_code}" if result.status_code else str(result.error)

    def shutdown(self) -> None:
        self._exporter.shutdown()


def make_transport(protocol: str, endpoint: str | None) -> Transport:
    if protocol == "grpc":
        return GrpcTransport(endpoint)
    if protocol == "http/protobuf":
        return HttpTransport(endpoint)
    raise ValueError(f"OTLP protocol must be 'grpc' or 'http/protobuf', got {protocol!r}")


def build_resource(service_name: str | None, rank: int) -> tuple[dict[str, Any], bytes]:
    """The process's Resource (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME and telemetry.sdk.*
    merged by the SDK), as attributes and as OTLP protobuf bytes."""
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"process.pid": os.getpid(), "host.name": socket.gethostname(),
                                "cirron.rank": rank})
    if service_name:
        resource = resource.merge(Resource({"service.name": service_name}))
    elif str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "cirron"}))
    attrs = dict(resource.attributes)
    return attrs, encode_resource(attrs)


def encode_resource(attrs: dict[str, Any]) -> bytes:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource

    def any_value(v: Any) -> AnyValue:
        if isinstance(v, bool):
            return AnyValue(bool_value=v)
        if isinstance(v, int):
            return AnyValue(int_value=v)
        if isinstance(v, float):
            return AnyValue(double_value=v)
        if isinstance(v, list | tuple):
            return AnyValue(array_value=ArrayValue(values=[any_value(x) for x in v]))
        return AnyValue(string_value=str(v))

    return PbResource(attributes=[KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]
                      ).SerializeToString()


class OtlpSink(Sink):
    """Maps batches to OTLP and delivers them, durably when it has an outbox directory."""

    name = "otlp"
    backpressure = False

    def __init__(
        self,
        transport: Transport,
        *,
        resource: bytes,
        session_trace: Callable[[], tuple[int, int]],
        event_limit: int = 128,
        outbox_dir: str | os.PathLike[str] | None = None,
        outbox_max_bytes: int = 1_000_000_000,
        memory_queue_requests: int = 64,
        send_budget: float = 5.0,
    ) -> None:
        super().__init__()
        self.transport = transport
        self.resource = resource
        self.session_trace = session_trace
        self.state = _native.OtlpState(event_limit)
        self.outbox = (
            SpoolDirectory(outbox_dir, outbox_max_bytes, subdir=OUTBOX_DIR, suffix=".pb")
            if outbox_dir is not None else None
        )
        self._memory: deque[tuple[bytes, int]] = deque(maxlen=memory_queue_requests)
        self.send_budget = send_budget
        self._healthy = True
        self._backoff = 0.5
        self._next_attempt = 0.0
        self.stats.extra.update(requests_sent=0, outbox=self.outbox.path if self.outbox else None,
                                root_marks=0, unsampled_spans=0, events_dropped=0)
        if self.outbox is not None:  # requests a previous run could not deliver
            with self.stats.lock:
                self.stats.pending += sum(_spans_in(name) for name, _ in self.outbox.scan()[0])

    # -- Sink interface ------------------------------------------------------------------

    def export(self, batches: Sequence[_native.Batch]) -> None:
        try:
            requests = _native.otlp_encode(
                self.state, batches, self.resource, SCOPE_NAME, __version__, self.session_trace()
            )
        except Exception as exc:
            with self.stats.lock:
                self.stats.dropped += sum(b.span_count for b in batches)
            self.stats.error("encoding failed", exc)
            return
        self._update_counters()
        if not requests:
            return
        for request, spans in requests:
            self._enqueue(request, spans)
        if self._healthy or time.monotonic() >= self._next_attempt:
            self.retry()

    def retry(self) -> None:
        deadline = time.monotonic() + self.send_budget
        while time.monotonic() < deadline:
            item = self._oldest()
            if item is None:
                self._healthy = True
                self._backoff = 0.5
                return
            name, request, spans = item
            try:
                error = self.transport.send(request)
            except Exception as exc:  # a transport bug must not stop the worker
                error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                # new requests wait in the queue; the next attempt comes after a backoff
                self._healthy = False
                self._next_attempt = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, 10.0)
                with self.stats.lock:
                    self.stats.failed += 1
                self.stats.error("export failed", error)
                return
            self._forget(name)
            with self.stats.lock:
                self.stats.exported += spans
                self.stats.pending -= spans
                self.stats.extra["requests_sent"] += 1
            _native.progress()

    def shutdown(self, timeout: float) -> None:
        self.send_budget = max(0.0, timeout)
        self.retry()
        with contextlib.suppress(Exception):
            self.transport.shutdown()  # type: ignore[attr-defined]

    # -- queue: the outbox on disk, or memory ---------------------------------------------

    def _enqueue(self, request: bytes, spans: int) -> None:
        with self.stats.lock:
            self.stats.pending += spans
        if self.outbox is not None:
            _, _, name = new_file_name(f"-{spans}.pb")
            try:
                self.outbox.write_bytes(name, request)
                evicted = self.outbox.enforce_cap(name, lambda e: self.stats.error("outbox eviction", e))
                if evicted:
                    self.stats.error("outbox full", f"{evicted} oldest requests dropped")
                return
            except OSError as exc:
                self.stats.error("outbox write failed", exc)
        if len(self._memory) == self._memory.maxlen:
            _, lost = self._memory.popleft()
            with self.stats.lock:
                self.stats.dropped += lost
                self.stats.pending -= lost
            self.stats.error("queue full", f"{lost} spans dropped while the collector is unreachable")
        self._memory.append((request, spans))

    def _oldest(self) -> tuple[str | None, bytes, int] | None:
        if self._memory:
            request, spans = self._memory[0]
            return None, request, spans
        if self.outbox is None:
            return None
        files = self.outbox.scan()[0]
        while files:
            name = files.pop(0)[0]
            try:
                return name, self.outbox.read(name), _spans_in(name)
            except OSError:
                continue  # evicted or removed meanwhile
        return None

    def _forget(self, name: str | None) -> None:
        if name is None:
            self._memory.popleft()
            return
        try:
            self.outbox.remove(name)  # type: ignore[union-attr]
        except OSError as exc:
            self.stats.error("outbox cleanup failed", exc)

    def _update_counters(self) -> None:
        with self.stats.lock:
            self.stats.extra["root_marks"] = self.state.root_marks
            self.stats.extra["unsampled_spans"] = self.state.unsampled_spans
            self.stats.extra["events_dropped"] = self.state.events_dropped


def _spans_in(name: str) -> int:
    """Outbox files are named <created_ns>-<id>-<spans>.pb."""
    try:
        return int(name.rsplit("-", 1)[1].removesuffix(".pb"))
    except (IndexError, ValueError):
        return 0
