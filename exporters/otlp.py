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
import fcntl
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from cirron_otel import _native
from cirron_otel._version import __version__

from .base import Sink
from .spool_dir import SpoolDirectory, new_file_name

OUTBOX_DIR = "otlp-outbox"
_GONE = "gone"  # an outbox file another process already delivered
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
    """Maps batches to OTLP requests and delivers them from a durable queue.

    `export` (on the sink's worker) only encodes and queues, so it keeps pace with the
    collector thread whatever the network does; a sender thread of its own delivers the
    queue, oldest first, backing off while the collector fails.
    """

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
        memory_queue_requests: int = 256,
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
        # The queue: (outbox file name or None, request bytes or None when on disk, spans)
        self._queue: deque[tuple[str | None, bytes | None, int]] = deque()
        self._memory_limit = memory_queue_requests
        self._cv = threading.Condition()
        self._stopping = False
        self._backoff = 0.0
        self._retry_at = 0.0
        self.stats.extra.update(requests_sent=0, outbox=self.outbox.path if self.outbox else None,
                                root_marks=0, unsampled_spans=0, events_dropped=0)
        if self.outbox is not None:  # requests a previous run could not deliver, oldest first
            for name, _ in self.outbox.scan()[0]:
                self._queue.append((name, None, _spans_in(name)))
                self.stats.pending += _spans_in(name)
        self._sender = threading.Thread(target=self._send_loop, name="cirron-otel-otlp-sender",
                                        daemon=True)
        self._sender.start()

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
        for request, spans in requests:
            self._enqueue(request, spans)

    def retry(self) -> None:
        with self._cv:
            self._retry_at = 0.0
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Try now, and wait until the queue is delivered; False as soon as an attempt fails
        (the queue then waits for the collector) or at the timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            failed = self.stats.failed
            self._retry_at = 0.0
            self._cv.notify_all()
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0 or self.stats.failed != failed or not self._sender.is_alive():
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def shutdown(self, timeout: float) -> None:
        """Deliver what is queued within `timeout`; what is left stays in the outbox."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._retry_at = 0.0
            self._cv.notify_all()
            while self._queue and self._sender.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.1))
            self._stopping = True
            self._cv.notify_all()
        self._sender.join(max(0.0, deadline - time.monotonic()) + 0.5)
        with contextlib.suppress(Exception):
            self.transport.shutdown()  # type: ignore[attr-defined]

    # -- the queue ------------------------------------------------------------------------

    def _enqueue(self, request: bytes, spans: int) -> None:
        name = None
        if self.outbox is not None:
            _, _, name = new_file_name(f"-{spans}.pb")
            try:
                self.outbox.write_bytes(name, request)
            except OSError as exc:
                self.stats.error("outbox write failed", exc)
                name = None
        with self._cv:
            self.stats.pending += spans
            self._queue.append((name, None if name else request, spans))
            self._trim_locked()
            self._cv.notify_all()

    def _trim_locked(self) -> None:
        """Past the outbox's byte cap or the memory limit, drop the oldest (counted)."""
        while True:
            in_memory = sum(1 for name, _, _ in self._queue if name is None)
            over_memory = in_memory > self._memory_limit
            over_disk = self.outbox is not None and self.outbox.over_cap()
            if not (over_memory or over_disk) or len(self._queue) <= 1:
                return
            index = next(i for i, item in enumerate(self._queue) if (item[0] is None) == over_memory)
            name, _, spans = self._queue[index]
            del self._queue[index]
            if name is not None:
                self._remove(name)
            self.stats.pending -= spans
            self.stats.dropped += spans
            self.stats.error("queue full", f"{spans} spans dropped: the collector is too far behind")

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping:
                    now = time.monotonic()
                    if self._queue and now >= self._retry_at:
                        break
                    self._cv.wait(max(0.0, self._retry_at - now) if self._queue else None)
                if self._stopping:
                    return
                name, request, spans = self._queue[0]
            with self._outbox_lock():
                error = self._send(name, request)
                if error is None and name is not None:
                    self._remove(name)
            with self._cv:
                if error is _GONE:  # another process sharing the outbox delivered it
                    if self._queue and self._queue[0][0] == name:
                        self._queue.popleft()
                    self.stats.pending -= spans
                    self._cv.notify_all()
                    continue
                if error is None:
                    if self._queue and self._queue[0][0] == name:
                        self._queue.popleft()
                    self.stats.pending -= spans
                    self.stats.exported += spans
                    self.stats.extra["requests_sent"] += 1
                    self._backoff = 0.0
                else:
                    self.stats.failed += 1
                    self._backoff = min(max(self._backoff * 2, 0.5), 10.0)
                self._retry_at = time.monotonic() + self._backoff
                self._cv.notify_all()
            if error is None:
                _native.progress()
            else:
                self.stats.error("export failed", error)

    @contextlib.contextmanager
    def _outbox_lock(self) -> Iterator[None]:
        """Processes sharing an output directory (ranks, forked children) send and delete
        outbox files one at a time, so none is delivered twice."""
        if self.outbox is None:
            yield
            return
        fd = None
        try:
            path = os.path.join(self.outbox.path, ".lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no directory yet (nothing on disk to share) or no locking: go on
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)

    def _send(self, name: str | None, request: bytes | None) -> str | None:
        try:
            if request is None:
                try:
                    request = self.outbox.read(name)  # type: ignore[union-attr,arg-type]
                except FileNotFoundError:
                    return _GONE
            return self.transport.send(request)
        except Exception as exc:  # a transport bug must not stop the sender
            return f"{type(exc).__name__}: {exc}"

    def _remove(self, name: str) -> None:
        try:
            self.outbox.remove(name)  # type: ignore[union-attr]
        except FileNotFoundError:
            pass
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
