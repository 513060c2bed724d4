"""`cirron-otel tail PATH`: follow a live spool, printing spans and marks as their files land.

Batch files appear atomically (renamed into place once complete), so polling the directory
and reading each new `*.json` once sees every record exactly once; `.json.tmp` files are still
being written and are skipped until renamed. Several processes may write the directory, and a
file's name is its seal time, so a new file can sort before one already read: the set of names
read is kept (pruned of files since evicted), not just the last one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from . import reader


def _line(kind: str, record: dict[str, Any]) -> str:
    if kind == "span":
        dur = reader.fmt_duration(record["end_ns"] - record["start_ns"])
        index = f"[{record['index']}]" if record.get("index") is not None else ""
        attrs = record.get("attrs") or {}
        error = "  ERROR " + str(attrs.get("error.message", "")) if attrs.get("error") is True else ""
        extra = " ".join(f"{k}={v}" for k, v in attrs.items() if not k.startswith("error"))
        return (
            f"{reader.fmt_ns(record['end_ns'])}  span  {record['name']}{index}  {dur}  "
            f"pid {record['pid']} rank {record['rank']}  {extra}{error}"
        ).rstrip()
    value = reader.mark_value(record)
    attrs = " ".join(f"{k}={v}" for k, v in (record.get("attrs") or {}).items())
    span = record["span_id"] if record["span_id"] == "root" else record["span_id"][:16]
    kind_note = " (summary)" if record.get("kind") == "summary" else ""
    when = reader.fmt_ns(record["ts_ns"])
    return f"{when}  mark  {record['name']}={value}{kind_note}  on {span}  {attrs}".rstrip()


@click.command()
@click.argument("path", type=click.Path())
@click.option("--from-start", is_flag=True, help="Print the records already in the spool first.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON object per record (`{"type": "span"|"mark", ...record}`), for machines.',
)
@click.option(
    "--interval",
    default=0.2,
    show_default=True,
    type=click.FloatRange(min=0.01),
    help="Seconds between looks at the directory.",
)
@click.option("--name", "names", multiple=True, help="Only records of this name (repeatable).")
@click.option(
    "--timeout",
    default=None,
    type=click.FloatRange(min=0),
    help="Stop after this many seconds (default: until Ctrl-C).",
)
def tail(
    path: str, from_start: bool, as_json: bool, interval: float, names: tuple[str, ...], timeout: float | None
) -> None:
    """Follow a live spool: print new spans and marks as the running program writes them
    (PATH may not exist yet: tail waits for it). Marks are printed when their batch lands,
    which is before their span closes; a span is printed when it has closed.
    """
    seen: set[str] = set()
    started = time.monotonic()
    first = True
    wanted = set(names)
    try:
        while timeout is None or time.monotonic() - started < timeout:
            try:
                files = reader.list_files(path)
            except FileNotFoundError:
                files = []
            if first and not from_start:
                seen.update(f.name for f in files)  # like tail -f: only what comes from now on
            else:
                for file in files:
                    if file.name in seen:
                        continue
                    seen.add(file.name)
                    batch = reader.read_batch(file)
                    if batch.doc is None:
                        click.echo(f"{file.name}: {batch.error}", err=True)
                        continue
                    records = [("span", r) for r in batch.spans] + [("mark", r) for r in batch.marks]
                    records.sort(key=lambda kr: kr[1].get("ts_ns", kr[1].get("end_ns", 0)))
                    for kind, record in records:
                        if wanted and record.get("name") not in wanted:
                            continue
                        try:
                            text = json.dumps({"type": kind, **record}) if as_json else _line(kind, record)
                            click.echo(text)
                        except reader.MALFORMED as exc:  # a malformed record: say so, go on
                            click.echo(f"{file.name}: a {kind} record: {type(exc).__name__}: {exc}", err=True)
            if len(seen) > 2 * len(files) + 1000:  # evicted files: forget their names
                seen &= {f.name for f in files}
            first = False
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `cirron-otel tail ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
