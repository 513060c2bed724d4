"""Real OTLP trace receivers (gRPC and HTTP/protobuf) running in-process on loopback, for tests.

Both store every accepted `ExportTraceServiceRequest` with its headers, decode them to plain dicts
(`spans()`), can fail the next N requests (`fail_next`), answer slowly (`delay`), and can be stopped and
restarted on the same port (`stop` / `start` / `restart`) to simulate a collector outage.

Like a collector, both also take metrics (the marks' data points, README "Marks as metrics"):
stored apart in `metric_requests`, never failed, delayed or counted with the traces' requests,
so the traces' tests see exactly what they did before metrics existed.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self, TypedDict

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2_grpc import (
    MetricsServiceServicer,
    add_MetricsServiceServicer_to_server,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

HOST = "127.0.0.1"


class EventDict(TypedDict):
    name: str
    time_ns: int
    attributes: dict[str, Any]


class LinkDict(TypedDict):
    trace_id: str
    span_id: str
    attributes: dict[str, Any]
    dropped_attributes_count: int


class StatusDict(TypedDict):
    code: int
    message: str


class ScopeDict(TypedDict):
    name: str
    version: str


class SpanDict(TypedDict):
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[EventDict]
    links: list[LinkDict]
    status: StatusDict
    dropped_attributes_count: int
    dropped_events_count: int
    dropped_links_count: int
    resource: dict[str, Any]
    scope: ScopeDict


def any_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as a Python value: str, int, float, bool, bytes, list, dict, or None."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, which)


def attributes(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def decode_spans(request: ExportTraceServiceRequest) -> list[SpanDict]:
    out: list[SpanDict] = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            scope = ScopeDict(name=ss.scope.name, version=ss.scope.version)
            for s in ss.spans:
                out.append(
                    SpanDict(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=s.kind,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=attributes(s.attributes),
                        events=[
                            EventDict(
                                name=e.name, time_ns=e.time_unix_nano, attributes=attributes(e.attributes)
                            )
                            for e in s.events
                        ],
                        links=[
                            LinkDict(
                                trace_id=lk.trace_id.hex(),
                                span_id=lk.span_id.hex(),
                                attributes=attributes(lk.attributes),
                                dropped_attributes_count=lk.dropped_attributes_count,
                            )
                            for lk in s.links
                        ],
                        status=StatusDict(code=s.status.code, message=s.status.message),
                        dropped_attributes_count=s.dropped_attributes_count,
                        dropped_events_count=s.dropped_events_count,
                        dropped_links_count=s.dropped_links_count,
                        resource=resource,
                        scope=scope,
                    )
                )
    return out


class _Receiver:
    """Storage, failure injection and waiting, shared by both transports."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[ExportTraceServiceRequest] = []  # accepted requests, in arrival order
        self.headers: list[dict[str, str]] = []  # lower-cased headers of each accepted request
        self.attempts = 0  # every export request received, accepted or failed
        self.arrival_times: list[float] = []  # time.monotonic() as each request arrived, before `delay`
        self.failed_times: list[float] = []  # arrival times of the requests answered with a failure
        self.delay = 0.0  # seconds to wait before answering (a slow collector)
        self._cond = threading.Condition()
        self._span_total = 0
        self._fail_left = 0
        self._retry_after: float | str | None = None
        self._stopping = threading.Event()
        self.tls: tuple[str, str] | None = None  # (key file, certificate file): serve TLS
        self.client_ca: str | None = None  # with tls: require a client certificate this CA signed
        self._reject: tuple[int, str] | None = None
        self.metric_requests: list[ExportMetricsServiceRequest] = []
        self.accept_metrics = True  # False: a traces-only endpoint (Jaeger's own OTLP port)
        self.metric_refusals = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def _admit(self) -> tuple[bool, float | str | None]:
        """Count one request; return (fail it?, retry-after seconds). Waits `delay` first."""
        arrived = time.monotonic()
        with self._cond:
            self.arrival_times.append(arrived)
            self._cond.notify_all()
        if self.delay:
            self._stopping.wait(self.delay)
        with self._cond:
            self.attempts += 1
            if self._fail_left > 0:
                self._fail_left -= 1
                self.failed_times.append(arrived)
                return True, self._retry_after
            return False, None

    def reject_spans_next(self, spans: int, message: str = "rejected on purpose") -> None:
        """Accept the next request but answer that `spans` of its spans were rejected (partial success)."""
        with self._cond:
            self._reject = (spans, message)

    def _response(self) -> ExportTraceServiceResponse:
        with self._cond:
            reject, self._reject = self._reject, None
        if reject is None:
            return ExportTraceServiceResponse()
        response = ExportTraceServiceResponse()
        response.partial_success.rejected_spans, response.partial_success.error_message = reject
        return response

    def _store(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        with self._cond:
            self.requests.append(request)
            self.headers.append(headers)
            self._span_total += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            self._cond.notify_all()

    def _store_metrics(self, request: ExportMetricsServiceRequest) -> None:
        with self._cond:
            self.metric_requests.append(request)
            self._cond.notify_all()

    def metric_points(self) -> list[tuple[str, dict[str, Any], float | int]]:
        """(metric name, point attributes, value) of every data point received, in order."""
        with self._cond:
            requests = list(self.metric_requests)
        out = []
        for request in requests:
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        for p in getattr(m, kind).data_points if kind else ():
                            out.append((m.name, attributes(p.attributes), getattr(p, p.WhichOneof("value"))))
        return out

    def wait_for_metric_points(self, n: int, name_prefix: str = "", timeout: float = 5.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            points = [p for p in self.metric_points() if p[0].startswith(name_prefix)]
            if len(points) >= n:
                return points
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(points)} metric points arrived within {timeout}s, wanted {n}")
            time.sleep(0.02)

    def _set_failures(self, n: int, retry_after: float | str | None) -> None:
        with self._cond:
            self._fail_left, self._retry_after = n, retry_after

    def spans(self) -> list[SpanDict]:
        """Every span of every accepted request, flattened, in arrival order."""
        with self._cond:
            requests = list(self.requests)
        return [span for request in requests for span in decode_spans(request)]

    def span_count(self) -> int:
        with self._cond:
            return self._span_total

    def wait_for_spans(self, n: int, timeout: float = 5.0) -> list[SpanDict]:
        """Block until at least `n` spans arrived, then return `spans()`; AssertionError on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._span_total >= n, timeout):
                raise AssertionError(f"{self._span_total} spans arrived within {timeout}s, wanted {n}")
        return self.spans()

    def wait_for_arrivals(self, n: int, timeout: float = 5.0) -> None:
        """Block until at least `n` requests arrived (accepted, failed or still being answered)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.arrival_times) >= n, timeout):
                got = len(self.arrival_times)
                raise AssertionError(f"{got} requests arrived within {timeout}s, wanted {n}")

    def clear(self) -> None:
        with self._cond:
            self.requests.clear()
            self.headers.clear()
            self.arrival_times.clear()
            self.failed_times.clear()
            self.metric_requests.clear()
            self.attempts = self._span_total = 0

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _MetricsService(MetricsServiceServicer):
    def __init__(self, receiver: _Receiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ExportMetricsServiceResponse:
        self.receiver._store_metrics(request)
        return ExportMetricsServiceResponse()


class GrpcReceiver(_Receiver, TraceServiceServicer):
    """OTLP/gRPC TraceService on 127.0.0.1. `endpoint` is "http://127.0.0.1:PORT" (insecure).

    grpcio decompresses transparently and hides `grpc-encoding`, so to prove a client compresses, use
    `accept_gzip=False`: gzip requests then fail with UNIMPLEMENTED before reaching `Export`.
    """

    def __init__(
        self, *, accept_gzip: bool = True, tls: tuple[str, str] | None = None, client_ca: str | None = None
    ) -> None:
        super().__init__()
        self.accept_gzip = accept_gzip
        self.tls, self.client_ca = tls, client_ca
        self._server: grpc.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._fail_code = grpc.StatusCode.UNAVAILABLE

    def fail_next(
        self, n: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, retry_after: float | None = None
    ) -> None:
        """Answer the next `n` requests with `code`; `retry_after` sends a google.rpc.RetryInfo delay."""
        self._fail_code = code
        self._set_failures(n, retry_after)

    def Export(
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        fail, retry_after = self._admit()
        if fail:
            if retry_after is not None:
                assert isinstance(retry_after, int | float)
                info = RetryInfo(
                    retry_delay=Duration(seconds=int(retry_after), nanos=int(retry_after % 1 * 1e9))
                )
                context.set_trailing_metadata((("google.rpc.retryinfo-bin", info.SerializeToString()),))
            context.abort(self._fail_code, "injected failure")
        headers = {
            k.lower(): v if isinstance(v, str) else v.decode("latin-1")
            for k, v in context.invocation_metadata()
        }
        self._store(request, headers)
        return self._response()

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc-receiver")
        # No SO_REUSEPORT: a restarted receiver must own its port alone.
        options: list[tuple[str, int]] = [("grpc.so_reuseport", 0)]
        if not self.accept_gzip:
            options.append(("grpc.compression_enabled_algorithms_bitset", 1))  # identity only
        server = grpc.server(self._pool, options=options)
        add_TraceServiceServicer_to_server(self, server)
        if self.accept_metrics:  # else: UNIMPLEMENTED, as from a server without the service
            add_MetricsServiceServicer_to_server(_MetricsService(self), server)
        if self.tls:
            key, cert = (Path(path).read_bytes() for path in self.tls)
            credentials = grpc.ssl_server_credentials(
                [(key, cert)],
                root_certificates=Path(self.client_ca).read_bytes() if self.client_ca else None,
                require_client_auth=self.client_ca is not None,
            )
            port = server.add_secure_port(f"{HOST}:{self.port}", credentials)
        else:
            port = server.add_insecure_port(f"{HOST}:{self.port}")
        if port == 0 or (self.port and port != self.port):
            raise RuntimeError(f"cannot bind {HOST}:{self.port}")
        self.port = port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop listening and cancel in-flight calls; `start()` again binds the same port."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.stop(grace=None).wait()
        self._server = None
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        self._pool = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real collector
    timeout = 10
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def _reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        # the client may be gone (a test killed it): the request was stored all the same
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v1/metrics" and self.server.receiver.accept_metrics:
            return self._metrics(body)
        if self.path == "/v1/metrics":
            with self.server.receiver._cond:
                self.server.receiver.metric_refusals += 1
            return self._reply(404)
        if self.path != "/v1/traces":
            return self._reply(404)
        if self.headers.get_content_type() != "application/x-protobuf":
            return self._reply(415)
        receiver = self.server.receiver
        fail, retry_after = receiver._admit()
        if fail:
            if retry_after is None:
                extra = {}
            else:  # seconds, or a ready-made value such as an HTTP-date
                extra = {"Retry-After": retry_after if isinstance(retry_after, str) else f"{retry_after:g}"}
            return self._reply(receiver._fail_status, headers=extra)
        encoding = self.headers.get("Content-Encoding", "").lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            request = ExportTraceServiceRequest.FromString(body)
        except Exception:
            return self._reply(400)
        receiver._store(request, {k.lower(): v for k, v in self.headers.items()})
        self._reply(200, receiver._response().SerializeToString())

    def _metrics(self, body: bytes) -> None:
        try:
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            request = ExportMetricsServiceRequest.FromString(body)
        except Exception:
            return self._reply(400)
        self.server.receiver._store_metrics(request)
        self._reply(200, ExportMetricsServiceResponse().SerializeToString())

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _shut(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every handler thread: nothing leaks

    def __init__(self, port: int, receiver: HttpReceiver) -> None:
        self.receiver = receiver
        self._conns: set[socket.socket] = set()
        self._closing = False
        self._lock = threading.Lock()
        super().__init__((HOST, port), _Handler)
        if receiver.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile=receiver.tls[1], keyfile=receiver.tls[0])
            if receiver.client_ca:  # the handshake fails without a client certificate it signed
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(cafile=receiver.client_ca)
            self.socket = context.wrap_socket(self.socket, server_side=True)

    def track(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
            if self._closing:
                _shut(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def drop_connections(self) -> None:
        """Close kept-alive client connections, so a stopped receiver really is unreachable."""
        with self._lock:
            self._closing = True
            for conn in self._conns:
                _shut(conn)


class HttpReceiver(_Receiver):
    """OTLP/HTTP (protobuf) on 127.0.0.1: POST `traces_url` = endpoint + "/v1/traces"."""

    def __init__(self, *, tls: tuple[str, str] | None = None, client_ca: str | None = None) -> None:
        super().__init__()
        self.tls, self.client_ca = tls, client_ca
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._fail_status = 503

    @property
    def traces_url(self) -> str:
        return f"{self.endpoint}/v1/traces"

    def fail_next(self, n: int, status: int = 503, retry_after: float | str | None = None) -> None:
        """Answer the next `n` requests with HTTP `status`; `retry_after` sets a Retry-After header
        (seconds, or a string sent as it is, e.g. an HTTP-date)."""
        self._fail_status = status
        self._set_failures(n, retry_after)

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HttpServer(self.port, self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-http-receiver",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, drop open connections, join all threads; `start()` again binds the same port."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.drop_connections()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join()
        self._httpd = self._thread = None
