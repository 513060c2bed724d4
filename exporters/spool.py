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
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cirron_otel import _native
from cirron_otel._version import __version__

from .base import Sink

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
        self.spool_dir = os.path.join(os.fspath(output_dir), "spool")
        self.max_bytes = max_bytes
        self.max_records_per_file = max_records_per_file
        self.retry_records = retry_records
        self.evicted_files = 0
        self.dropped_files = 0
        self._queue: deque[_PendingFile] = deque()
        self._queued_records = 0
        self._disk_bytes: int | None = None
        self._dir_ready = False
        extra = self.stats.extra
        extra.update(files_written=0, bytes_written=0, marks_written=0, spans_written=0,
                     evicted_files=0, spool_dir=self.spool_dir)

    # -- Sink interface ------------------------------------------------------------------

    def export(self, batches: Sequence[_native.Batch]) -> None:
        for group in group_batches(batches, self.max_records_per_file):
            pending = _PendingFile(
                created_ns=time.time_ns(),
                batch_id=uuid.uuid4().hex,
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
                size = self._write(item)
            except OSError as exc:
                with self.stats.lock:
                    self.stats.failed += 1
                self.stats.error("write failed", exc)
                self._dir_ready = False
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
            self._enforce_cap(keep=item.name)

    def shutdown(self, timeout: float) -> None:
        self.retry()

    # -- health --------------------------------------------------------------------------

    @property
    def drop_count(self) -> int:
        """Batch files lost: evicted by the byte cap, or dropped while the disk failed."""
        return self.evicted_files + self.dropped_files

    def disk_bytes(self) -> int:
        return self._scan()[1]

    # -- internals -----------------------------------------------------------------------

    def _drop(self, records: int, exc: BaseException | str) -> None:
        with self.stats.lock:
            self.stats.dropped += records
        self.dropped_files += 1
        self.stats.error("batch dropped", exc)

    def _trim_queue(self) -> None:
        # Keep the newest data when the disk has been failing for long: drop oldest first.
        while self._queued_records > self.retry_records and len(self._queue) > 1:
            item = self._queue.popleft()
            self._queued_records -= item.records
            with self.stats.lock:
                self.stats.pending -= item.records
            self._drop(item.records, f"over {self.retry_records} records waiting for the disk")

    def _ensure_dir(self) -> None:
        if not self._dir_ready:
            os.makedirs(self.spool_dir, exist_ok=True)
            self._dir_ready = True

    def _write(self, item: _PendingFile) -> int:
        self._ensure_dir()
        final = os.path.join(self.spool_dir, item.name)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            size = _native.write_spool(fd, item.batches, item.batch_id, item.created_ns, __version__)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        try:
            os.replace(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        dfd = os.open(self.spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        if self._disk_bytes is None:
            self._disk_bytes = self._scan()[1]
        else:
            self._disk_bytes += size
        return size

    def _scan(self) -> tuple[list[tuple[str, int]], int]:
        """Sealed batches oldest first, and the bytes held by sealed and unsealed files."""
        files: list[tuple[str, int]] = []
        total = 0
        try:
            entries = list(os.scandir(self.spool_dir))
        except OSError:
            return files, 0
        for entry in entries:
            name = entry.name
            if not (name.endswith(".json") or name.endswith(".json.tmp")):
                continue
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            total += size
            if name.endswith(".json"):
                files.append((name, size))
        files.sort()
        return files, total

    def _enforce_cap(self, keep: str) -> None:
        if self._disk_bytes is None or self._disk_bytes <= self.max_bytes:
            return
        files, total = self._scan()
        for name, size in files:
            if total <= self.max_bytes:
                break
            if name == keep:
                continue
            try:
                os.unlink(os.path.join(self.spool_dir, name))
            except FileNotFoundError:
                total -= size
                continue
            except OSError as exc:
                self.stats.error("eviction failed", exc)
                break
            total -= size
            self.evicted_files += 1
            with self.stats.lock:
                self.stats.extra["evicted_files"] += 1
        self._disk_bytes = total


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
