"""Where a flat-out producer's time goes with the spool alone: per-thread CPU and the spool's
time in fsync and in encoding + writing.

One thread records flat out (one scope per 10 marks, as `bench_core.py --only sustained`) for
`--seconds`; then it prints each thread's CPU time (from /proc, Linux only) against the wall
time, the seconds spent in `os.fsync` and in `_native.write_spool` (wrapped for the run), and
the rate into the spool. It is a profile to read, not a benchmark with a verdict.

    python bench/profile_spool.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any


def _timed(fn: Callable[..., Any], slot: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            slot[0] += time.perf_counter() - start
            slot[1] += 1

    return wrapper


def _thread_cpu() -> dict[str, tuple[str, float]]:
    out: dict[str, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def record_flat_out(
    ci: Any, seconds: float
) -> tuple[int, float, float, dict[str, tuple[str, float]], dict[int, str]]:
    """One thread records flat out (one scope per 10 marks) for `seconds`. Returns the marks,
    the start and end times, each thread's CPU time meanwhile (`_thread_cpu`'s keys) and the
    threads' names by native id."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    before = _thread_cpu()
    start = time.perf_counter()
    marks, value = 0, 0.0
    while time.perf_counter() - start < seconds:
        with ci.scope("step"):
            for _ in range(10):
                ci.mark("loss", value)
                value += 1.0
        marks += 10
    end = time.perf_counter()
    after = _thread_cpu()
    names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id is not None})
    cpu = {tid: (comm, t - before.get(tid, (comm, 0.0))[1]) for tid, (comm, t) in after.items()}
    return marks, start, end, cpu, names


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()

    fsync: list[float] = [0.0, 0]
    encode: list[float] = [0.0, 0]
    os.fsync = _timed(os.fsync, fsync)  # type: ignore[assignment]
    import cirron_otel as ci
    from cirron_otel import _native

    _native.write_spool = _timed(_native.write_spool, encode)  # type: ignore[attr-defined]
    out = tempfile.mkdtemp(prefix="cirron-profile-")
    try:
        ci.profile(output_dir=out, spool_max_bytes=1 << 40, install_signal_handlers=False)
        marks, start, emitted, cpu, names = record_flat_out(ci, args.seconds)
        ci.flush()
        health = ci.health()
        ci.shutdown()
        done = time.perf_counter()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    wall = emitted - start
    print(f"recording: {wall:.2f} s; draining after it: {done - emitted:.2f} s")
    for tid, (comm, seconds) in sorted(cpu.items()):
        name = names.get(int(tid), comm)
        print(f"  thread {name:<28} cpu {seconds:6.2f} s ({seconds / wall:5.1%} of the recording)")
    records = marks * 11 // 10
    total = done - start
    print(f"spool: fsync {fsync[0]:.2f} s in {fsync[1]} calls; ", end="")
    print(f"encode + write {encode[0]:.2f} s in {encode[1]} files")
    print(
        f"{marks:,} marks ({records:,} records) in {total:.2f} s: {marks / total:,.0f} marks/s, "
        f"{records / total:,.0f} records/s into the spool; dropped {health['mark_drop_count']}"
    )


if __name__ == "__main__":
    main()
