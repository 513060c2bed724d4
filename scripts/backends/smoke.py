#!/usr/bin/env python3
"""Send one small trace over OTLP and find it in Jaeger's HTTP query API.

Checks the path app -> (collector ->) Jaeger that start.sh sets up, without the
library: a parent span with an attribute and a child span with an event, sent
with the OpenTelemetry SDK's OTLP exporter (gRPC or HTTP), then looked up with
GET {jaeger}/api/traces?service=... until it shows up with its parent link, tag
and log. Needs opentelemetry-sdk and opentelemetry-exporter-otlp.

    python3 scripts/backends/smoke.py --endpoint http://127.0.0.1:4317 \\
        --protocol grpc --jaeger http://127.0.0.1:16686

Exit status 0 when the trace is found and right; prints the trace id.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
import uuid

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor


def make_exporter(protocol: str, endpoint: str):
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=True)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")


def send(protocol: str, endpoint: str, service: str) -> str:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(make_exporter(protocol, endpoint)))
    tracer = provider.get_tracer("cirron-otel.backends.smoke")
    with tracer.start_as_current_span("smoke.parent") as parent:
        parent.set_attribute("smoke.protocol", protocol)
        with tracer.start_as_current_span("smoke.child") as child:
            child.add_event("smoke.mark", {"value": 42})
        trace_id = format(parent.get_span_context().trace_id, "032x")
    provider.shutdown()
    return trace_id


def find(jaeger: str, service: str, trace_id: str, timeout: float) -> dict:
    url = f"{jaeger.rstrip('/')}/api/traces?" + urllib.parse.urlencode(
        {"service": service, "limit": 20, "lookback": "1h"}
    )
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=5) as resp:
            for trace in json.load(resp).get("data") or []:
                if trace["traceID"] == trace_id and len(trace["spans"]) == 2:
                    return trace
        if time.monotonic() > deadline:
            raise SystemExit(f"trace {trace_id} of service {service!r} not in {jaeger} after {timeout}s")
        time.sleep(0.5)


def check(trace: dict, protocol: str) -> None:
    spans = {s["operationName"]: s for s in trace["spans"]}
    parent, child = spans["smoke.parent"], spans["smoke.child"]
    refs = [(r["refType"], r["spanID"]) for r in child.get("references", [])]
    assert ("CHILD_OF", parent["spanID"]) in refs, refs
    tags = {t["key"]: t["value"] for t in parent["tags"]}
    assert tags.get("smoke.protocol") == protocol, tags
    fields = [{f["key"]: f["value"] for f in log["fields"]} for log in child.get("logs", [])]
    assert any(f.get("event") == "smoke.mark" and f.get("value") == 42 for f in fields), fields


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", required=True, help="OTLP endpoint, e.g. http://127.0.0.1:4317")
    ap.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    ap.add_argument("--jaeger", required=True, help="Jaeger query URL, e.g. http://127.0.0.1:16686")
    ap.add_argument("--service", default=f"cirron-smoke-{uuid.uuid4().hex[:8]}")
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()
    trace_id = send(args.protocol, args.endpoint, args.service)
    check(find(args.jaeger, args.service, trace_id, args.timeout), args.protocol)
    print(f"ok: trace {trace_id} of service {args.service} found in {args.jaeger} ({args.protocol})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
