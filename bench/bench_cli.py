"""`cirron-otel inspect` (and optionally `validate`) on a large spool: peak RSS and rate.

Writes a spool of about `--gb` GB with the library itself (a training-like loop: a scope per
step, several marks per scope, flat out), then runs each command in a fresh process and
reports its wall time, throughput and peak resident memory (the child's ru_maxrss). The point
is bounded memory: peak RSS must not grow with the spool (compare `--gb 0.1` with `--gb 1`).

    python bench/bench_cli.py --gb 1                     # writes ./bench-cli-spool (kept for reruns)
    python bench/bench_cli.py --gb 1 --commands inspect validate
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time

WRITER = textwrap.dedent("""
    import os, sys, cirron_otel as ci
    out, target = sys.argv[1], int(sys.argv[2])
    ci.profile(output_dir=out, install_signal_handlers=False, spool_max_bytes=4 * target + 10**9)
    spool = os.path.join(out, "spool")
    step = 0
    def size():
        return sum(e.stat().st_size for e in os.scandir(spool) if e.name.endswith(".json"))
    while True:
        for epoch in ci.epochs(range(1)):
            for _ in ci.batches(range(10_000)):
                with ci.scope("forward", variant="fp16"):
                    for k in range(8):
                        ci.mark("loss", 1.0 / (step + 1), step=step)
                    ci.mark("lr", 0.001)
                with ci.scope("backward"):
                    ci.mark("grad_norm", float(step % 7))
                step += 1
            ci.mark("accuracy", 0.5, kind="summary")
        ci.flush()
        if size() >= target:
            break
    ci.shutdown()
""")


def spool_bytes(out: str) -> tuple[int, int]:
    spool = os.path.join(out, "spool")
    files = [e for e in os.scandir(spool) if e.name.endswith(".json")]
    return len(files), sum(e.stat().st_size for e in files)


def run(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (bytes) and exit code of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux: the largest child so far
    if peak <= before:
        print("  (peak RSS not above an earlier child's: read it as an upper bound)", file=sys.stderr)
    return wall, peak * 1024, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=1.0, help="spool size to write (GB, 10**9 bytes)")
    parser.add_argument("--dir", default="bench-cli-spool", help="output directory (reused if big enough)")
    parser.add_argument("--commands", nargs="+", default=["inspect"], choices=["inspect", "validate"])
    parser.add_argument("--fresh", action="store_true", help="delete --dir first")
    args = parser.parse_args()
    target = int(args.gb * 1e9)
    if args.fresh:
        shutil.rmtree(args.dir, ignore_errors=True)
    have = spool_bytes(args.dir)[1] if os.path.isdir(os.path.join(args.dir, "spool")) else 0
    if have < target:
        shutil.rmtree(args.dir, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", WRITER, args.dir, str(target)], check=True)
        print(f"wrote the spool in {time.perf_counter() - started:.1f} s")
    files, size = spool_bytes(args.dir)
    print(f"spool: {files} files, {size / 1e9:.2f} GB ({args.dir})")
    for command in args.commands:
        # Each command in its own fresh process; ru_maxrss of children is a running maximum, so
        # run the smaller ones first or read each number as "at most".
        wall, peak, code = run([sys.executable, "-m", "cirron_otel", command, "--json", args.dir])
        print(
            f"{command}: exit {code}, {wall:.1f} s, {size / 1e6 / wall:.0f} MB/s, "
            f"peak RSS {peak / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
