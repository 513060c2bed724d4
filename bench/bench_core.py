#!/usr/bin/env python3
"""Benchmark cirron-otel's hot-path primitives against cirron-sdk 0.3.0 and the OpenTelemetry SDK.

One command times, in the same run on the same machine:

* ``mark``   -- ``ci.mark("loss", 0.5)`` / OTel ``span.add_event("loss", {"value": 0.5})``
* ``scope``  -- ``with ci.scope("step"): pass`` /
  ``with tracer.start_as_current_span("step"): pass``
* ``epochs`` -- one iteration of ``for _ in ci.epochs(range(n)): pass``
* ``sustained`` -- one thread marking flat out (one scope per ten marks) into the spool.

Every (primitive, contender) measurement runs in its own fresh subprocess, contenders
alternating A B C A B C over several rounds. Inside a worker: one warm-up chunk, then the
median of several chunks of N calls, the library's own flush between chunks (so no ring
overflows while timing). Times are raw per-call ``perf_counter_ns`` (loop overhead
included, nothing subtracted).

Usage::

    python bench/bench_core.py [--quick] [--only mark,scope,epochs,sustained]
                               [--sustained SECONDS] [--json out.json] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------
# Names that may need adjusting as cirron-otel's health() settles. Each entry is a list
# of candidate key paths into ci.health(); the first path that resolves wins.
# --------------------------------------------------------------------------------------
HEALTH_KEY_PATHS: dict[str, list[tuple[str, ...]]] = {
    "mark_drops": [("mark_drop_count",)],
    "span_drops": [("span_drop_count",)],
    "scope_drops": [("scope_drop_count",)],
    "spool_drops": [("spool_drop_count",)],
    "marks_recorded": [("marks_recorded",), ("records_recorded", "marks")],
    "marks_written": [("sinks", "spool", "marks_written"), ("records_written", "spool", "marks")],
}

SPOOL_SUBDIR = "spool"  # <output_dir>/spool/*.json, the same for both Cirron libraries
# The spool byte cap used here: nothing is evicted while measuring.
BIG_SPOOL_BYTES = 1 << 40
# Larger than any chunk, so the OTel queue never drops (nor logs a warning) while timing.
OTEL_QUEUE_SIZE = 1 << 17

PRIMITIVES = ("mark", "scope", "epochs")
SECTIONS = (*PRIMITIVES, "sustained")


# --------------------------------------------------------------------------------------
# Contenders: everything library-specific lives in this table.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contender:
    """How to set up, drive, flush and tear down one library inside a worker.

    Code strings run in a namespace holding ``OUT_DIR`` (a fresh temp dir) and
    ``SPOOL_MAX_BYTES``. ``blocks`` maps a primitive to a timed code block in which
    ``{n}`` is the number of calls; ``chunk_setup``/``chunk_teardown`` run untimed
    around it. ``env`` values may use ``{out}`` and ``{spool_max}``.
    """

    key: str
    label: str
    module: str
    dists: tuple[str, ...]
    install: str
    setup: str
    flush: str
    teardown: str
    blocks: Mapping[str, str]
    env: Mapping[str, str] = field(default_factory=dict)
    chunk_setup: Mapping[str, str] = field(default_factory=dict)
    chunk_teardown: Mapping[str, str] = field(default_factory=dict)


# Both Cirron libraries share the user-facing API, hence the same blocks.
CIRRON_BLOCKS: dict[str, str] = {
    "mark": """
        for _ in range({n}):
            ci.mark("loss", 0.5)
    """,
    "scope": """
        for _ in range({n}):
            with ci.scope("step"):
                pass
    """,
    "epochs": """
        for _ in ci.epochs(range({n})):
            pass
    """,
    "sustained": """
        v = 0.0
        while _perf_counter_ns() < _deadline_ns:
            for _ in range(100):
                with ci.scope("step"):
                    for _ in range(10):
                        ci.mark("loss", v)
                        v += 0.001
            _emitted += 1000
    """,
}

OTEL_SETUP = """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class DropExporter(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter(), max_queue_size=OTEL_QUEUE_SIZE))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("bench")
"""

CONTENDERS: tuple[Contender, ...] = (
    Contender(
        key="ours",
        label="cirron-otel",
        module="cirron_otel",
        dists=("cirron-otel",),
        install="pip install -e <repository root>",
        setup="""
            import cirron_otel as ci
            ci.profile(output_dir=OUT_DIR, spool_max_bytes=SPOOL_MAX_BYTES, otel_context=OTEL_CONTEXT)
        """,
        flush="ci.flush()",
        teardown="ci.shutdown()",
        blocks=CIRRON_BLOCKS,
    ),
    Contender(
        key="sdk",
        label="cirron-sdk",
        module="cirron",
        dists=("cirron-sdk",),
        install="pip install cirron-sdk==0.3.0",
        # cirron-sdk's profile() takes no output dir: it reads these variables.
        env={"CIRRON_OUTPUT_DIR": "{out}", "CIRRON_SPOOL_MAX_BYTES": "{spool_max}"},
        setup="""
            import cirron as ci
            ci.profile()
        """,
        flush="ci.flush()",
        teardown="ci.shutdown()",
        blocks=CIRRON_BLOCKS,
    ),
    Contender(
        key="otel",
        label="OTel SDK",
        module="opentelemetry.sdk.trace",
        dists=("opentelemetry-sdk",),
        install="pip install opentelemetry-sdk",
        setup=OTEL_SETUP,
        flush="provider.force_flush()",
        teardown="provider.shutdown()",
        blocks={
            "mark": """
                for _ in range({n}):
                    span.add_event("loss", {{"value": 0.5}})
            """,
            "scope": """
                for _ in range({n}):
                    with tracer.start_as_current_span("step"):
                        pass
            """,
        },
        # Events go on a fresh span per chunk, ended (and flushed) after it.
        chunk_setup={"mark": 'span = tracer.start_span("bench")'},
        chunk_teardown={"mark": "span.end()"},
    ),
)
CONTENDER_BY_KEY: dict[str, Contender] = {c.key: c for c in CONTENDERS}


@dataclass(frozen=True)
class Requirement:
    """ours must be at least ``min_ratio`` times faster than ``versus``."""

    versus: str
    min_ratio: float


REQUIREMENTS: dict[str, tuple[Requirement, ...]] = {
    "mark": (Requirement("sdk", 25.0),),
    "scope": (Requirement("sdk", 15.0), Requirement("otel", 40.0)),
    "epochs": (Requirement("sdk", 15.0),),
}
SUSTAINED_MIN_RATE = 1_000_000  # marks/s into the spool, with zero drops


@dataclass(frozen=True)
class Settings:
    """Run sizes; ``--quick`` shrinks them."""

    rounds: int
    chunks: int
    calls: int
    sustained_s: float


FULL = Settings(rounds=5, chunks=7, calls=20_000, sustained_s=10.0)
# Same chunk size as FULL so the figures compare: GC pauses inside a chunk depend on its size.
QUICK = Settings(rounds=2, chunks=3, calls=20_000, sustained_s=2.0)


# --------------------------------------------------------------------------------------
# Worker side: runs in a fresh interpreter, prints one JSON line.
# --------------------------------------------------------------------------------------
def _indent(code: str, level: int = 1) -> str:
    return textwrap.indent(textwrap.dedent(code).strip("\n"), "    " * level)


def _compile_function(name: str, body: str, namespace: dict[str, Any]) -> Callable[[], Any]:
    source = f"def {name}():\n{body}\n"
    exec(compile(source, f"<bench {name}>", "exec"), namespace)  # like timeit
    return namespace[name]


def _chunk_source(contender: Contender, primitive: str, calls: int) -> str:
    block = contender.blocks[primitive].format(n=calls)
    lines = [
        _indent(contender.chunk_setup.get(primitive, "pass")),
        "    _t0 = _perf_counter_ns()",
        _indent(block),
        "    _t1 = _perf_counter_ns()",
        _indent(contender.chunk_teardown.get(primitive, "pass")),
        "    return _t1 - _t0",
    ]
    return "\n".join(lines)


def _sustained_source(contender: Contender) -> str:
    lines = [
        "    global _emitted",
        _indent(contender.blocks["sustained"]),
    ]
    return "\n".join(lines)


def _worker_namespace(out_dir: str) -> dict[str, Any]:
    return {
        "__name__": "__bench_worker__",
        "OUT_DIR": out_dir,
        "SPOOL_MAX_BYTES": BIG_SPOOL_BYTES,
        "OTEL_QUEUE_SIZE": OTEL_QUEUE_SIZE,
        # --otel-context off: cirron-otel's leanest path (scopes ignore OpenTelemetry's context)
        "OTEL_CONTEXT": os.environ.get("CIRRON_BENCH_OTEL_CONTEXT", "on") == "on",
        "_perf_counter_ns": time.perf_counter_ns,
        "_emitted": 0,
    }


def _run(code: str, namespace: dict[str, Any]) -> None:
    exec(textwrap.dedent(code), namespace)  # code from CONTENDERS


def _micro_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    contender = CONTENDER_BY_KEY[spec["contender"]]
    primitive, calls = spec["primitive"], spec["calls"]
    ns = _worker_namespace(spec["out_dir"])
    _run(contender.setup, ns)
    chunk = _compile_function("_chunk", _chunk_source(contender, primitive, calls), ns)
    per_call: list[float] = []
    for i in range(spec["chunks"] + 1):  # chunk 0 is a warm-up
        elapsed = chunk()
        _run(contender.flush, ns)
        if i:
            per_call.append(elapsed / calls)
    _run(contender.teardown, ns)
    return {"per_call_ns": per_call, "median_ns": statistics.median(per_call)}


def _dig(mapping: object, path: Sequence[str]) -> object:
    for key in path:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def health_value(health: Mapping[str, Any], name: str) -> object:
    """Look ``name`` up in a health() dict through the candidate paths in HEALTH_KEY_PATHS."""
    for path in HEALTH_KEY_PATHS[name]:
        value = _dig(health, path)
        if value is not None:
            return value
    return None


def _sustained_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    contender = CONTENDER_BY_KEY[spec["contender"]]
    ns = _worker_namespace(spec["out_dir"])
    _run(contender.setup, ns)
    emit = _compile_function("_emit", _sustained_source(contender), ns)
    ns["_deadline_ns"] = time.perf_counter_ns() + int(spec["seconds"] * 1e9)
    t0 = time.perf_counter_ns()
    emit()
    t1 = time.perf_counter_ns()
    _run(contender.flush, ns)
    # Read health before shutdown: cirron-sdk reports zeros once shut down.
    health = ns["ci"].health()
    _run(contender.teardown, ns)
    t2 = time.perf_counter_ns()
    return {
        "emitted": ns["_emitted"],
        "emit_s": (t1 - t0) / 1e9,
        "drain_s": (t2 - t1) / 1e9,
        "health": {name: health_value(health, name) for name in HEALTH_KEY_PATHS},
        "health_raw": health,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def worker_main(spec_json: str) -> None:
    """Entry point of ``--worker``: run one measurement, write its result as JSON.

    The result goes to a file, not stdout, so that nothing a library prints (at exit,
    say) can get mixed into it.
    """
    spec = json.loads(spec_json)
    pin = os.environ.get("CIRRON_BENCH_PIN_CPU", "")
    if pin and spec["mode"] != "sustained" and hasattr(os, "sched_setaffinity"):
        # Micro timings: every contender's process on the same CPU. On a shared 2-core VM an
        # unpinned process migrating between cores runs a tight loop up to 2x slower.
        os.sched_setaffinity(0, {int(pin)})
    run = _sustained_worker if spec["mode"] == "sustained" else _micro_worker
    result = run(spec)
    Path(spec["result_path"]).write_text(json.dumps(result, default=str))


# --------------------------------------------------------------------------------------
# Parent side: spawn workers, alternate contenders, aggregate, report.
# --------------------------------------------------------------------------------------
@dataclass
class WorkerResult:
    """What one worker process produced, or why it failed."""

    ok: bool
    data: dict[str, Any]
    error: str = ""


def spawn_worker(spec: dict[str, Any], timeout_s: float) -> WorkerResult:
    """Run one worker in a fresh interpreter with cwd and output dir in a temp dir."""
    contender = CONTENDER_BY_KEY[spec["contender"]]
    tmp = Path(tempfile.mkdtemp(prefix="cirron-bench-"))
    out_dir = tmp / "out"
    result_path = tmp / "result.json"
    spec = {**spec, "out_dir": str(out_dir), "result_path": str(result_path)}
    env = dict(os.environ)
    env.update({k: v.format(out=out_dir, spool_max=BIG_SPOOL_BYTES) for k, v in contender.env.items()})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd,
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0 or not result_path.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            return WorkerResult(False, {}, f"worker exited {proc.returncode}: {tail}")
        data = json.loads(result_path.read_text())
        if spec["mode"] == "sustained":
            data.update(count_spool(out_dir / SPOOL_SUBDIR))
        return WorkerResult(True, data)
    except subprocess.TimeoutExpired:
        return WorkerResult(False, {}, f"worker timed out after {timeout_s:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def count_spool(spool_dir: Path) -> dict[str, Any]:
    """Count marks and spans by parsing every sealed spool batch with json (strict: no NaN)."""
    marks = spans = files = size = 0
    bad: list[str] = []
    for path in sorted(spool_dir.glob("*.json")):
        files += 1
        size += path.stat().st_size
        try:
            batch = json.loads(path.read_bytes(), parse_constant=_reject_constant)
        except ValueError as exc:
            bad.append(f"{path.name}: {exc}")
            continue
        marks += len(batch.get("marks", ()))
        spans += len(batch.get("spans", ()))
        path.unlink()  # keep disk use bounded while counting
    return {
        "spool_marks": marks,
        "spool_spans": spans,
        "spool_files": files,
        "spool_bytes": size,
        "spool_bad": bad,
    }


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-strict JSON constant {name}")


def available_contenders() -> list[Contender]:
    """Contenders whose module imports here; prints a clear line for each one skipped."""
    found = []
    for contender in CONTENDERS:
        if _module_exists(contender.module):
            found.append(contender)
        else:
            print(
                f"SKIP {contender.label}: module {contender.module!r} not importable"
                f"; install with: {contender.install}"
            )
    return found


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Python, library versions, machine and date, for the report header."""
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {d: _dist_version(d) for c in CONTENDERS for d in c.dists}
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": versions,
    }


def run_micro(
    primitive: str, contenders: Sequence[Contender], settings: Settings
) -> dict[str, dict[str, Any]]:
    """Time one primitive for every contender, alternating contenders round by round."""
    takers = [c for c in contenders if primitive in c.blocks]
    if not takers:
        return {}
    rounds: dict[str, list[float]] = {c.key: [] for c in takers}
    errors: dict[str, str] = {}
    for r in range(settings.rounds):
        line = []
        for contender in takers:
            if contender.key in errors:
                continue
            spec = {
                "mode": "micro",
                "contender": contender.key,
                "primitive": primitive,
                "chunks": settings.chunks,
                "calls": settings.calls,
            }
            result = spawn_worker(spec, timeout_s=600)
            if result.ok:
                rounds[contender.key].append(result.data["median_ns"])
                line.append(f"{contender.label} {fmt_ns(result.data['median_ns'])}")
            else:
                errors[contender.key] = result.error
                line.append(f"{contender.label} ERROR")
                print(f"  ERROR {contender.label} {primitive}: {result.error}")
        print(
            f"  {primitive:<7} round {r + 1}/{settings.rounds}: " + " | ".join(line),
            flush=True,
        )
    return {
        c.key: {
            "median_ns": statistics.median(rounds[c.key]) if rounds[c.key] else None,
            "round_medians_ns": rounds[c.key],
            "error": errors.get(c.key),
        }
        for c in takers
    }


def judge(primitive: str, times: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Ratios theirs/ours and PASS/FAIL/SKIP against REQUIREMENTS."""
    ours = _median(times, "ours")
    ratios = {k: (_median(times, k) / ours if ours and _median(times, k) else None) for k in ("sdk", "otel")}
    verdicts = []
    for req in REQUIREMENTS.get(primitive, ()):
        ratio = ratios.get(req.versus)
        if ratio is not None:
            verdicts.append(ratio >= req.min_ratio)
    if _error(times, "ours"):
        status = "ERROR"
    elif not verdicts:
        status = "SKIP"
    else:
        status = "PASS" if all(verdicts) else "FAIL"
    return {"ratios": ratios, "round_ratios": _round_ratios(times), "status": status}


def _round_ratios(times: Mapping[str, Mapping[str, Any]]) -> dict[str, list[float]]:
    """theirs/ours per round (same-round pairs), to show how much the ratio moves."""
    ours = times.get("ours", {}).get("round_medians_ns", [])
    return {
        key: [t / o for t, o in zip(times[key]["round_medians_ns"], ours, strict=False) if o]
        for key in ("sdk", "otel")
        if key in times and ours
    }


def _median(times: Mapping[str, Mapping[str, Any]], key: str) -> float | None:
    return times.get(key, {}).get("median_ns")


def _error(times: Mapping[str, Mapping[str, Any]], key: str) -> str | None:
    return times.get(key, {}).get("error")


def run_sustained(contenders: Sequence[Contender], seconds: float) -> dict[str, dict[str, Any]]:
    """One flat-out marking run per Cirron contender; counts what reached the spool."""
    results: dict[str, dict[str, Any]] = {}
    for contender in contenders:
        if "sustained" not in contender.blocks:
            continue
        print(f"  sustained: {contender.label} for {seconds:g} s ...", flush=True)
        spec = {"mode": "sustained", "contender": contender.key, "seconds": seconds}
        result = spawn_worker(spec, timeout_s=300 + 20 * seconds)
        results[contender.key] = summarize_sustained(contender.key, result)
    return results


def summarize_sustained(key: str, result: WorkerResult) -> dict[str, Any]:
    """Derive rates and the verdict from one sustained worker's output."""
    if not result.ok:
        return {"status": "ERROR", "error": result.error}
    d = result.data
    total_s = d["emit_s"] + d["drain_s"]
    drops = d["health"]["mark_drops"]
    lost = d["emitted"] - d["spool_marks"]
    summary = {
        **d,
        "total_s": total_s,
        "spool_rate": d["spool_marks"] / total_s if total_s else 0.0,
        "emit_rate": d["emitted"] / d["emit_s"] if d["emit_s"] else 0.0,
        "lost": lost,
        "status": "—",
    }
    if key == "ours":
        ok = summary["spool_rate"] >= SUSTAINED_MIN_RATE and not drops and lost == 0 and not d["spool_bad"]
        summary["status"] = "PASS" if ok else "FAIL"
    return summary


# --------------------------------------------------------------------------------------
# Report formatting
# --------------------------------------------------------------------------------------
def fmt_ns(ns: float | None) -> str:
    """Per-call time in µs, 3 decimals."""
    return "—" if ns is None else f"{ns / 1000:.3f} µs"


def fmt_ratio(ratio: float | None) -> str:
    """A speed-up factor."""
    return "—" if ratio is None else f"{ratio:.1f}x"


def _fmt_count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def fmt_required(primitive: str) -> str:
    """Required ratios of a row, e.g. '>=15x sdk, >=40x otel'."""
    reqs = REQUIREMENTS.get(primitive, ())
    return ", ".join(f">={r.min_ratio:g}x {r.versus}" for r in reqs) or "—"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def micro_table(micro: Mapping[str, Mapping[str, Any]], info: Mapping[str, Any]) -> str:
    """The primitive table with ratios and verdicts."""
    sdk_version = info["versions"].get("cirron-sdk") or "?"
    otel_version = info["versions"].get("opentelemetry-sdk") or "?"
    header = [
        "primitive",
        "cirron-otel",
        f"cirron-sdk {sdk_version}",
        f"OTel SDK {otel_version}",
        "ratio sdk/ours",
        "ratio otel/ours",
        "required ratio",
        "PASS/FAIL",
    ]
    rows = []
    for primitive, res in micro.items():
        times, verdict = res["times"], res["verdict"]
        rows.append(
            [
                primitive,
                _cell(times, "ours"),
                _cell(times, "sdk"),
                _cell(times, "otel"),
                fmt_ratio(verdict["ratios"]["sdk"]),
                fmt_ratio(verdict["ratios"]["otel"]),
                fmt_required(primitive),
                f"**{verdict['status']}**" if verdict["status"] != "PASS" else "PASS",
            ]
        )
    return markdown_table(header, rows)


def _cell(times: Mapping[str, Mapping[str, Any]], key: str) -> str:
    if key not in times:
        return "—"
    return "ERROR" if _error(times, key) else fmt_ns(_median(times, key))


def sustained_table(sustained: Mapping[str, Mapping[str, Any]]) -> str:
    """The sustained-throughput table."""
    header = [
        "contender",
        "marks emitted",
        "marks in spool",
        "emit s + drain s",
        "marks/s into spool",
        "drops (health)",
        "lost (emitted - spool)",
        "peak RSS",
        "required",
        "PASS/FAIL",
    ]
    rows = []
    for key, s in sustained.items():
        label = CONTENDER_BY_KEY[key].label
        if s["status"] == "ERROR":
            rows.append([label, *["—"] * 8, "**ERROR**"])
            continue
        required = f">={SUSTAINED_MIN_RATE:,}/s, 0 drops" if key == "ours" else "—"
        rows.append(
            [
                label,
                f"{s['emitted']:,}",
                f"{s['spool_marks']:,}",
                f"{s['emit_s']:.2f} + {s['drain_s']:.2f}",
                f"{s['spool_rate']:,.0f}",
                _fmt_count(s["health"]["mark_drops"]),
                f"{s['lost']:,}",
                f"{s['peak_rss_kb'] / 1024:.0f} MiB",
                required,
                f"**{s['status']}**" if s["status"] == "FAIL" else s["status"],
            ]
        )
    return markdown_table(header, rows)


def print_header(info: Mapping[str, Any], settings: Settings) -> None:
    """Environment lines above the tables."""
    versions = ", ".join(f"{d} {v or 'not installed'}" for d, v in info["versions"].items())
    print(f"date: {info['date']}")
    print(f"python: {info['python']} ({info['python_executable']})")
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu_model']}, {info['platform']}, load avg {info['load_avg']}"
    )
    print(f"libraries: {versions}")
    print(
        f"method: rounds={settings.rounds}, a fresh process per (primitive, contender,"
        " round), contenders alternating; in each process the median of"
        f" {settings.chunks} chunks x {settings.calls:,} calls after 1 warm-up chunk,"
        " flush between chunks; raw per-call time, nothing subtracted"
    )


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds/chunks/calls, 2 s sustained")
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma list of {', '.join(SECTIONS)}",
    )
    p.add_argument(
        "--sustained",
        type=float,
        default=None,
        metavar="SECONDS",
        help="sustained run length (default 10, --quick 2; 0 skips it)",
    )
    p.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="write all results as JSON",
    )
    p.add_argument("--check", action="store_true", help="exit 1 when any requirement fails")
    p.add_argument(
        "--pin-cpu",
        type=int,
        default=0,
        help="run every micro-benchmark worker (all contenders alike) on this CPU; -1: don't pin",
    )
    p.add_argument(
        "--otel-context",
        choices=["on", "off"],
        default="on",
        help="cirron-otel with its OpenTelemetry context integration on (the default) or off",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings after --quick / --rounds / --sustained."""
    base = QUICK if args.quick else FULL
    return Settings(
        rounds=args.rounds or base.rounds,
        chunks=base.chunks,
        calls=base.calls,
        sustained_s=base.sustained_s if args.sustained is None else args.sustained,
    )


def exit_on_sigterm() -> None:
    """Turn SIGTERM (`timeout`, `kill`) into SystemExit, so that `finally` blocks remove the
    temporary output directories and `subprocess.run` kills its worker: a sustained run
    interrupted otherwise leaves gigabytes of spool in the temporary directory."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected sections, print the report, optionally write JSON."""
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return 0
    exit_on_sigterm()
    settings = settings_from(args)
    os.environ["CIRRON_BENCH_OTEL_CONTEXT"] = args.otel_context  # inherited by the workers
    os.environ["CIRRON_BENCH_PIN_CPU"] = "" if args.pin_cpu < 0 else str(args.pin_cpu)
    pinning = f"pinned to CPU {args.pin_cpu}" if args.pin_cpu >= 0 else "not pinned"
    print(f"cirron-otel OpenTelemetry context integration: {args.otel_context}; micro workers {pinning}")
    only = args.only.split(",")
    info = machine_info()
    print_header(info, settings)
    contenders = available_contenders()
    if "ours" not in {c.key for c in contenders}:
        print("NOTE: without cirron-otel there is nothing to compare: verdicts are SKIP")

    micro: dict[str, dict[str, Any]] = {}
    for primitive in (p for p in PRIMITIVES if p in only):
        times = run_micro(primitive, contenders, settings)
        micro[primitive] = {"times": times, "verdict": judge(primitive, times)}
    sustained: dict[str, dict[str, Any]] = {}
    if "sustained" in only and settings.sustained_s > 0:
        sustained = run_sustained(contenders, settings.sustained_s)

    if micro:
        print("\n" + micro_table(micro, info))
    if sustained:
        print(
            f"\nSustained: one thread, ci.mark('loss', v) flat out, one ci.scope('step')"
            f" per 10 marks, {settings.sustained_s:g} s;"
            " marks/s = marks parsed from <out>/spool/*.json / (emit + drain) s"
        )
        print(sustained_table(sustained))
        for key, s in sustained.items():
            if s.get("error"):
                print(f"  ERROR {CONTENDER_BY_KEY[key].label}: {s['error']}")
            written = s.get("health", {}).get("marks_written")
            if written is not None and written != s.get("spool_marks"):
                print(
                    f"  NOTE {CONTENDER_BY_KEY[key].label}: health() reports {written:,} marks"
                    f" written, the spool files hold {s['spool_marks']:,}"
                )
            for bad in s.get("spool_bad", []):
                print(f"  BAD BATCH {CONTENDER_BY_KEY[key].label}: {bad}")

    statuses = [m["verdict"]["status"] for m in micro.values()] + [s["status"] for s in sustained.values()]
    failed = any(s in ("FAIL", "ERROR") for s in statuses)
    print(f"\noverall: {'FAIL' if failed else 'PASS' if 'PASS' in statuses else 'SKIP'}")
    if args.json:
        report = {
            "info": info,
            "settings": asdict(settings),
            "micro": micro,
            "sustained": sustained,
            "overall_failed": failed,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if (failed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
