"""Calls the demo service (server.py) inside one client span, with trace propagation.

`requests` is traced by the official `opentelemetry-instrumentation-requests`: each call is a
CLIENT span under the client's `demo-session` span and sends a W3C `traceparent`, so the
server's request spans, and the Cirron scopes inside them, land in the same trace.

    python examples/service/client.py --url http://127.0.0.1:8000

Exports OTLP like the server (the standard `OTEL_EXPORTER_OTLP_*` variables) as service
`cirron-demo-client`. Prints the trace id, then one line per request; exits 1 when the
service answered unexpectedly.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import requests
from opentelemetry import trace
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from otel_setup import otlp_exporter

SERVICE_NAME = "cirron-demo-client"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--requests", type=int, default=3, help="how many /predict calls")
    parser.add_argument("--rows", type=int, default=5, help="rows per /predict call")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    base = args.url.rstrip("/")

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(otlp_exporter(), schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    RequestsInstrumentor().instrument(tracer_provider=provider)
    tracer = trace.get_tracer("cirron-demo-client")
    rng = np.random.default_rng(0)

    failures = 0
    try:
        with requests.Session() as http, tracer.start_as_current_span("demo-session") as span:
            span.set_attribute("demo.requests", args.requests)
            print(f"trace {span.get_span_context().trace_id:032x}", flush=True)
            r = http.get(f"{base}/model", timeout=args.timeout)
            print(f"GET /model -> {r.status_code}", flush=True)
            failures += r.status_code != 200
            for _ in range(args.requests):
                rows = rng.normal(size=(args.rows, 4)).round(3).tolist()
                r = http.post(f"{base}/predict", json={"inputs": rows}, timeout=args.timeout)
                preds = r.json().get("predictions") if r.status_code == 200 else r.text
                print(f"POST /predict -> {r.status_code} {preds}", flush=True)
                failures += r.status_code != 200
            # One malformed request: the server's `predict` scope fails, the answer is 422.
            r = http.post(f"{base}/predict", json={"inputs": [[1.0, 2.0]]}, timeout=args.timeout)
            print(f"POST /predict (bad shape) -> {r.status_code}", flush=True)
            failures += r.status_code != 422
            span.set_attribute("demo.failures", failures)
    except requests.RequestException as exc:
        print(f"request failed: {exc}", file=sys.stderr, flush=True)
        failures += 1
    finally:
        RequestsInstrumentor().uninstrument()
        provider.shutdown()  # flushes the client's spans
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
