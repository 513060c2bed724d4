"""Export throughput: the spool and OTLP on at once, against a real OTLP/gRPC receiver.

One producer thread records at a fixed offered rate (default 250,000 records/s: one
`ci.scope("step")` per 10 `ci.mark("loss", v)`) for N seconds with both sinks on; a
receiver in another process decodes every request. Reported: records/s delivered to each
sink (spans + marks; for OTLP, spans + events), drops, and how much the producer slows
while exports run: its busy time per record with the spool and OTLP on, against the same
paced loop with a disabled profiler. `--rate 0` runs flat out instead (the pipeline then
paces the producer through the backpressure of the spool and of the OTLP sink, whose outbox
is on: neither may drop a record).

    python bench/bench_export.py [--seconds 10] [--rate 250000] [--protocol grpc|http/protobuf]

Requires: pip install -e ".[test]" (grpcio and opentelemetry-proto for the receiver).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

RECEIVER = r"""
import gzip, sys, threading, signal, http.server
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb, trace_service_pb2_grpc as pbg

counts = {"spans": 0, "events": 0, "requests": 0}
lock = threading.Lock()

def count(req):
    spans = events = 0
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            spans += len(ss.spans)
            for sp in ss.spans:
                events += len(sp.events)
    with lock:
        counts["spans"] += spans; counts["events"] += events; counts["requests"] += 1

class Traces(pbg.TraceServiceServicer):
    def Export(self, request, context):
        count(request)
        return pb.ExportTraceServiceResponse()

class Http(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.endswith("/v1/metrics"):  # traces only, like the gRPC side (UNIMPLEMENTED)
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers(); return
        if self.headers.get("Content-Encoding") == "gzip":  # OTEL_EXPORTER_OTLP_COMPRESSION=gzip
            body = gzip.decompress(body)
        count(pb.ExportTraceServiceRequest.FromString(body))
        out = pb.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200); self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
    def log_message(self, *a): pass

server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 64 << 20)])
pbg.add_TraceServiceServicer_to_server(Traces(), server)
gport = server.add_insecure_port("127.0.0.1:0")
server.start()
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Http)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
print(gport, httpd.server_address[1], flush=True)
sys.stdin.readline()  # run until told to report
with lock:
    print(counts["spans"], counts["events"], counts["requests"], flush=True)
"""

WORKER = r"""
import json, resource, sys, time
import cirron_otel as ci
mode, seconds, out, endpoint, protocol, rate = sys.argv[1:7]
seconds, rate = float(seconds), float(rate)
options = dict(output_dir=out, spool_max_bytes=1 << 40, install_signal_handlers=False, tracer_provider=None)
if mode == "both":
    ci.profile(output="spool,otlp", otlp_endpoint=endpoint, otlp_protocol=protocol, **options)
elif mode == "spool":
    ci.profile(output="spool", **options)
else:
    ci.profile(enabled=False, **options)
mark, scope = ci.mark, ci.scope
emitted = 0
v = 0.0
busy = 0.0
clock = time.perf_counter
t0 = clock()
deadline = t0 + seconds
while clock() < deadline:
    c0 = clock()
    for _ in range(100):
        with scope("step"):
            for _ in range(10):
                v += 0.001
                mark("loss", v)
    busy += clock() - c0
    emitted += 1000
    if rate:  # 1100 records per chunk: wait for the chunk's slot in the offered rate
        target = t0 + (emitted * 1.1) / rate
        while clock() < target:
            time.sleep(max(0.0, min(0.001, target - clock())))
emit = clock() - t0
t1 = time.perf_counter()
h = ci.health()
ci.shutdown()
drain = time.perf_counter() - t1
h = ci.health()
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"emit": emit, "drain": drain, "busy": busy, "marks": emitted, "spans": emitted // 10 + 1,
                  "health": h, "rss_mb": rss_mb}))
"""


def run_worker(mode: str, seconds: float, endpoint: str, protocol: str, rate: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(WORKER),
                mode,
                str(seconds),
                out,
                endpoint,
                protocol,
                str(rate),
            ],
            capture_output=True,
            text=True,
            timeout=seconds * 20 + 120,
        )
        if r.returncode != 0:
            raise SystemExit(f"worker {mode} failed:\n{r.stderr}")
        result = json.loads(r.stdout.strip().splitlines()[-1])
        result["spool_records"] = count_spool(out)
        outbox = os.path.join(out, "otlp-outbox")
        left = os.listdir(outbox) if os.path.isdir(outbox) else []
        result["outbox_left"] = sum(1 for name in left if name.endswith(".pb"))
        return result


def count_spool(out: str) -> int:
    total = 0
    spool = os.path.join(out, "spool")
    for name in os.listdir(spool) if os.path.isdir(spool) else []:
        if name.endswith(".json"):
            with open(os.path.join(spool, name), "rb") as f:
                doc = json.loads(f.read())
            total += len(doc["spans"]) + len(doc["marks"])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=250_000, help="offered records/s (0: flat out)")
    ap.add_argument("--protocol", choices=["grpc", "http/protobuf"], default="grpc")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        gport, hport = receiver.stdout.readline().split()
        endpoint = f"http://127.0.0.1:{gport if args.protocol == 'grpc' else hport}"
        offered = f"{args.rate:,.0f} records/s offered" if args.rate else "flat out"
        print(
            f"receiver: {endpoint} ({args.protocol}); {args.seconds:g} s per run, {offered}; "
            f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs"
        )
        rings = run_worker("rings", args.seconds, endpoint, args.protocol, args.rate)
        spool = run_worker("spool", args.seconds, endpoint, args.protocol, args.rate)
        both = run_worker("both", args.seconds, endpoint, args.protocol, args.rate)
        receiver.stdin.write("report\n")
        receiver.stdin.flush()
        got_spans, got_events, requests = map(int, receiver.stdout.readline().split())
    finally:
        receiver.kill()

    def per_record_ns(r: dict) -> float:
        return r["busy"] / (r["marks"] + r["spans"]) * 1e9

    h = both["health"]
    otlp = h["sinks"].get("otlp", {})
    elapsed = both["emit"] + both["drain"]
    spool_records = both["spool_records"]
    otlp_records = got_spans + got_events
    drops = (
        h["mark_drop_count"] + h["span_drop_count"] + otlp.get("dropped", 0) + h["sinks"]["spool"]["dropped"]
    )
    rows = [
        ("producer busy ns/record, profiler disabled", f"{per_record_ns(rings):.0f}"),
        ("producer busy ns/record, spool on", f"{per_record_ns(spool):.0f}"),
        ("producer busy ns/record, spool + OTLP on", f"{per_record_ns(both):.0f}"),
        (
            "producer slowdown while exports run (vs disabled)",
            f"{per_record_ns(both) / per_record_ns(rings):.2f}x",
        ),
        ("records recorded (spool + OTLP run)", f"{both['marks'] + both['spans']:,}"),
        ("records in the spool", f"{spool_records:,}"),
        ("records received over OTLP (spans + events)", f"{otlp_records:,} in {requests:,} requests"),
        ("delivered to the spool, records/s", f"{spool_records / elapsed:,.0f}"),
        ("delivered over OTLP, records/s", f"{otlp_records / elapsed:,.0f}"),
        ("drops (rings + sinks)", f"{drops}"),
        ("OTLP outbox files left", f"{both['outbox_left']}"),
        ("peak RSS", f"{both['rss_mb']:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    ok = (
        drops == 0
        and spool_records == both["marks"] + both["spans"]
        and otlp_records == spool_records
        and min(spool_records, otlp_records) / elapsed >= 200_000
    )
    print(f"required: >= 200,000 records/s delivered to both, zero drops -> {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            results = {
                "rings": rings,
                "spool": spool,
                "both": both,
                "received": [got_spans, got_events, requests],
                "pass": ok,
            }
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
