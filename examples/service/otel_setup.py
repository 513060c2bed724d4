"""The OTLP exporter both demo programs use, chosen the standard way (OTEL_EXPORTER_OTLP_*)."""

from __future__ import annotations

import os

from opentelemetry.sdk.trace.export import SpanExporter


def otlp_exporter() -> SpanExporter:
    """The official OTLP exporter for the protocol the standard variables select (it reads the
    endpoint, headers, timeout, compression and TLS settings from them itself)."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise SystemExit(f"unsupported OTLP protocol {protocol!r}: use grpc or http/protobuf")
    return OTLPSpanExporter()
