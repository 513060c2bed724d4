"""The factories `cirron_otel.sink.SINK_FACTORIES` names: each sink made from the settings.

Each factory imports its sink's module when called, so a program that only writes the
spool never imports the OTLP or OpenTelemetry SDK code.
"""

from __future__ import annotations

from cirron_otel._config import otlp_transport_config

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from cirron_otel._config import Settings
    from cirron_otel.sink import Sink

    SessionTrace = Callable[[], tuple[int, int]]
    # Applies the SDK's span limits (OTEL_SPAN_*_LIMIT) to the native encoder and returns
    # the event limit: called once the sink is sure to be made, as the profiler did inline.
    OtlpLimits = Callable[[], int]


def setup(settings: Settings) -> None:
    """Before any sink is made: what every spool directory of this process follows (the
    spool's, the OTLP outbox's, the cirron_spool exporter's)."""
    from .spool_dir import set_default_file_mode

    set_default_file_mode(settings.file_mode)


def spool(settings: Settings) -> Sink:
    from .spool import SpoolSink

    return SpoolSink(
        settings.output_dir,
        max_bytes=settings.spool_max_bytes,
        max_records_per_file=settings.max_records_per_file,
        retry_records=settings.spool_retry_records,
        file_mode=settings.file_mode,
    )


def otlp(settings: Settings, *, session_trace: SessionTrace, otlp_limits: OtlpLimits) -> Sink:
    from .otlp import OtlpSink, build_resource, make_transport

    transport = make_transport(otlp_transport_config(settings.otlp_protocol, settings.otlp_endpoint))
    event_limit = otlp_limits()
    _, resource = build_resource(settings.service_name, settings.rank)
    return OtlpSink(
        transport,
        resource=resource,
        session_trace=session_trace,
        event_limit=event_limit,
        outbox_dir=settings.output_dir if "spool" in settings.outputs else None,
        outbox_max_bytes=settings.otlp_outbox_max_bytes,
        memory_queue_requests=settings.otlp_queue_requests,
        max_request_bytes=settings.otlp_max_request_bytes,
    )


def otlp_metrics(settings: Settings, *, session_trace: SessionTrace, health: Callable[[], Any]) -> Sink:
    from .otlp import build_resource, make_transport
    from .otlp_metrics import OtlpMetricsSink

    config = otlp_transport_config(settings.metrics_protocol, settings.otlp_endpoint, signal="metrics")
    _, resource = build_resource(settings.service_name, settings.rank)
    return OtlpMetricsSink(
        make_transport(config),
        resource=resource,
        session_trace=session_trace,
        prefix=settings.metrics_prefix,
        metric_attrs=settings.metric_attrs,
        rank=settings.rank,
        health=health,
        outbox_dir=settings.output_dir if "spool" in settings.outputs else None,
        outbox_max_bytes=settings.otlp_outbox_max_bytes,
        memory_queue_requests=settings.otlp_queue_requests,
        max_request_bytes=settings.otlp_max_request_bytes,
    )


def tracer_provider(settings: Settings, *, provider: Any, session_trace: SessionTrace) -> Sink:
    from .provider import TracerProviderSink

    return TracerProviderSink(provider, session_trace=session_trace)


def span_exporter(
    settings: Settings, *, name: str, session_trace: SessionTrace, otlp_limits: OtlpLimits
) -> Sink:
    from .otlp import build_resource
    from .span_exporter import SpanExporterSink, load_span_exporter

    exporter = load_span_exporter(name)
    event_limit = otlp_limits()
    attrs, _ = build_resource(settings.service_name, settings.rank)
    return SpanExporterSink(
        name, exporter, resource_attrs=attrs, session_trace=session_trace, event_limit=event_limit
    )
