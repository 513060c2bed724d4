"""`cirron-otel validate PATH`: strict JSON, the schema, and referential integrity.

Referential checks stream the files once with state per span, never per mark, so memory is
bounded by the number of spans, not by the spool's size:

- every span id seen, as a set of 128-bit ints (duplicates, parents, late marks);
- per span not seen yet (spans are written when they close, after their marks, so these are
  the open ones): a balance (each mark attached subtracts `2**64 + id64`, each id the span
  lists in `mark_ids` adds it back) and the range of its marks' timestamps, checked and
  dropped when the span arrives;
- parents not seen yet (also open spans), checked at the end.

A balance that is not zero (listed marks missing, unlisted or duplicated marks), a span with
a partial `mark_ids` (`mark_ids_omitted`), a mark that comes after its span or whose span never
comes: such spans get a second pass over the files that names the exact ids and records."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
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
class Validator:
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    spans_seen: int = 0
    marks_seen: int = 0
    _ids: set[int] = field(default_factory=set)  # every span id seen (128-bit ints: compact, exact)
    # marks whose span has not been seen yet: span id -> [balance, min ts, max ts]; spans close
    # after their marks, so this holds the open spans only
    _open: dict[int, list[int]] = field(default_factory=dict)
    _waiting_parents: dict[int, tuple[str, int]] = field(default_factory=dict)  # parent id -> a child
    _detail: set[int] = field(default_factory=set)  # spans pass 2 looks at by id
    _bad_files: set[str] = field(default_factory=set)  # schema errors: left out of the id checks

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
        if (
            batch.file.path.endswith(".json")
            and isinstance(created, int)
            and isinstance(batch_id, str)
            and name != f"{created:020d}-{batch_id}.json"
        ):
            self.problem(name, "", f"file name does not match created_ns {created} and batch_id {batch_id}")
        if not schema_ok:
            # referential checks on records of the wrong shape would only add noise
            self._bad_files.add(name)
            return
        seen_marks: set[str] = set()
        # marks first: a mark is written in the same file as its span or an earlier one
        for i, mark in enumerate(batch.marks):
            if mark["id"] in seen_marks:
                self.problem(name, f"marks[{i}]", f"duplicate mark id {mark['id']} in this file")
            seen_marks.add(mark["id"])
            self._add_mark(mark)
        for i, span in enumerate(batch.spans):
            self._add_span(name, i, span)

    def _add_mark(self, mark: dict[str, Any]) -> None:
        self.marks_seen += 1
        if mark["span_id"] == "root":
            return  # recorded before profile(): attached to no span, by the format's rule
        sid = int(mark["span_id"], 16)
        if sid in self._ids:
            self._detail.add(sid)  # a mark after its span: unusual, checked by id in pass 2
            return
        ts = mark["ts_ns"]
        state = self._open.get(sid)
        if state is None:
            self._open[sid] = [-_TAG - int(mark["id"][:16], 16), ts, ts]
        else:
            state[0] -= _TAG + int(mark["id"][:16], 16)
            state[1] = min(state[1], ts)
            state[2] = max(state[2], ts)

    def _add_span(self, name: str, i: int, span: dict[str, Any]) -> None:
        self.spans_seen += 1
        sid = int(span["id"], 16)
        start, end = span["start_ns"], span["end_ns"]
        if end < start:
            self.problem(name, f"spans[{i}]", f"span {span['id']} ends ({end}) before it starts ({start})")
        if sid in self._ids:
            self.problem(name, f"spans[{i}]", f"duplicate span id {span['id']}")
            return
        self._ids.add(sid)
        self._waiting_parents.pop(sid, None)
        parent = span["parent_id"]
        if parent is not None:
            pid = int(parent, 16)
            if pid not in self._ids:
                self._waiting_parents.setdefault(pid, (name, i))
        state = self._open.pop(sid, None)
        if span.get("mark_ids_omitted"):
            self._detail.add(sid)  # a partial list: its ids and the count are checked in pass 2
        else:
            balance = state[0] if state is not None else 0
            for mid in span["mark_ids"]:
                balance += _TAG + int(mid[:16], 16)
            if balance != 0:
                self._detail.add(sid)
        if state is not None and (state[1] < start or state[2] > end):
            self.problem(
                name,
                f"spans[{i}]",
                f"span {span['id']} has marks outside its time range "
                f"[{start}, {end}]: {state[1]}..{state[2]}",
            )

    # -- the end of pass 1 -------------------------------------------------------------------

    def finish(self) -> set[int]:
        """Report what pass 1 could; return the spans that need pass 2."""
        for parent, (file, i) in self._waiting_parents.items():
            if parent not in self._ids:
                self.problem(
                    file, f"spans[{i}].parent_id", f"parent {parent:032x} is not a span of this spool"
                )
        self._detail.update(self._open)  # marks on spans that never came
        return self._detail

    # -- pass 2: exact ids, for the spans whose balance is off ---------------------------------

    def detail(self, read: Callable[[], Iterator[reader.Batch]], spans: set[int]) -> None:
        """Two more reads of the files (spans, then marks: a mark may come before its span),
        keeping state for the spans in `spans` only."""
        listed: dict[int, dict[str, tuple[str, int]]] = {}
        omitted: dict[int, int] = {}
        where: dict[int, tuple[str, int, int, int]] = {}  # span id -> (file, index, start, end)
        # marks per span: every id and place, except on spans with a partial list (the session
        # may have millions): there, a count and the listed ids that were found
        attached: dict[int, dict[str, list[tuple[str, int]]]] = {}
        counted: dict[int, int] = {}
        found: dict[int, set[str]] = {}
        outside: dict[int, tuple[str, int, int]] = {}  # span id -> (file, index, ts) of a mark
        for batch in read():
            if batch.doc is None or batch.file.name in self._bad_files:
                continue
            for i, span in enumerate(batch.spans):
                sid = int(span["id"], 16)
                if sid in spans and sid not in where:
                    where[sid] = (batch.file.name, i, span["start_ns"], span["end_ns"])
                    listed[sid] = {m: (batch.file.name, i) for m in span["mark_ids"]}
                    omitted[sid] = span.get("mark_ids_omitted") or 0
        for batch in read():
            if batch.doc is None or batch.file.name in self._bad_files:
                continue
            for i, mark in enumerate(batch.marks):
                if mark["span_id"] == "root":
                    continue
                sid = int(mark["span_id"], 16)
                if sid not in spans:
                    continue
                if omitted.get(sid):
                    counted[sid] = counted.get(sid, 0) + 1
                    if mark["id"] in listed[sid]:
                        found.setdefault(sid, set()).add(mark["id"])
                else:
                    attached.setdefault(sid, {}).setdefault(mark["id"], []).append((batch.file.name, i))
                span_where = where.get(sid)
                if span_where and not span_where[2] <= mark["ts_ns"] <= span_where[3]:
                    outside.setdefault(sid, (batch.file.name, i, mark["ts_ns"]))
        for sid in sorted(spans):
            if sid not in where:
                places = [p for ps in attached.get(sid, {}).values() for p in ps]
                file, i = min(places) if places else ("?", -1)
                self.problem(
                    file,
                    f"marks[{i}].span_id",
                    f'span {sid:032x} is not in this spool (nor the session root, nor "root"); '
                    f"{len(places)} marks attach to it",
                )
                continue
            file, index, start, end = where[sid]
            ids = listed[sid]
            if omitted[sid]:
                for mid, (f, i) in ids.items():
                    if mid not in found.get(sid, ()):
                        self.problem(
                            f,
                            f"spans[{i}].mark_ids",
                            f"mark {mid} listed by span {sid:032x} is not in the spool",
                        )
                if counted.get(sid, 0) != len(ids) + omitted[sid]:
                    self.problem(
                        file,
                        f"spans[{index}]",
                        f"span {sid:032x} lists {len(ids)} marks and says {omitted[sid]} more were "
                        f"left out, but {counted.get(sid, 0)} marks attach to it",
                    )
                continue
            marks = attached.get(sid, {})
            for mid, (f, i) in ids.items():
                if mid not in marks:
                    self.problem(
                        f, f"spans[{i}].mark_ids", f"mark {mid} listed by span {sid:032x} is not in the spool"
                    )
            for mid, places in marks.items():
                if len(places) > 1:
                    f, i = places[1]
                    self.problem(
                        f,
                        f"marks[{i}]",
                        f"duplicate mark id {mid} (also in {places[0][0]}:marks[{places[0][1]}])",
                    )
                if mid not in ids:
                    f, i = places[0]
                    self.problem(
                        f,
                        f"marks[{i}]",
                        f"mark {mid} attaches to span {sid:032x}, whose mark_ids does not list it",
                    )
            if sid in outside:
                f, i, ts = outside[sid]
                self.problem(
                    file,
                    f"spans[{index}]",
                    f"span {sid:032x} has marks outside its time range "
                    f"[{start}, {end}]: {ts} ({f}:marks[{i}])",
                )


def run_validate(path: str) -> Validator:
    files = reader.list_files(path)
    v = Validator()
    for batch in reader.iter_batches(path, files):
        v.add(batch)
    detail = v.finish()
    if detail:
        v.detail(lambda: reader.iter_batches(path, files), detail)
    return v


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object on stdout: the problems, for machines."
)
@click.option(
    "--max-problems",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Print at most this many problems (all are counted).",
)
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
        json.dump(
            {
                "ok": not v.problems,
                "files": v.files,
                "spans": v.spans_seen,
                "marks": v.marks_seen,
                "problems": [vars(p) for p in v.problems],
            },
            sys.stdout,
        )
        sys.stdout.write("\n")
    else:
        for p in v.problems[:max_problems]:
            click.echo(str(p))
        if len(v.problems) > max_problems:
            click.echo(f"... and {len(v.problems) - max_problems} more")
        status = "OK" if not v.problems else f"{len(v.problems)} problems"
        click.echo(
            f"{status}: {v.files} files, {v.spans_seen} spans, {v.marks_seen} marks", err=bool(v.problems)
        )
    if v.problems:
        sys.exit(1)
