"""The Cirron spool v1 writer: one JSON batch per file, written so a reader never sees half.

Layout: `<output_dir>/spool/<created_ns:020d>-<batch_id>.json`. Each file is written to
`<name>.json.tmp`, fsynced, renamed with `os.replace`, and the directory is fsynced, so a
batch survives power loss once its name appears. The JSON is streamed into the file by the
native encoder (`_native.write_spool`) without the GIL.

Failures (missing or read-only directory, disk full) never reach the application: the
batch stays queued under its name and is written on a later attempt, byte-identical (the
encoding is deterministic, so mark ids never change); past `retry_records` queued records
the oldest file's worth is dropped and counted. Past `max_bytes` on disk the oldest files
are deleted and counted (`spool_drop_count`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cirron_otel import _native
from cirron_otel._version import __version__

from .base import Sink
from .spool_dir import SpoolDirectory, new_file_name

SCHEMA_VERSION = 1


@dataclass
class _PendingFile:
    created_ns: int
    batch_id: str
    batches: list[_native.Batch]
    marks: int
    spans: int

    @property
    def name(self) -> str:
        return f"{self.created_ns:020d}-{self.batch_id}.json"

    @property
    def records(self) -> int:
        return self.marks + self.spans


def group_batches(batches: Sequence[_native.Batch], max_records: int) -> Iterator[list[_native.Batch]]:
    """Split batches into consecutive groups of at most `max_records` records (one file each)."""
    group: list[_native.Batch] = []
    count = 0
    for batch in batches:
        n = len(batch)
        if group and count + n > max_records:
            yield group
            group, count = [], 0
        group.append(batch)
        count += n
    if group:
        yield group


class SpoolSink(Sink):
    """Writes collected batches into the Cirron spool v1."""

    name = "spool"
    backpressure = True

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        max_bytes: int = 1_000_000_000,
        max_records_per_file: int = 100_000,
        retry_records: int = 2_000_000,
    ) -> None:
        super().__init__()
        self.directory = SpoolDirectory(output_dir, max_bytes)
        self.spool_dir = self.directory.path
        self.max_records_per_file = max_records_per_file
        self.retry_records = retry_records
        self.dropped_files = 0
        self._queue: deque[_PendingFile] = deque()
        self._queued_records = 0
        self.stats.extra.update(files_written=0, bytes_written=0, marks_written=0, spans_written=0,
                                evicted_files=0, spool_dir=self.spool_dir)

    # -- Sink interface ------------------------------------------------------------------

    def export(self, batches: Sequence[_native.Batch]) -> None:
        for group in group_batches(batches, self.max_records_per_file):
            created_ns, batch_id, _ = new_file_name()
            pending = _PendingFile(
                created_ns=created_ns,
                batch_id=batch_id,
                batches=group,
                marks=sum(b.mark_count for b in group),
                spans=sum(b.span_count for b in group),
            )
            self._queue.append(pending)
            self._queued_records += pending.records
            with self.stats.lock:
                self.stats.pending += pending.records
        self._trim_queue()
        self.retry()

    def retry(self) -> None:
        while self._queue:
            item = self._queue[0]
            try:
                size = self.directory.write(
                    item.name,
                    lambda fd, item=item: _native.write_spool(
                        fd, item.batches, item.batch_id, item.created_ns, __version__
                    ),
                )
            except OSError as exc:
                with self.stats.lock:
                    self.stats.failed += 1
                self.stats.error("write failed", exc)
                return
            self._queue.popleft()
            self._queued_records -= item.records
            with self.stats.lock:
                self.stats.pending -= item.records
                self.stats.exported += item.records
                extra = self.stats.extra
                extra["files_written"] += 1
                extra["bytes_written"] += size
                extra["marks_written"] += item.marks
                extra["spans_written"] += item.spans
            evicted = self.directory.enforce_cap(item.name, lambda e: self.stats.error("eviction failed", e))
            if evicted:
                with self.stats.lock:
                    self.stats.extra["evicted_files"] += evicted

    def shutdown(self, timeout: float) -> None:
        self.retry()

    # -- health --------------------------------------------------------------------------

    @property
    def drop_count(self) -> int:
        """Batch files lost: evicted by the byte cap, or dropped while the disk failed."""
        return self.directory.evicted_files + self.dropped_files

    def disk_bytes(self) -> int:
        return self.directory.scan()[1]

    # -- internals -----------------------------------------------------------------------

    def _drop(self, records: int, reason: str) -> None:
        with self.stats.lock:
            self.stats.dropped += records
        self.dropped_files += 1
        self.stats.error("batch dropped", reason)

    def _trim_queue(self) -> None:
        # Keep the newest data when the disk has been failing for long: drop oldest first.
        while self._queued_records > self.retry_records and len(self._queue) > 1:
            item = self._queue.popleft()
            self._queued_records -= item.records
            with self.stats.lock:
                self.stats.pending -= item.records
            self._drop(item.records, f"over {self.retry_records} records waiting for the disk")
