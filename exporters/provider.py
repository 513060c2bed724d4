"""Cirron spans through an application's own OpenTelemetry `TracerProvider`.

For a service that already configured the OpenTelemetry SDK, Cirron spans should go
wherever the service's spans go, with the service's resource: this sink hands them to the
provider's span processors (`on_end`), so the app's exporters (and its batching, sampling
of exporters, resource) apply. The mapping is the native one (`_native.otlp_encode`); its
protobuf is turned into SDK `ReadableSpan`s here, one span at a time, which is slower than
the OTLP sink: fine for request-scoped spans, not meant for 100,000 marks a second.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from cirron_otel import _native
from cirron_otel._otel_private import span_processor
from cirron_otel._version import __version__

from .otlp import encode_resource
from .otlp_encoding import SCOPE_NAME, OtlpEncodingSink


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in any_value.array_value.values)
    if kind is None:
        return None
    return getattr(any_value, kind)


def _attrs(key_values: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


def readable_spans(request: bytes, resource: Any) -> list[Any]:
    """Decode an ExportTraceServiceRequest into SDK ReadableSpans under `resource`."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

    scope = InstrumentationScope(SCOPE_NAME, __version__)
    sampled = TraceFlags(TraceFlags.SAMPLED)
    spans = []
    for rs in ExportTraceServiceRequest.FromString(request).resource_spans:
        for ss in rs.scope_spans:
            for sp in ss.spans:
                trace_id = int.from_bytes(sp.trace_id, "big")
                context = SpanContext(trace_id, int.from_bytes(sp.span_id, "big"), False, sampled)
                parent = (
                    SpanContext(trace_id, int.from_bytes(sp.parent_span_id, "big"), False, sampled)
                    if sp.parent_span_id
                    else None
                )
                status = (
                    Status(StatusCode.ERROR, sp.status.message or None)
                    if sp.status.code == 2
                    else Status(StatusCode.UNSET)
                )
                span = ReadableSpan(
                    name=sp.name,
                    context=context,
                    parent=parent,
                    resource=resource,
                    attributes=_attrs(sp.attributes),
                    events=[Event(e.name, _attrs(e.attributes), e.time_unix_nano) for e in sp.events],
                    links=[
                        Link(
                            SpanContext(
                                int.from_bytes(ln.trace_id, "big"),
                                int.from_bytes(ln.span_id, "big"),
                                False,
                                sampled,
                            ),
                            _attrs(ln.attributes),
                        )
                        for ln in sp.links
                    ],
                    kind=SpanKind.INTERNAL,
                    status=status,
                    start_time=sp.start_time_unix_nano,
                    end_time=sp.end_time_unix_nano,
                    instrumentation_scope=scope,
                )
                spans.append(span)
    return spans


class TracerProviderSink(OtlpEncodingSink):
    """Feeds Cirron spans to an SDK TracerProvider's span processors."""

    name = "tracer_provider"
    backpressure = False

    def __init__(
        self, provider: Any, *, session_trace: Callable[[], tuple[int, int]], event_limit: int = 128
    ) -> None:
        super().__init__()
        self.provider = provider
        self.resource = provider.resource
        self._resource_bytes = encode_resource(dict(provider.resource.attributes))
        self.session_trace = session_trace
        self.state = _native.OtlpState(event_limit)
        # no public API hands ended spans to a provider's processors: see _otel_private
        self._processor = span_processor(provider)

    def export(self, batches: Sequence[_native.Batch]) -> None:
        spans = self.encode(batches, self._resource_bytes, lambda r: readable_spans(r, self.resource))
        if spans is None:
            return
        processor = self._processor
        for span in spans:
            try:
                processor.on_end(span)
            except Exception as exc:
                self.stats.add(failed=1)
                self.stats.error("span processor failed", exc)
                continue
            self.stats.add(exported=1)
        _native.progress()

    def shutdown(self, timeout: float) -> None:
        with contextlib.suppress(Exception):
            self.provider.force_flush(int(timeout * 1000))
