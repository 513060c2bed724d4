"""The native encoders alone: CPU time per record of the OTLP traces encoder
(`_native.otlp_encode`) and per point of the metrics encoder (`_native.otlp_metrics_encode`),
with no sink, no disk and no network around them.

It records `--records` records (one scope per 10 `mark("loss", v)`, the value changing every
call) through the real producer path, drains them into batches, then encodes the same batches
`--repeat` times with one encoder state (as a sink keeps one) and keeps the best CPU time (the
calling thread's, so other load on the machine matters little). To compare two builds, run
the script under each one after the other, as issue 10's note did:

    python bench/bench_encoders.py [--records 220000] [--repeat 15]

The traces encoder keeps its request buffers in its state between calls; the metrics encoder
allocates them afresh on each call, and glibc serves those with new mappings whose pages
fault in on first touch (on a VM at a high cost): with the default allocator that cost is a
large, variable part of its figure. To measure the encoding alone, keep glibc on its heap:

    MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=4294967295 python bench/bench_encoders.py
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=220_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()

    from cirron_otel.exporters.otlp import encode_resource

    import cirron_otel as ci
    from cirron_otel import _native

    _native.configure(otlp=True)
    _native.session_begin({})
    batches = []
    value = 0.5
    for step in range(args.records // 11):
        with ci.scope("step"):
            for _ in range(10):
                ci.mark("loss", value)
                value += 0.001
        if step % 500 == 0:  # keep the ring from filling
            while (batch := _native.drain(100_000)) is not None:
                batches.append(batch)
    while (batch := _native.drain(100_000)) is not None:
        batches.append(batch)
    records = args.records // 11 * 11
    resource = encode_resource({"service.name": "bench", "host.name": "h", "process.pid": 1})

    traces = metrics = float("inf")
    size = points = 0
    # one state per encoder across the calls, as a sink keeps one for its session (the state
    # keeps buffers between calls: the first call pays for their pages, the best of N not)
    tstate = _native.OtlpState(128)
    mstate = _native.OtlpState(128, metrics=True, traces=False)
    for _ in range(args.repeat):
        start = time.thread_time()
        out = _native.otlp_encode(tstate, batches, resource, "cirron_otel", "1")
        traces = min(traces, time.thread_time() - start)
        size = sum(len(request) for request, _ in out)
        del out  # each encoder measured with the other's output freed

        _native.otlp_encode(mstate, batches, resource, "cirron_otel", "1")  # collects the points
        points = mstate.metric_points_ready
        start = time.thread_time()
        _native.otlp_metrics_encode(
            mstate, resource, "cirron_otel", "1", "cirron.mark.", 1, (1, 2), max_request_bytes=4 << 20
        )
        metrics = min(metrics, time.thread_time() - start)
    print(f"{records:,} records ({points:,} numeric marks), best of {args.repeat}, CPU time:")
    print(f"  otlp_encode (traces):          {traces / records * 1e9:6.1f} ns/record ({size:,} bytes)")
    print(f"  otlp_metrics_encode (metrics): {metrics / points * 1e9:6.1f} ns/point")


if __name__ == "__main__":
    main()
