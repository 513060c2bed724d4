"""`cirron-otel inspect PATH`: what a spool holds, in one streaming pass.

Memory is bounded by the number of distinct names, sessions and processes (aggregates per
name), never by the number of records: a 10 GB spool is read file by file.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import click

from . import reader
from .table import render

SESSION = "cirron.session"


@dataclass
class SpanStats:
    count: int = 0
    total_ns: int = 0
    min_ns: int | None = None
    max_ns: int | None = None
    errors: int = 0

    def add(self, duration: int, error: bool) -> None:
        self.count += 1
        self.total_ns += duration
        self.min_ns = duration if self.min_ns is None else min(self.min_ns, duration)
        self.max_ns = duration if self.max_ns is None else max(self.max_ns, duration)
        self.errors += error


@dataclass
class MarkStats:
    count: int = 0
    point: int = 0
    summary: int = 0
    nonfinite: int = 0
    min: float | None = None
    max: float | None = None
    last: Any = None
    last_ts: int = -1

    def add(self, mark: dict[str, Any]) -> None:
        self.count += 1
        if mark.get("kind") == "summary":
            self.summary += 1
        else:
            self.point += 1
        value = reader.mark_value(mark)
        ts = mark.get("ts_ns")
        if isinstance(ts, int) and ts >= self.last_ts:  # files are not in ts order across threads
            self.last, self.last_ts = value, ts
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if not math.isfinite(value):
            self.nonfinite += 1
            return
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)


@dataclass
class Process:
    """What the spans of one (pid, rank) say; the session record, once it is written."""

    pid: int
    rank: int
    spans: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    session: dict[str, Any] | None = None


@dataclass
class Inspection:
    files: int = 0
    bytes: int = 0
    unreadable: list[dict[str, str]] = field(default_factory=list)
    spans: int = 0
    marks: int = 0
    snapshots: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    span_names: dict[str, SpanStats] = field(default_factory=dict)
    mark_names: dict[str, MarkStats] = field(default_factory=dict)
    processes: dict[tuple[int, int], Process] = field(default_factory=dict)
    root_marks: int = 0  # recorded before profile(): attached to "root"
    mark_ids_omitted: int = 0  # marks not listed in their span's mark_ids (still in the spool)
    drop_attrs: dict[str, int] = field(default_factory=dict)  # `*drop*` counters in span attrs

    def _time(self, ns: Any) -> None:
        if isinstance(ns, int):
            self.first_ns = ns if self.first_ns is None else min(self.first_ns, ns)
            self.last_ns = ns if self.last_ns is None else max(self.last_ns, ns)

    def add(self, batch: reader.Batch) -> None:
        self.files += 1
        self.bytes += batch.file.size
        if batch.doc is None:
            self.unreadable.append({"file": batch.file.name, "error": batch.error or "?"})
            return
        snapshots = batch.doc.get("snapshots")
        self.snapshots += len(snapshots) if isinstance(snapshots, list) else 0
        for span in batch.spans:
            if isinstance(span, dict):
                self.add_span(span)
        for mark in batch.marks:
            if isinstance(mark, dict):
                self.add_mark(mark)

    def add_span(self, span: dict[str, Any]) -> None:
        self.spans += 1
        start, end = span.get("start_ns"), span.get("end_ns")
        duration = end - start if isinstance(start, int) and isinstance(end, int) else 0
        attrs = span.get("attrs") if isinstance(span.get("attrs"), dict) else {}
        name = str(span.get("name"))
        self.span_names.setdefault(name, SpanStats()).add(duration, attrs.get("error") is True)
        self._time(start)
        self._time(end)
        self.mark_ids_omitted += span.get("mark_ids_omitted") or 0
        key = (span.get("pid") or 0, span.get("rank") or 0)
        proc = self.processes.get(key)
        if proc is None:
            proc = self.processes[key] = Process(*key)
        proc.spans += 1
        if isinstance(start, int):
            proc.first_ns = start if proc.first_ns is None else min(proc.first_ns, start)
        if isinstance(end, int):
            proc.last_ns = end if proc.last_ns is None else max(proc.last_ns, end)
        if name == SESSION:
            proc.session = span
            for k, v in attrs.items():
                if "drop" in k and isinstance(v, int) and not isinstance(v, bool):
                    self.drop_attrs[k] = self.drop_attrs.get(k, 0) + v

    def add_mark(self, mark: dict[str, Any]) -> None:
        self.marks += 1
        self.mark_names.setdefault(str(mark.get("name")), MarkStats()).add(mark)
        self._time(mark.get("ts_ns"))
        if mark.get("span_id") == "root":
            self.root_marks += 1

    # -- output ---------------------------------------------------------------------------

    def sessions(self) -> list[dict[str, Any]]:
        out = []
        for proc in sorted(self.processes.values(), key=lambda p: (p.first_ns or 0, p.pid)):
            s = proc.session
            attrs = s.get("attrs", {}) if s else {}
            start = s.get("start_ns") if s else proc.first_ns
            end = s.get("end_ns") if s else proc.last_ns
            out.append(
                {
                    "pid": proc.pid,
                    "rank": proc.rank,
                    # the spool has no host field: a session attribute, when the program set one
                    "host": attrs.get("host.name") or attrs.get("host"),
                    "session_id": s.get("id") if s else None,
                    "parent_session_id": (s.get("parent_id") or attrs.get("cirron.parent_session_id"))
                    if s
                    else None,
                    "start_ns": start,
                    "end_ns": end,
                    "duration_ns": end - start if isinstance(start, int) and isinstance(end, int) else None,
                    "spans": proc.spans,
                    # no session record: the process is still running, or was killed before its exit
                    "closed": s is not None,
                }
            )
        return out

    def to_json(self, top: int) -> dict[str, Any]:
        scopes = sorted(
            ((n, s) for n, s in self.span_names.items() if n != SESSION), key=lambda kv: -kv[1].total_ns
        )
        return {
            "files": self.files,
            "bytes": self.bytes,
            "unreadable_files": self.unreadable,
            "spans": self.spans,
            "marks": self.marks,
            "snapshots": self.snapshots,
            "start_ns": self.first_ns,
            "end_ns": self.last_ns,
            "sessions": self.sessions(),
            "span_names": {n: vars(s) for n, s in sorted(self.span_names.items())},
            "top_scopes": [{"name": n, "total_ns": s.total_ns, "count": s.count} for n, s in scopes[:top]],
            "mark_names": {
                n: {k: _json_num(v) for k, v in vars(m).items() if k != "last_ts"}
                for n, m in sorted(self.mark_names.items())
            },
            "drops": {
                "unreadable_files": len(self.unreadable),
                "mark_ids_omitted": self.mark_ids_omitted,
                "root_marks": self.root_marks,
                **self.drop_attrs,
            },
        }

    def to_text(self, top: int) -> str:
        parts = [
            f"{self.files} files, {reader.fmt_bytes(self.bytes)}; {self.spans} spans, "
            f"{self.marks} marks, {self.snapshots} snapshots"
        ]
        if self.first_ns is not None and self.last_ns is not None:
            parts.append(
                f"time {reader.fmt_ns(self.first_ns)} .. {reader.fmt_ns(self.last_ns)} "
                f"({reader.fmt_duration(self.last_ns - self.first_ns)})"
            )
        rows = [
            (
                s["pid"],
                s["rank"],
                s["host"] or "-",
                reader.fmt_ns(s["start_ns"]) if s["start_ns"] is not None else "-",
                reader.fmt_duration(s["duration_ns"]) if s["duration_ns"] is not None else "-",
                s["spans"],
                "" if s["closed"] else "no session record (running or killed)",
            )
            for s in self.sessions()
        ]
        parts.append(
            "\nSessions\n"
            + render(["pid", "rank", "host", "start", "duration", "spans", "note"], rows, right=(0, 1, 5))
        )
        scopes = sorted(
            ((n, s) for n, s in self.span_names.items() if n != SESSION), key=lambda kv: -kv[1].total_ns
        )[:top]
        parts.append(
            f"\nTop scopes by total time (of {len(self.span_names)} span names)\n"
            + render(
                ["name", "count", "total", "mean", "min", "max", "errors"],
                [
                    (
                        n,
                        s.count,
                        reader.fmt_duration(s.total_ns),
                        reader.fmt_duration(s.total_ns // max(s.count, 1)),
                        reader.fmt_duration(s.min_ns or 0),
                        reader.fmt_duration(s.max_ns or 0),
                        s.errors,
                    )
                    for n, s in scopes
                ],
                right=(1, 2, 3, 4, 5, 6),
            )
        )
        parts.append(
            "\nMarks\n"
            + render(
                ["name", "count", "point", "summary", "min", "max", "last", "non-finite"],
                [
                    (n, m.count, m.point, m.summary, _fmt(m.min), _fmt(m.max), _fmt(m.last), m.nonfinite)
                    for n, m in sorted(self.mark_names.items())
                ],
                right=(1, 2, 3, 4, 5, 7),
            )
        )
        drops = self.to_json(top)["drops"]
        parts.append(
            "\nDrops and gaps recorded in the files: " + ", ".join(f"{k} {v}" for k, v in drops.items())
        )
        for bad in self.unreadable:
            parts.append(f"  unreadable: {bad['file']}: {bad['error']}")
        return "\n".join(parts)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 24 else text[:23] + "…"


def _json_num(value: Any) -> Any:
    # strict JSON out too: a non-finite `last` is written as the spool writes it, a string
    return value if not (isinstance(value, float) and not math.isfinite(value)) else str(value)


def run_inspect(path: str) -> Inspection:
    result = Inspection()
    for batch in reader.iter_batches(path):
        result.add(batch)
    return result


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, for machines.")
@click.option(
    "--top",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many scopes to list by total time.",
)
def inspect(path: str, as_json: bool, top: int) -> None:
    """Summarise a spool: sessions (pid, rank, host, time range, duration), span and mark
    counts per name, the top scopes by total time, marks with min / max / last, drops and
    gaps recorded in the files, file count and bytes.

    Streams the spool file by file (memory does not grow with its size). Exits 1 when a
    file cannot be read.
    """
    try:
        result = run_inspect(path)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        json.dump(result.to_json(top), sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
    else:
        click.echo(result.to_text(top))
    if result.unreadable:
        sys.exit(1)
