"""The library's own health as OTLP metrics (README, "Marks as metrics", the health rows):
records recorded, written and dropped per sink as cumulative monotonic Sums, the fullest
ring's fill and the outbox size as Gauges, each point with `cirron.rank` and
`cirron.session.id` (no scope, no exemplar). A handful of points per flush: built with
opentelemetry-proto here, off the hot path, not by the native encoder the marks use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cirron_otel import _native

from .otlp_encoding import SCOPE_NAME

RECORDED = "cirron.health.records.recorded"
WRITTEN = "cirron.health.records.written"
DROPPED = "cirron.health.records.dropped"
RING_FILL = "cirron.health.ring.fill"
OUTBOX_SIZE = "cirron.health.outbox.size"
RECORD_UNIT = "{record}"
SINK_ATTR = "cirron.sink"


def health_request(
    *,
    resource: bytes,
    scope_version: str,
    start_ns: int,
    now_ns: int,
    rank: int,
    session_id: str,
    recorded: int,
    sinks: Mapping[str, tuple[int, int]],
    ring_fill: float,
    outbox_bytes: int,
) -> bytes:
    """One ExportMetricsServiceRequest with a point of each health metric at `now_ns`.
    `sinks`: sink name -> (records written, records dropped)."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.metrics.v1 import metrics_pb2
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    def kv(key: str, value: str | int) -> Any:
        if isinstance(value, int):
            return KeyValue(key=key, value=AnyValue(int_value=value))
        return KeyValue(key=key, value=AnyValue(string_value=value))

    common = [kv(_native.KEY_RANK, rank), kv(_native.KEY_SESSION_ID, session_id)]

    def counter(name: str, points: list[tuple[int, list[Any]]]) -> Any:
        return metrics_pb2.Metric(
            name=name,
            unit=RECORD_UNIT,
            sum=metrics_pb2.Sum(
                aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE,
                is_monotonic=True,
                data_points=[
                    metrics_pb2.NumberDataPoint(
                        attributes=attrs, start_time_unix_nano=start_ns, time_unix_nano=now_ns, as_int=value
                    )
                    for value, attrs in points
                ],
            ),
        )

    def gauge(name: str, unit: str, value: float | int) -> Any:
        point = metrics_pb2.NumberDataPoint(attributes=common, time_unix_nano=now_ns)
        if isinstance(value, int):
            point.as_int = value
        else:
            point.as_double = value
        return metrics_pb2.Metric(name=name, unit=unit, gauge=metrics_pb2.Gauge(data_points=[point]))

    metrics = [counter(RECORDED, [(recorded, common)])]
    for sink, (written, dropped) in sinks.items():
        attrs = [*common, kv(SINK_ATTR, sink)]
        metrics.append(counter(WRITTEN, [(written, attrs)]))
        metrics.append(counter(DROPPED, [(dropped, attrs)]))
    metrics.append(gauge(RING_FILL, "", float(ring_fill)))  # no unit: "1" would add _ratio
    metrics.append(gauge(OUTBOX_SIZE, "By", int(outbox_bytes)))
    return ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource=Resource.FromString(resource),
                scope_metrics=[
                    metrics_pb2.ScopeMetrics(
                        scope=InstrumentationScope(name=SCOPE_NAME, version=scope_version), metrics=metrics
                    )
                ],
            )
        ]
    ).SerializeToString()
