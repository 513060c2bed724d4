"""Spool → Chrome trace event JSON (what chrome://tracing and ui.perfetto.dev open).

- a span: a complete event (`"ph": "X"`) on its process (pid) and thread (tid), with the
  scope's attrs, index, ids and its summary marks as `args`;
- a numeric point mark: a counter event (`"ph": "C"`) on its span's process, one counter
  track per mark name (non-finite values are left out: JSON has no NaN; counted);
- a string point mark: an instant event (`"ph": "i"`, thread scope) on its span's thread;
- metadata events name each process (`rank R · pid P`) and thread.

A viewer draws one thread's slices as a stack, so two that overlap without nesting (a scope
held by a generator and closed inside a later one) would be drawn wrongly or rejected
(Perfetto's "slice not nested"). Such a slice goes to an extra track of its thread, a
"lane" with a tid of its own (negative, so never a real thread's), named after the thread.

Marks carry no pid or tid (their span does) and spans close after their marks, so a first
pass keeps, per span id, its (pid, tid) and summaries (memory bounded by the spans); the
second pass streams the events out. Timestamps are microseconds since the spool's first
record, exact to the nanosecond (absolute epoch microseconds would lose the ns in a double).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from . import reader

ROOT_PID = 0  # marks attached to "root" (before profile()) or to a span not in the spool


@dataclass
class Prepass:
    origin_ns: int | None = None
    where: dict[str, tuple[int, int]] = field(default_factory=dict)  # span id -> (pid, tid)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # span id -> {name: value}
    processes: dict[int, int] = field(default_factory=dict)  # pid -> rank
    threads: set[tuple[int, int]] = field(default_factory=set)
    intervals: dict[tuple[int, int], list[tuple[int, int, str]]] = field(default_factory=dict)
    lanes: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # thread -> its lane tids

    def _t(self, ns: Any) -> None:
        if isinstance(ns, int) and (self.origin_ns is None or ns < self.origin_ns):
            self.origin_ns = ns


def prepass(files: list[reader.SpoolFile]) -> Prepass:
    p = Prepass()
    for batch in reader.iter_batches("", files):
        if batch.doc is None:
            reader.warn_unreadable(batch)
        for span in batch.spans:
            p.where[span["id"]] = (span["pid"], span["thread_id"])
            p.processes[span["pid"]] = span["rank"]
            p.threads.add((span["pid"], span["thread_id"]))
            p.intervals.setdefault((span["pid"], span["thread_id"]), []).append(
                (span["start_ns"], span["end_ns"], span["id"])
            )
            p._t(span["start_ns"])
        for mark in batch.marks:
            p._t(mark["ts_ns"])
            if mark.get("kind") == "summary":
                value = _json_value(reader.mark_value(mark))
                p.summaries.setdefault(mark["span_id"], {})[mark["name"]] = value
    _assign_lanes(p)
    return p


def _assign_lanes(p: Prepass) -> None:
    """Per thread, by start time (outer first): a slice goes to the first lane where it nests
    in, or follows, what is open there; its span (and so its marks) is drawn on that lane."""
    next_tid = -1
    for (pid, tid), spans in sorted(p.intervals.items()):
        spans.sort(key=lambda iv: (iv[0], -iv[1]))
        stacks: list[list[int]] = []  # per lane: the ends of its open slices
        tids: list[int] = []
        for start, end, span_id in spans:
            lane = _fit(stacks, start, end)
            if lane == len(stacks):
                stacks.append([])
                if lane:
                    tids.append(next_tid)
                    next_tid -= 1
            stacks[lane].append(end)
            if lane:
                p.where[span_id] = (pid, tids[lane - 1])
        if tids:
            p.lanes[(pid, tid)] = tids
    p.intervals.clear()  # not needed again: the memory goes back


def _fit(stacks: list[list[int]], start: int, end: int) -> int:
    """The first lane whose innermost open slice contains [start, end] or has ended by
    `start` (len(stacks): none, a new lane)."""
    for lane, stack in enumerate(stacks):
        while stack and stack[-1] <= start:
            stack.pop()
        if not stack or end <= stack[-1]:
            return lane
    return len(stacks)


@dataclass
class Stats:
    slices: int = 0
    counters: int = 0
    instants: int = 0
    nonfinite_skipped: int = 0
    unattached_marks: int = 0
    lane_slices: int = 0  # slices moved to an extra lane of their thread (see the docstring)


def _json_value(value: Any) -> Any:
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def events(files: list[reader.SpoolFile], pre: Prepass, stats: Stats) -> Iterator[dict[str, Any]]:
    origin = pre.origin_ns or 0
    for pid, rank in sorted(pre.processes.items()):
        yield {
            "ph": "M",
            "name": "process_name",
            "pid": pid,
            "tid": 0,
            "args": {"name": f"rank {rank} · pid {pid}"},
        }
        yield {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": rank}}
    for order, (pid, tid) in enumerate(sorted(pre.threads)):
        yield {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": f"thread {tid}"}}
        yield {
            "ph": "M",
            "name": "thread_sort_index",
            "pid": pid,
            "tid": tid,
            "args": {"sort_index": 2 * order},
        }
        for k, lane in enumerate(pre.lanes.get((pid, tid), ()), 1):
            name = f"thread {tid} · overlapping {k}"
            yield {"ph": "M", "name": "thread_name", "pid": pid, "tid": lane, "args": {"name": name}}
            yield {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": pid,
                "tid": lane,
                "args": {"sort_index": 2 * order + 1},
            }
    for batch in reader.iter_batches("", files):
        for span in batch.spans:
            args: dict[str, Any] = {"id": span["id"]}
            if span.get("parent_id"):
                args["parent_id"] = span["parent_id"]
            if span.get("index") is not None:
                args["index"] = span["index"]
            if span.get("cpu_ns") is not None:
                args["cpu_ns"] = span["cpu_ns"]
            args.update(span.get("attrs") or {})
            for name, value in pre.summaries.get(span["id"], {}).items():
                args[f"summary.{name}"] = value
            stats.slices += 1
            pid, tid = pre.where.get(span["id"], (span["pid"], span["thread_id"]))
            stats.lane_slices += tid != span["thread_id"]
            yield {
                "ph": "X",
                "name": span["name"],
                "cat": "scope",
                "pid": pid,
                "tid": tid,
                "ts": _us(span["start_ns"] - origin),
                "dur": _us(span["end_ns"] - span["start_ns"]),
                "args": args,
            }
        for mark in batch.marks:
            if mark.get("kind") == "summary":
                continue  # on its span's slice
            pid, tid = pre.where.get(mark["span_id"], (ROOT_PID, 0))
            if pid == ROOT_PID:
                stats.unattached_marks += 1
            value = reader.mark_value(mark)
            ts = _us(mark["ts_ns"] - origin)
            if isinstance(value, int | float):  # bool too: a 0/1 counter
                number = float(value)
                if not math.isfinite(number):
                    stats.nonfinite_skipped += 1
                    continue
                stats.counters += 1
                yield {
                    "ph": "C",
                    "name": mark["name"],
                    "cat": "mark",
                    "pid": pid,
                    "tid": tid,
                    "ts": ts,
                    "args": {mark["name"]: number},
                }
            else:
                stats.instants += 1
                yield {
                    "ph": "i",
                    "s": "t",
                    "name": mark["name"],
                    "cat": "mark",
                    "pid": pid,
                    "tid": tid,
                    "ts": ts,
                    "args": {"value": value, **(mark.get("attrs") or {})},
                }


def write(path: str, out: IO[str]) -> Stats:
    """Stream the trace JSON of the spool at `path` into `out`."""
    files = reader.list_files(path)
    pre = prepass(files)
    stats = Stats()
    out.write('{"displayTimeUnit":"ns","otherData":{"source":"cirron-otel export"},"traceEvents":[\n')
    first = True
    for event in events(files, pre, stats):
        if not first:
            out.write(",\n")
        out.write(json.dumps(event, allow_nan=False, default=str))
        first = False
    out.write("\n]}\n")
    return stats
