"""`cirron-otel export PATH --format perfetto|chrome|otlp-json -o FILE`."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import IO

import click

from . import reader


@contextlib.contextmanager
def _atomic_output(output: str) -> Iterator[IO[str]]:
    """stdout for '-'; else a temporary file renamed over `output` only on success, so a failed
    export leaves no partial file (click's atomic open_file renames even on failure)."""
    if output == "-":
        yield sys.stdout
        return
    tmp = f"{output}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            yield out
        os.replace(tmp, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["perfetto", "chrome", "otlp-json"]),
    help="perfetto / chrome: Chrome trace event JSON (both open it); otlp-json: one OTLP/JSON "
    "ExportTraceServiceRequest per line.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="The file to write ('-': stdout).",
)
@click.option(
    "--service-name", default=None, help="otlp-json: service.name (default: OTEL_SERVICE_NAME, else cirron)."
)
def export(path: str, fmt: str, output: str, service_name: str | None) -> None:
    """Write the spool in another format, streaming (memory bounded by the spans, not the marks).

    \b
    perfetto, chrome  Chrome trace event JSON for ui.perfetto.dev and chrome://tracing:
                      scopes as slices per process and thread, numeric point marks as
                      counter tracks, string marks as instant events, summary marks as
                      the args of their scope's slice.
    otlp-json         the OTLP/JSON encoding of the requests a live export sends (the same
                      mapping as `replay`), one request per line.
    """
    try:
        reader.list_files(path)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        summary = _export(path, fmt, output, service_name)
    except reader.MALFORMED as exc:
        raise reader.malformed(path, exc) from exc
    click.echo(f"wrote {output}: {summary}", err=True)
    sys.exit(0)


def _export(path: str, fmt: str, output: str, service_name: str | None) -> str:
    with _atomic_output(output) as out:
        if fmt in ("perfetto", "chrome"):
            from .chrome_trace import write

            stats = write(path, out)
            summary = (
                f"{stats.slices} slices, {stats.counters} counter points, {stats.instants} instant "
                f"events ({stats.nonfinite_skipped} non-finite points left out)"
            )
            if stats.lane_slices:
                summary += f"; {stats.lane_slices} overlapping slices drawn on extra thread tracks"
        else:
            from .otlp_map import iter_parts, to_otlp_json

            requests = spans = root_marks = 0
            for enc, part in iter_parts(path, {"service_name": service_name}):
                root_marks = enc.counters.root_marks
                out.write(json.dumps(to_otlp_json(part.data), allow_nan=False, separators=(",", ":")))
                out.write("\n")
                requests += 1
                spans += part.spans
            summary = f"{requests} requests, {spans} spans"
            if root_marks:
                summary += f' ({root_marks} marks on "root" so far: spool only, as live)'
    return summary
