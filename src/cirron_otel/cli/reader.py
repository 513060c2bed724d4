"""Reading a spool one batch file at a time, shared by every command.

A spool can be far larger than memory (10 GB and more), so nothing here holds more than one
batch file (at most 100,000 records) at once: callers aggregate as the files stream by.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cirron_otel.exporters.schema import loads_strict
from cirron_otel.exporters.spool_dir import SpoolDirectory

SUFFIX = ".json"


@dataclass(frozen=True)
class SpoolFile:
    """One sealed batch file: its path, name and size on disk."""

    path: str
    name: str
    size: int


@dataclass
class Batch:
    """One batch file parsed; `doc` is None when it could not be read (see `error`)."""

    file: SpoolFile
    doc: dict[str, Any] | None
    error: str | None = None

    @property
    def spans(self) -> list[dict[str, Any]]:
        return self.doc.get("spans") or [] if isinstance(self.doc, dict) else []

    @property
    def marks(self) -> list[dict[str, Any]]:
        return self.doc.get("marks") or [] if isinstance(self.doc, dict) else []

    @property
    def snapshots(self) -> list[dict[str, Any]]:
        return self.doc.get("snapshots") or [] if isinstance(self.doc, dict) else []


def spool_dir(path: str | os.PathLike[str]) -> str:
    """The directory holding the batch files: PATH itself, or `PATH/spool` when PATH is an
    output directory (what `profile(output_dir=...)` was given)."""
    path = os.fspath(path)
    inner = os.path.join(path, "spool")
    return inner if os.path.isdir(inner) else path


def list_files(path: str | os.PathLike[str]) -> list[SpoolFile]:
    """Sealed batch files, oldest first (names sort by time). PATH may be one batch file, a
    spool directory or an output directory. `.json.tmp` files are being written: skipped."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [SpoolFile(path, os.path.basename(path), os.path.getsize(path))]
    directory = spool_dir(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no spool at {path}")
    # SpoolDirectory.scan is the writer's own listing (same suffix and ordering rules); called
    # unbound on a stand-in because constructing a SpoolDirectory removes stale .tmp files,
    # and a reader must change nothing.
    stand_in = types.SimpleNamespace(path=directory, suffix=SUFFIX)
    files, _ = SpoolDirectory.scan(stand_in)  # type: ignore[arg-type]
    return [SpoolFile(os.path.join(directory, name), name, size) for name, size in files]


def read_batch(file: SpoolFile) -> Batch:
    """Parse one file strictly (NaN / Infinity tokens are errors, as for the platform)."""
    try:
        with open(file.path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return Batch(file, None, "file vanished while reading (evicted by the byte cap?)")
    except OSError as exc:
        return Batch(file, None, f"unreadable: {exc}")
    try:
        doc = loads_strict(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return Batch(file, None, f"not strict JSON: {exc}")
    if not isinstance(doc, dict):
        return Batch(file, None, f"not a JSON object but {type(doc).__name__}")
    return Batch(file, doc)


def iter_batches(path: str | os.PathLike[str], files: list[SpoolFile] | None = None) -> Iterator[Batch]:
    """Every batch of the spool, oldest first, one parsed file at a time."""
    for file in list_files(path) if files is None else files:
        yield read_batch(file)


MALFORMED = (KeyError, TypeError, ValueError, AttributeError)


def malformed(path: str, exc: BaseException) -> Exception:
    """The error a command raises when a record is not what the format says (click prints it
    and exits 1): `validate` is the command that says where and why."""
    import click

    return click.ClickException(
        f"{path}: a record does not follow the spool format ({type(exc).__name__}: "
        f"{exc}); `cirron-otel validate {path}` lists the problems"
    )


def warn_unreadable(batch: Batch) -> None:
    """Export and replay skip a file they cannot read, saying so (validate reports it)."""
    import click

    click.echo(f"{batch.file.name}: skipped: {batch.error}", err=True)


def mark_value(mark: dict[str, Any]) -> Any:
    """The mark's value with non-finite floats restored (the spool writes them as null plus
    `value_nonfinite`, because strict JSON has no NaN / Infinity)."""
    nonfinite = mark.get("value_nonfinite")
    if nonfinite is not None and mark.get("value") is None:
        return float(nonfinite)  # "nan", "inf", "-inf" all parse
    return mark.get("value")


def fmt_ns(ns: int) -> str:
    """A wall-clock timestamp in ns as UTC ISO 8601 with microseconds."""
    import datetime

    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def fmt_duration(ns: int) -> str:
    seconds = ns / 1e9
    if seconds < 1e-3:
        return f"{ns / 1e3:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{seconds % 60:04.1f}s"


def fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
