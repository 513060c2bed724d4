"""`cirron-otel validate PATH`: strict JSON, the schema, and referential integrity.

Referential checks run in one streaming pass with per-span state only (never per mark, so
memory is bounded by the number of spans, not by the spool's size):

- span ids: a set of ints (duplicates, and the targets of `parent_id` and `span_id`);
- marks: per span id, a running balance (each id listed in `mark_ids` adds
  `2**64 + id64`, each mark attached to the span subtracts it) plus the range of the marks'
  timestamps. A balance that is not zero at the end means listed marks are missing, or marks
  are attached without being listed, or a mark id appears twice; a second pass over the
  files then names the exact ids and records, for those spans only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import click

from . import reader
from .schema_check import batch_errors

_TAG = 1 << 64  # counts ride above the 64-bit id fingerprints in each balance


@dataclass
class Problem:
    file: str
    record: str  # `spans[3]`, `marks[0].span_id`, ... ("" for the file as a whole)
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.record}" if self.record else self.file
        return f"{where}: {self.message}"


@dataclass
class _SpanInfo:
    start: int
    end: int
    where: tuple[str, int]  # (file, index in spans): for reporting
    omitted: int  # mark_ids_omitted


@dataclass
class Validator:
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    spans_seen: int = 0
    marks_seen: int = 0
    _spans: dict[int, _SpanInfo] = field(default_factory=dict)
    _parents: dict[int, tuple[str, int]] = field(default_factory=dict)  # parent id -> first child
    _balance: dict[int, int] = field(default_factory=dict)  # span id (or a missing one) -> balance
    _mark_ts: dict[int, tuple[int, int]] = field(default_factory=dict)  # span id -> (min, max) mark ts
    _mark_where: dict[int, tuple[str, int]] = field(default_factory=dict)  # span id -> a mark on it
    _sessions: set[int] = field(default_factory=set)

    def problem(self, file: str, record: str, message: str) -> None:
        self.problems.append(Problem(file, record, message))

    # -- pass 1 ---------------------------------------------------------------------------

    def add(self, batch: reader.Batch) -> None:
        self.files += 1
        name = batch.file.name
        if batch.doc is None:
            self.problem(name, "", batch.error or "unreadable")
            return
        doc = batch.doc
        schema_ok = True
        for path, message in batch_errors(doc):
            schema_ok = False
            self.problem(name, path.lstrip("."), f"schema: {message}")
        created, batch_id = doc.get("created_ns"), doc.get("batch_id")
        if (batch.file.path.endswith(".json") and isinstance(created, int) and isinstance(batch_id, str)
                and name != f"{created:020d}-{batch_id}.json"):
            self.problem(name, "", f"file name does not match created_ns {created} and batch_id {batch_id}")
        if not schema_ok:
            # referential checks on records of the wrong shape would only add noise
            return
        seen_marks: set[str] = set()
        for i, span in enumerate(batch.spans):
            self._add_span(name, i, span)
        for i, mark in enumerate(batch.marks):
            if mark["id"] in seen_marks:
                self.problem(name, f"marks[{i}]", f"duplicate mark id {mark['id']} in this file")
            seen_marks.add(mark["id"])
            self._add_mark(name, i, mark)

    def _add_span(self, name: str, i: int, span: dict[str, Any]) -> None:
        self.spans_seen += 1
        sid = int(span["id"], 16)
        if span["end_ns"] < span["start_ns"]:
            self.problem(name, f"spans[{i}]", f"span {span['id']} ends ({span['end_ns']}) before it starts "
                                              f"({span['start_ns']})")
        if sid in self._spans:
            first = self._spans[sid].where
            self.problem(name, f"spans[{i}]", f"duplicate span id {span['id']} (first in {first[0]}:"
                                              f"spans[{first[1]}])")
            return
        self._spans[sid] = _SpanInfo(span["start_ns"], span["end_ns"], (name, i),
                                     span.get("mark_ids_omitted") or 0)
        if span["name"] == "cirron.session":
            self._sessions.add(sid)
        parent = span["parent_id"]
        if parent is not None:
            self._parents.setdefault(int(parent, 16), (name, i))
        if span.get("mark_ids_omitted"):
            return  # a partial list: checked by count at the end, and by id in pass 2
        balance = self._balance.get(sid, 0)
        for mid in span["mark_ids"]:
            balance += _TAG + int(mid[:16], 16)
        self._balance[sid] = balance

    def _add_mark(self, name: str, i: int, mark: dict[str, Any]) -> None:
        self.marks_seen += 1
        if mark["span_id"] == "root":
            return  # recorded before profile(): attached to no span, by the format's rule
        sid = int(mark["span_id"], 16)
        self._balance[sid] = self._balance.get(sid, 0) - _TAG - int(mark["id"][:16], 16)
        ts = mark["ts_ns"]
        lo_hi = self._mark_ts.get(sid)
        self._mark_ts[sid] = (ts, ts) if lo_hi is None else (min(lo_hi[0], ts), max(lo_hi[1], ts))
        self._mark_where.setdefault(sid, (name, i))

    # -- the end of pass 1 -------------------------------------------------------------------

    def finish(self) -> set[int]:
        """Report what the per-span state shows; return the spans that need pass 2."""
        for parent, (file, i) in self._parents.items():
            if parent not in self._spans:
                self.problem(file, f"spans[{i}].parent_id",
                             f"parent {parent:032x} is not a span of this spool")
        detail: set[int] = set()
        for sid, balance in self._balance.items():
            info = self._spans.get(sid)
            if info is None:
                file, i = self._mark_where.get(sid, ("?", -1))
                self.problem(file, f"marks[{i}].span_id",
                             f"span {sid:032x} is not in this spool (nor the session root, nor \"root\"); "
                             f"{-balance // _TAG} marks attach to it")
                continue
            if balance != 0 and not info.omitted:
                detail.add(sid)
        for sid, info in self._spans.items():
            if info.omitted:
                detail.add(sid)  # a partial list: its ids and the count are checked in pass 2
            lo_hi = self._mark_ts.get(sid)
            if lo_hi is not None and (lo_hi[0] < info.start or lo_hi[1] > info.end):
                file, i = self._mark_where[sid]
                self.problem(info.where[0], f"spans[{info.where[1]}]",
                             f"span {sid:032x} has marks outside its time range "
                             f"[{info.start}, {info.end}]: {lo_hi[0]}..{lo_hi[1]} (e.g. {file}:marks[{i}])")
        return detail

    # -- pass 2: exact ids, for the spans whose balance is off ---------------------------------

    def detail(self, batches: Any, spans: set[int]) -> None:
        listed: dict[int, dict[str, tuple[str, int]]] = {}
        omitted: dict[int, int] = {}
        attached: dict[int, dict[str, list[tuple[str, int]]]] = {}
        for batch in batches:
            if batch.doc is None or next(batch_errors(batch.doc), None) is not None:
                continue
            for i, span in enumerate(batch.spans):
                sid = int(span["id"], 16)
                if sid in spans and sid not in listed:
                    listed[sid] = {m: (batch.file.name, i) for m in span["mark_ids"]}
                    omitted[sid] = span.get("mark_ids_omitted") or 0
            for i, mark in enumerate(batch.marks):
                if mark["span_id"] != "root" and int(mark["span_id"], 16) in spans:
                    attached.setdefault(int(mark["span_id"], 16), {}).setdefault(
                        mark["id"], []).append((batch.file.name, i))
        for sid in sorted(spans):
            ids = listed.get(sid, {})
            marks = attached.get(sid, {})
            info = self._spans[sid]
            where = f"spans[{info.where[1]}]"
            for mid, (file, i) in ids.items():
                if mid not in marks:
                    self.problem(file, f"spans[{i}].mark_ids",
                                 f"mark {mid} listed by span {sid:032x} is not in the spool")
            for mid, places in marks.items():
                if len(places) > 1:
                    file, i = places[1]
                    self.problem(file, f"marks[{i}]", f"duplicate mark id {mid} (also in "
                                                      f"{places[0][0]}:marks[{places[0][1]}])")
                if mid not in ids and not omitted.get(sid):
                    file, i = places[0]
                    self.problem(file, f"marks[{i}]", f"mark {mid} attaches to span {sid:032x}, "
                                                      f"whose mark_ids does not list it")
            if omitted.get(sid) and len(marks) != len(ids) + omitted[sid]:
                self.problem(info.where[0], where,
                             f"span {sid:032x} lists {len(ids)} marks and says {omitted[sid]} more were "
                             f"left out, but {len(marks)} marks attach to it")


def run_validate(path: str) -> Validator:
    files = reader.list_files(path)
    v = Validator()
    for batch in reader.iter_batches(path, files):
        v.add(batch)
    detail = v.finish()
    if detail:
        v.detail(reader.iter_batches(path, files), detail)
    return v


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object on stdout: the problems, for machines.")
@click.option("--max-problems", default=200, show_default=True, type=click.IntRange(min=1),
              help="Print at most this many problems (all are counted).")
def validate(path: str, as_json: bool, max_problems: int) -> None:
    """Check a spool: strict JSON (no NaN / Infinity tokens: the spool writes non-finite
    values as null plus `value_nonfinite`), the spool v1 schema, file names, and referential
    integrity: every mark's `span_id` is a span of the spool (or `"root"`), every
    `parent_id` resolves, every `mark_ids` entry exists, no duplicate ids, a span ends after
    it starts and its marks fall inside it.

    Each problem is printed as FILE:RECORD: MESSAGE. Exits 1 if there is any.
    """
    try:
        v = run_validate(path)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        json.dump({"ok": not v.problems, "files": v.files, "spans": v.spans_seen, "marks": v.marks_seen,
                   "problems": [vars(p) for p in v.problems]}, sys.stdout)
        sys.stdout.write("\n")
    else:
        for p in v.problems[:max_problems]:
            click.echo(str(p))
        if len(v.problems) > max_problems:
            click.echo(f"... and {len(v.problems) - max_problems} more")
        status = "OK" if not v.problems else f"{len(v.problems)} problems"
        click.echo(f"{status}: {v.files} files, {v.spans_seen} spans, {v.marks_seen} marks",
                   err=bool(v.problems))
    if v.problems:
        sys.exit(1)
