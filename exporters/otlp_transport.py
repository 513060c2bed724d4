"""OTLP transports on public APIs: one attempt per `send`, and the outcome classified.

The official exporters retry internally and reduce every outcome to SUCCESS/FAILURE, which
hides what the OTLP sink must know: whether a rejected request may ever succeed. Here each
`send` makes exactly one attempt and returns None (accepted) or a `SendError` saying whether
the OTLP specification calls the failure retryable and how long the collector asked to wait.
The sink's queue does the retrying.

- gRPC: a unary `Export` call on a `grpc` channel, carrying the serialized request as it is.
- HTTP/protobuf: a `requests.Session` POSTing `application/x-protobuf`.

Both take an `OtlpTransportConfig` (endpoint, headers, timeout, compression, TLS files),
resolved from `profile()` and the standard `OTEL_EXPORTER_OTLP_*` variables in `_config`.
"""

from __future__ import annotations

import email.utils
import gzip
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from cirron_otel._config import OtlpTransportConfig
from cirron_otel._version import __version__

# A collector may ask for any delay; past this we try again anyway (the request is on disk).
MAX_SERVER_DELAY = 300.0

# OTLP specification, "Failures": the gRPC codes worth retrying. RESOURCE_EXHAUSTED only when
# the server says when (RetryInfo); every other code is permanent.
GRPC_RETRYABLE = frozenset(
    {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "DATA_LOSS"}
)
HTTP_RETRYABLE = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class SendError:
    """Why a request was not accepted."""

    message: str
    retryable: bool
    retry_after: float | None = None  # seconds the collector asked us to wait, if it said


@dataclass(frozen=True)
class PartialSuccess:
    """Accepted, but the collector rejected some of the spans (never retried: the specification)."""

    rejected_spans: int
    message: str


def partial_success(response: Any) -> PartialSuccess | None:
    """What an Export*ServiceResponse says it rejected (spans, or metric data points), if anything."""
    part = response.partial_success
    rejected = getattr(part, "rejected_spans", None)
    if rejected is None:
        rejected = part.rejected_data_points
    return PartialSuccess(rejected, part.error_message) if rejected > 0 else None


# The OTLP services requests go to, by signal: the gRPC method, and the response message.
SERVICES = {
    "traces": (
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
        "ExportTraceServiceResponse",
    ),
    "metrics": (
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        "opentelemetry.proto.collector.metrics.v1.metrics_service_pb2",
        "ExportMetricsServiceResponse",
    ),
}


def _response_type(signal: str) -> Any:
    import importlib

    _, module, name = SERVICES[signal]
    return getattr(importlib.import_module(module), name)


class Transport(Protocol):
    def send(self, request: bytes) -> SendError | PartialSuccess | None:
        """One attempt to deliver a serialized ExportTraceServiceRequest; None when accepted."""

    def before_fork(self) -> None:
        """The process is about to fork: no call of ours may be on the wire (see GrpcTransport)."""

    def after_fork_in_parent(self) -> None:
        """The fork is done: send again."""

    def shutdown(self) -> None:
        """Release connections."""


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def grpc_retry_delay(trailing_metadata: Any) -> float | None:
    """The RetryInfo delay a gRPC status carries, either as `google.rpc.retryinfo-bin` or inside
    the rich status (`grpc-status-details-bin`); None when there is none."""
    from google.rpc.error_details_pb2 import RetryInfo  # loaded by GrpcTransport(): see there
    from google.rpc.status_pb2 import Status

    info: RetryInfo | None = None
    for key, value in trailing_metadata or ():
        try:
            if key == "google.rpc.retryinfo-bin":
                info = RetryInfo.FromString(value)
            elif key == "grpc-status-details-bin":
                for detail in Status.FromString(value).details:
                    if detail.Is(RetryInfo.DESCRIPTOR):
                        info = RetryInfo()
                        detail.Unpack(info)
        except Exception:  # a malformed detail is no RetryInfo
            continue
    if info is None or not info.HasField("retry_delay"):
        return None
    return max(0.0, info.retry_delay.seconds + info.retry_delay.nanos / 1e9)


def classify_grpc(code_name: str, details: str | None, trailing_metadata: Any) -> SendError:
    delay = grpc_retry_delay(trailing_metadata)
    retryable = code_name in GRPC_RETRYABLE or (code_name == "RESOURCE_EXHAUSTED" and delay is not None)
    text = f"gRPC {code_name}" + (f": {details}" if details else "")
    return SendError(text, retryable, delay if retryable else None)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date; None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class GrpcTransport:
    """OTLP/gRPC: one unary `Export` call per `send`, with the configured deadline."""

    def __init__(self, config: OtlpTransportConfig) -> None:
        # Everything `send` needs is imported here, on the thread that calls profile(), never
        # for the first time on the sender thread: a process forked while that thread holds a
        # module's import lock inherits the lock held by a thread that does not exist in the
        # child, and the child's sender then blocks forever on that import, holding the
        # outbox lock every process sharing the outbox waits for.
        import google.rpc.error_details_pb2
        import google.rpc.status_pb2  # noqa: F401
        import grpc

        self.config = config
        self._grpc = grpc
        self._response_type = _response_type(config.signal)
        # a -bin key's value goes as bytes (gRPC base64-encodes it on the wire)
        self._metadata = (
            tuple((k, v.encode() if k.endswith("-bin") else v) for k, v in config.headers) or None
        )
        # Read once: the channel opened again after a fork must not depend on the files still
        # being there (profile() checked them: _config._check_tls_files).
        self._tls = (
            None
            if config.insecure
            else (_read(config.certificate), _read(config.client_key), _read(config.client_certificate))
        )
        if self._tls is not None and (self._tls[1] is None) != (self._tls[2] is None):
            # grpcio aborts the process (a failed CHECK in its core) on a key without a chain
            raise ValueError("mutual TLS needs both the client certificate and its private key")
        # gRPC does not survive a fork() while a thread is in a call: it skips its fork
        # handlers, and the child crashes (SIGSEGV) when it makes a channel of its own. So a
        # fork closes the channel when a call is on the wire (the call ends CANCELLED, its
        # request stays in the outbox and goes again), no call starts until the fork is done,
        # and the parent then opens a new channel. Blocking calls, not futures: a future
        # starts a thread, which Python 3.12+ refuses at interpreter exit. Several sender
        # threads may be in a call at once (one channel: HTTP/2 multiplexes them).
        self._call_lock = threading.Condition()
        self._in_call = 0  # calls on the wire
        self._forking = False
        self._open_channel()

    def _open_channel(self) -> None:
        grpc, config = self._grpc, self.config
        gzipped = config.compression == "gzip"
        compression = grpc.Compression.Gzip if gzipped else grpc.Compression.NoCompression
        # The sink backs off on its own; the channel must not add minutes of reconnect backoff
        # after a long outage (gRPC's default grows to 120 s).
        options = [
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.primary_user_agent", f"cirron-otel/{__version__}"),
        ]
        if config.insecure:
            self._channel = grpc.insecure_channel(config.endpoint, options=options, compression=compression)
        else:
            assert self._tls is not None
            ca, key, chain = self._tls
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=chain
            )
            self._channel = grpc.secure_channel(
                config.endpoint, credentials, options=options, compression=compression
            )
        # The request is already serialized (the native encoder's bytes, or an outbox file):
        # sent as it is, not parsed into a message for gRPC to serialize again.
        self._export = self._channel.unary_unary(
            SERVICES[self.config.signal][0],
            request_serializer=None,
            response_deserializer=self._response_type.FromString,
        )
        self._closed_for_fork = False

    @property
    def target(self) -> str:
        return self.config.endpoint

    def send(self, request: bytes) -> SendError | PartialSuccess | None:
        with self._call_lock:
            if self._forking:
                return SendError("not sent: the process is forking", retryable=True)
            self._in_call += 1
            export = self._export
        try:
            response = export(request, timeout=self.config.timeout, metadata=self._metadata)
        except self._grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
            return classify_grpc(name, details, trailing)
        except ValueError as exc:  # "Cannot invoke RPC on closed channel!": the fork closed it
            return SendError(f"not sent: {exc}", retryable=True)
        finally:
            with self._call_lock:
                self._in_call -= 1
                self._call_lock.notify_all()
        return partial_success(response)

    def before_fork(self) -> None:
        with self._call_lock:
            self._forking = True
            if self._in_call:
                self._closed_for_fork = True
                self._channel.close()  # ends the calls on the wire at once (CANCELLED)
                # bounded all the same: a fork must never hang on telemetry
                self._call_lock.wait_for(lambda: not self._in_call, timeout=1.0)

    def after_fork_in_parent(self) -> None:
        with self._call_lock:
            if self._closed_for_fork:
                self._open_channel()
            self._forking = False

    def shutdown(self) -> None:
        self._channel.close()


# Redirects after which requests sends a GET without the body (RFC 9110 lets clients do so).
REDIRECTS_TO_GET = frozenset({301, 302, 303})

# gzip level for HTTP bodies: level 1 compresses OTLP requests ~3x faster than the default 6
# for a few percent more bytes, and any gzip reader accepts it.
GZIP_LEVEL = 1


class HttpTransport:
    """OTLP/HTTP with protobuf bodies: one POST per `send`, on a session per sending thread
    (a `requests.Session` is not documented as thread-safe)."""

    def __init__(self, config: OtlpTransportConfig) -> None:
        # Nothing imported for the first time on the sender thread (see GrpcTransport):
        # requests reads ~/.netrc on each request (trust_env) and imports netrc to do so.
        import netrc  # noqa: F401

        import requests

        self.config = config
        self._requests = requests
        self._response_type = _response_type(config.signal)
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._sessions_lock = threading.Lock()
        self._verify: bool | str = config.certificate or True
        cert = config.client_certificate
        key = config.client_key
        self._cert: tuple[str, str] | str | None = (cert, key) if cert and key else cert

    @property
    def url(self) -> str:
        return self.config.endpoint

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._requests.Session()
            session.headers["User-Agent"] = f"cirron-otel/{__version__}"
            session.headers.update(dict(self.config.headers))
            # what the body is stays ours (the OTLP exporters do the same): a configured
            # Content-Type would have every request refused (415), its spans lost
            session.headers["Content-Type"] = "application/x-protobuf"
            if self.config.compression == "gzip":
                session.headers["Content-Encoding"] = "gzip"
            else:
                session.headers.pop("Content-Encoding", None)
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def send(self, request: bytes) -> SendError | PartialSuccess | None:
        # on the sending thread: zlib releases the GIL, so the senders compress in parallel
        gzipped = self.config.compression == "gzip"
        body = gzip.compress(request, compresslevel=GZIP_LEVEL) if gzipped else request
        exceptions = self._requests.exceptions
        try:
            response = self._session().post(
                self.config.endpoint,
                data=body,
                timeout=self.config.timeout,
                verify=self._verify,
                cert=self._cert,
            )
        except (exceptions.ConnectionError, exceptions.Timeout, exceptions.ChunkedEncodingError) as exc:
            return SendError(f"{type(exc).__name__}: {exc}", retryable=True)
        except exceptions.RequestException as exc:  # a bad URL: never succeeds
            return SendError(f"{type(exc).__name__}: {exc}", retryable=False)
        except OSError as exc:  # a TLS file gone since profile() checked it: kept until it is back
            return SendError(f"{type(exc).__name__}: {exc}", retryable=True)
        status = response.status_code
        content = response.content  # read it all, so the connection goes back to the pool
        moved = next((r for r in response.history if r.status_code in REDIRECTS_TO_GET), None)
        if moved is not None:
            # requests follows 301/302/303 with a GET without the body (307/308 keep both), so
            # whatever answered did not get the spans: kept for a retry, and said where to point
            location = moved.headers.get("Location", "?")
            return SendError(
                f"HTTP {moved.status_code}: the endpoint redirects to {location}, where the request "
                "would go as a GET without its body; set the OTLP endpoint to that URL",
                retryable=True,
            )
        if 200 <= status < 300:
            try:
                return partial_success(self._response_type.FromString(content)) if content else None
            except Exception:  # an unreadable body on a 2xx is still a success
                return None
        retryable = status in HTTP_RETRYABLE
        delay = parse_retry_after(response.headers.get("Retry-After")) if retryable else None
        return SendError(f"HTTP {status} {response.reason or ''}".rstrip(), retryable, delay)

    def before_fork(self) -> None:
        pass  # requests holds no thread or state a fork breaks; the child makes its own session

    def after_fork_in_parent(self) -> None:
        pass

    def shutdown(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


def make_transport(config: OtlpTransportConfig) -> Transport:
    if config.protocol == "grpc":
        return GrpcTransport(config)
    if config.protocol == "http/protobuf":
        return HttpTransport(config)
    raise ValueError(f"OTLP protocol must be 'grpc' or 'http/protobuf', got {config.protocol!r}")
