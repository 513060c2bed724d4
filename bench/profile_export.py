"""Where a flat-out producer's time goes with the spool and OTLP on: per-thread CPU.

One thread records flat out (one scope per 10 marks, as `bench_export.py --rate 0`) for
`--seconds` with the spool and OTLP/gRPC on, to `bench_export.py`'s receiver in another
process (decoding after the run, or `--decode inline`); `--metrics` turns marks as metrics
on. Then it prints each thread's CPU time while recording, in cores (from /proc, Linux
only), the receiver's, and the records delivered. It is a profile to read, not a benchmark
with a verdict: it is how issue 10's sixth session found the OTLP worker's per-span
allocations (then `perf record -t <thread id>` on the thread that stands out).

    python bench/profile_export.py [--seconds 8] [--metrics] [--decode after|inline]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench_export import MARK_PREFIX, RECEIVER
from profile_spool import record_flat_out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--metrics", action="store_true", help="marks as OTLP metrics too")
    parser.add_argument("--decode", choices=["after", "inline"], default="after")
    args = parser.parse_args()

    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, MARK_PREFIX, args.decode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    out = tempfile.mkdtemp(prefix="cirron-profile-")
    try:
        gport, _ = receiver.stdout.readline().split()  # type: ignore[union-attr]
        if not args.metrics:
            os.environ["OTEL_METRICS_EXPORTER"] = "none"
        import cirron_otel as ci

        ci.profile(
            output="spool,otlp",
            otlp_endpoint=f"http://127.0.0.1:{gport}",
            otlp_protocol="grpc",
            metrics=args.metrics,
            output_dir=out,
            spool_max_bytes=1 << 40,
            otlp_outbox_max_bytes=1 << 40,
            install_signal_handlers=False,
            tracer_provider=None,
        )
        marks, start, emitted, cpu, names = record_flat_out(ci, args.seconds)
        ci.shutdown()
        done = time.perf_counter()
        receiver.stdin.write("report\n")  # type: ignore[union-attr]
        receiver.stdin.flush()  # type: ignore[union-attr]
        got = json.loads(receiver.stdout.readline())  # type: ignore[union-attr]
    finally:
        receiver.kill()
        shutil.rmtree(out, ignore_errors=True)
    wall = emitted - start
    by_name: dict[str, float] = {}
    for tid, (comm, seconds) in cpu.items():
        name = names.get(int(tid), comm)
        by_name[name] = by_name.get(name, 0.0) + seconds
    print(f"recording: {wall:.2f} s; draining after it: {done - emitted:.2f} s")
    for name, seconds in sorted(by_name.items(), key=lambda kv: -kv[1]):
        if seconds >= 0.005 * wall:
            print(f"  thread {name:<34} {seconds / wall:5.2f} cores")
    print(f"  {'receiver (its own process)':<41} {got['cpu_s'] / (done - start):5.2f} cores")
    records = marks * 11 // 10 + 1
    received = got["spans"] + got["events"]
    print(
        f"{records:,} records recorded, {received:,} received over OTLP in {done - start:.2f} s: "
        f"{received / (done - start):,.0f} records/s"
        + (f"; {got['mark_points']:,} data points" if args.metrics else "")
    )


if __name__ == "__main__":
    main()
