"""Keep every OTLP request under the collector's size limit (cold path).

The native encoder already cuts requests near 1 MiB between spans, but it cannot cut inside a
span: one scope with a 5 MiB attribute makes a request over the collector's default 4 MiB
gRPC limit, which the collector rejects for good. `fit_request` splits such a request between
spans and, for a span too big on its own, truncates its largest attribute values until it
fits. It uses the generated opentelemetry.proto classes: only oversized requests pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Bytes a span costs inside ScopeSpans beyond its own encoding: field tag + length varint.
_SPAN_FRAME = 6
# Bytes a (ResourceSpans, ScopeSpans) pair costs beyond its resource and scope: tags, lengths.
_GROUP_FRAME = 32
TRUNCATION_MARK = "…"


@dataclass
class Fitted:
    parts: list[tuple[bytes, int]]  # (request bytes, spans)
    truncated_values: int = 0  # attribute values cut short
    dropped_spans: int = 0  # spans that could not be made to fit at all


def span_count(request: Any) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def fit_request(data: bytes, max_bytes: int) -> Fitted:
    """Split `data` (a serialized ExportTraceServiceRequest) into requests of at most `max_bytes`.
    Raises google.protobuf's DecodeError when `data` is not a request."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(data)
    if len(data) <= max_bytes:
        return Fitted([(data, span_count(request))])
    fitted = Fitted([])
    current = ExportTraceServiceRequest()
    size = spans = 0
    groups: dict[tuple[int, int], Any] = {}  # (resource index, scope index) -> ScopeSpans in `current`

    def seal() -> None:
        nonlocal current, size, spans
        if spans:
            fitted.parts.append((current.SerializeToString(), spans))
        current, size, spans = ExportTraceServiceRequest(), 0, 0
        groups.clear()

    for ri, rs in enumerate(request.resource_spans):
        for si, ss in enumerate(rs.scope_spans):
            overhead = (
                rs.resource.ByteSize()
                + ss.scope.ByteSize()
                + len(rs.schema_url)
                + len(ss.schema_url)
                + _GROUP_FRAME
            )
            for span in ss.spans:
                budget = max_bytes - overhead - _SPAN_FRAME
                if span.ByteSize() > budget:
                    fitted.truncated_values += _shrink(span, budget)
                    if span.ByteSize() > budget:
                        fitted.dropped_spans += 1  # a huge name or thousands of events: cannot fit
                        continue
                cost = span.ByteSize() + _SPAN_FRAME + (0 if (ri, si) in groups else overhead)
                if spans and size + cost > max_bytes:
                    seal()
                    cost = span.ByteSize() + _SPAN_FRAME + overhead
                group = groups.get((ri, si))
                if group is None:
                    target = current.resource_spans.add()
                    target.resource.CopyFrom(rs.resource)
                    target.schema_url = rs.schema_url
                    group = target.scope_spans.add()
                    group.scope.CopyFrom(ss.scope)
                    group.schema_url = ss.schema_url
                    groups[(ri, si)] = group
                group.spans.add().CopyFrom(span)
                size += cost
                spans += 1
    seal()
    return fitted


def _candidates(span: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """(key, AnyValue) of every string/bytes attribute value of the span, its events and links."""
    out = [(("a", i), kv.value) for i, kv in enumerate(span.attributes)]
    for e, event in enumerate(span.events):
        out.extend((("e", e, i), kv.value) for i, kv in enumerate(event.attributes))
    for k, link in enumerate(span.links):
        out.extend((("l", k, i), kv.value) for i, kv in enumerate(link.attributes))
    return [(key, v) for key, v in out if v.WhichOneof("value") in ("string_value", "bytes_value")]


def _length(value: Any) -> int:
    which = value.WhichOneof("value")
    return len(value.string_value.encode()) if which == "string_value" else len(value.bytes_value)


def _shrink(span: Any, budget: int) -> int:
    """Truncate the span's largest values, biggest first, until it encodes in `budget` bytes;
    returns how many distinct values were cut."""
    cut: set[tuple[Any, ...]] = set()
    while True:
        excess = span.ByteSize() - budget
        if excess <= 0:
            break
        candidates = [(key, value) for key, value in _candidates(span) if _length(value) > 0]
        if not candidates:
            break
        key, value = max(candidates, key=lambda kv: _length(kv[1]))
        length = _length(value)
        keep = max(0, length - excess - 8)  # 8: the length varint shrinks too, but never grows
        if value.WhichOneof("value") == "string_value":
            # Cut on a character boundary; the mark says the value is not whole.
            text = value.string_value.encode()[:keep].decode("utf-8", "ignore")
            value.string_value = text[:-1] + TRUNCATION_MARK if len(text) > 1 else ""
        else:
            value.bytes_value = value.bytes_value[:keep]
        cut.add(key)
    return len(cut)
