"""The Cirron spool v1 writer: one JSON batch per file, written so a reader never sees half.

Layout: `<output_dir>/spool/<created_ns:020d>-<batch_id>.json`. Each file is written to
`<name>.json.tmp`, fsynced, renamed with `os.replace`, and the directory is fsynced, so a
batch survives power loss once its name appears. The JSON is streamed into the file by the
native encoder (`_native.write_spool`) without the GIL.

Failures (missing or read-only directory, disk full) never reach the application: the
batch stays queued under its name and is written on a later attempt, byte-identical (the
encoding is deterministic, so mark ids never change); past `retry_records` queued records
the oldest file's worth is dropped and counted, with the disk's error as the reason. Past
`max_bytes` on disk the oldest files are deleted and counted (`spool_drop_count`).

While writes fail the spool stops applying backpressure (a failing disk must not slow the
program down; the retry bound applies instead) and tries the oldest file again on each
delivery, each flush, and every `flush_interval` when idle. When a write fails
for lack of space and the batch is larger than the space left, the batch is split into
smaller files (same records, same ids), so whatever space comes back is used at once.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence

from cirron_otel import _native
from cirron_otel._version import __version__
from cirron_otel.sink import Sink

from .spool_dir import Committer, SpoolDirectory, StagedFile, bytes_filler, new_batch_id, new_file_name

SCHEMA_VERSION = 1
# Splitting a batch after ENOSPC: no piece smaller than this (many tiny files cost more than
# they save), and no split while less than twice this is free (the disk is simply full).
MIN_PIECE_BYTES = 16 * 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class _PendingFile:
    """One spool file waiting to be written (a plain class: importing `dataclasses` costs
    ~7 ms of every profiled program's start-up)."""

    __slots__ = ("batch_id", "batches", "created_ns", "data", "marks", "snapshot_count", "snapshots", "spans")

    def __init__(
        self,
        *,
        created_ns: int,
        batch_id: str,
        batches: list[_native.Batch],
        marks: int,
        spans: int,
        data: bytes | None = None,
        snapshots: bytes = b"",
        snapshot_count: int = 0,
    ) -> None:
        self.created_ns = created_ns
        self.batch_id = batch_id
        self.batches = batches
        self.marks = marks
        self.spans = spans
        self.data = data  # the encoded file, once it was split out of a larger one
        self.snapshots = snapshots  # its snapshot records (JSON, comma-joined), unless in `data`
        self.snapshot_count = snapshot_count

    @property
    def name(self) -> str:
        return f"{self.created_ns:020d}-{self.batch_id}.json"

    @property
    def records(self) -> int:
        return self.marks + self.spans

    @property
    def weight(self) -> int:
        """What the file counts for against `retry_records`: its records and snapshots."""
        return self.marks + self.spans + self.snapshot_count


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
    takes_snapshots = True

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        max_bytes: int = 1_000_000_000,
        max_records_per_file: int = 100_000,
        retry_records: int = 2_000_000,
        file_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.directory = SpoolDirectory(output_dir, max_bytes, file_mode=file_mode, drop_cached_pages=True)
        self.spool_dir = self.directory.path
        self.max_records_per_file = max_records_per_file
        self.retry_records = retry_records
        self.dropped_files = 0
        self._queue: deque[_PendingFile] = deque()
        self._queued_records = 0
        self._failing = False
        self._last_write_error = ""
        # The file whose commit (fsync, rename) runs while the next one is encoded: counted
        # in _queued_records and pending until it is durable, and back at the head of the
        # queue if its commit fails.
        self._inflight: tuple[_PendingFile, int] | None = None  # (file, bytes)
        self._committer = Committer("cirron-otel-spool-commit")
        self._settled = threading.Event()
        self._settled.set()
        self.stats.set(
            files_written=0,
            bytes_written=0,
            marks_written=0,
            spans_written=0,
            evicted_files=0,
            split_files=0,
            snapshots_written=0,
            last_drop_reason=None,
            spool_dir=self.spool_dir,
            stale_tmp_removed=self.directory.stale_tmp_removed,
        )
        if self.directory.last_cleanup_error:
            self.stats.error("stale .tmp cleanup failed", self.directory.last_cleanup_error)

    @property  # type: ignore[override]
    def backpressure(self) -> bool:
        """Normally the spool slows producers rather than lose data; while the disk fails,
        waiting would not help, so producers run free and the retry bound applies."""
        return not self._failing

    # -- Sink interface ------------------------------------------------------------------

    def export(self, batches: Sequence[_native.Batch]) -> None:
        # The snapshots captured since the last export go in this export's last file (one
        # of their own when it has no records), as cirron-sdk puts them in its next batch.
        snapshots = [s.json for s in self.take_snapshots()]
        files: list[_PendingFile] = []
        for group in group_batches(batches, self.max_records_per_file):
            created_ns, batch_id, _ = new_file_name()
            files.append(
                _PendingFile(
                    created_ns=created_ns,
                    batch_id=batch_id,
                    batches=group,
                    marks=sum(b.mark_count for b in group),
                    spans=sum(b.span_count for b in group),
                )
            )
        if snapshots:
            if not files:
                created_ns, batch_id, _ = new_file_name()
                files.append(
                    _PendingFile(created_ns=created_ns, batch_id=batch_id, batches=[], marks=0, spans=0)
                )
            files[-1].snapshots, files[-1].snapshot_count = b",".join(snapshots), len(snapshots)
        for pending in files:
            self._queue.append(pending)
            self._queued_records += pending.weight
            self.stats.add(pending=pending.records)
        self._trim_queue()
        self.retry()

    def retry(self) -> None:
        """Write the queue in order. Each file is committed (fsync, rename, directory fsync)
        on the committer's thread while the next one is encoded and written; the last one's
        commit is left in flight for `settle`."""
        while self._queue:
            item = self._queue[0]
            try:
                staged = self._stage(item)
            except OSError as exc:
                if not self.settle():
                    return  # the file before it failed: it goes first, on the next attempt
                if exc.errno in _NO_SPACE and self._split_head(item):
                    continue  # try the first, smaller piece now
                self._failed(exc)
                return
            self._queue.popleft()
            failed = self._collect()
            if failed is not None:
                self.directory.discard([staged])
                self._queue.appendleft(item)
                self._requeue(*failed)
                return
            self._inflight = (item, staged.size)
            self._settled.clear()
            self._committer.submit(self.directory, [staged])

    def settle(self) -> bool:
        """Finish the commit `retry` left in flight; False if it failed (the file is queued
        again, first). The sink's worker calls it whenever its queue runs empty."""
        failed = self._collect()
        if failed is not None:
            self._requeue(*failed)
            return False
        return True

    def wait_idle(self, timeout: float) -> bool:
        """After a flush: wait until the last file handed over is durable."""
        return self._settled.wait(timeout)

    def shutdown(self, timeout: float) -> None:
        self.retry()
        self.settle()

    def _stage(self, item: _PendingFile) -> StagedFile:
        data = item.data
        if data is not None:
            return self.directory.stage(item.name, bytes_filler(data))
        return self.directory.stage(
            item.name,
            lambda fd: _native.write_spool(
                fd, item.batches, item.batch_id, item.created_ns, __version__, snapshots=item.snapshots
            ),
        )

    def _collect(self) -> tuple[_PendingFile, BaseException] | None:
        """Wait for the file in flight: count it when durable, else hand it back with the error."""
        if self._inflight is None:
            return None
        item, size = self._inflight
        outcome = self._committer.wait()
        self._inflight = None
        if outcome is not None:
            return item, outcome
        self._failing = False
        self._queued_records -= item.weight
        self.stats.add(
            pending=-item.records,
            exported=item.records,
            files_written=1,
            bytes_written=size,
            marks_written=item.marks,
            spans_written=item.spans,
            snapshots_written=item.snapshot_count,
        )
        evicted = self.directory.enforce_cap(item.name, lambda e: self.stats.error("eviction failed", e))
        if evicted:
            self.stats.add(evicted_files=evicted)
        self._settled.set()
        return None

    def _requeue(self, item: _PendingFile, exc: BaseException) -> None:
        """A commit failed: the file is written again, first, on the next attempt."""
        self._queue.appendleft(item)
        self._settled.set()
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            self._split_head(item)  # delayed allocation: the disk may say so only at fsync
        self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.stats.add(failed=1)
        self._failing = True
        self._last_write_error = f"{type(exc).__name__}: {exc}"
        self.stats.error("write failed", exc)

    def _split_head(self, item: _PendingFile) -> bool:
        """The head file did not fit: if it is larger than the space left (and some is left),
        replace it by pieces that fit. Same records and ids; each piece is a valid batch
        of its own (new batch id, created_ns + i to keep the order)."""
        if item.weight < 2:
            return False
        try:
            st = os.statvfs(self.directory.path)
        except OSError:
            return False
        free = st.f_bavail * st.f_frsize
        if free < 2 * MIN_PIECE_BYTES:
            return False  # the disk is full: wait for space, then decide
        data = item.data
        if data is None:
            data = _native.encode_spool(
                item.batches, item.batch_id, item.created_ns, __version__, snapshots=item.snapshots
            )
        if len(data) <= free:
            item.data = data  # it should fit now: keep the encoding, retry as is later
            return False
        import json  # only here, after ENOSPC: not on every profiled program's start-up

        doc = json.loads(data)
        records = [(kind, r) for kind in ("spans", "marks", "snapshots") for r in doc[kind]]
        per_piece = max(1, len(records) * (free // 2) // len(data))
        pieces: list[_PendingFile] = []
        for i, start in enumerate(range(0, len(records), per_piece)):
            chunk = records[start : start + per_piece]
            piece_doc = {
                **doc,
                "batch_id": new_batch_id(),
                "created_ns": item.created_ns + i,
                "spans": [r for kind, r in chunk if kind == "spans"],
                "marks": [r for kind, r in chunk if kind == "marks"],
                "snapshots": [r for kind, r in chunk if kind == "snapshots"],
            }
            pieces.append(
                _PendingFile(
                    created_ns=piece_doc["created_ns"],
                    batch_id=piece_doc["batch_id"],
                    batches=[],
                    marks=len(piece_doc["marks"]),
                    spans=len(piece_doc["spans"]),
                    snapshot_count=len(piece_doc["snapshots"]),
                    # ASCII escapes: lone surrogates in strings survive the round trip.
                    data=json.dumps(piece_doc, allow_nan=False, separators=(",", ":")).encode("ascii"),
                )
            )
        self._queue.popleft()
        self._queue.extendleft(reversed(pieces))
        self.stats.add(split_files=len(pieces))
        return True

    # -- health --------------------------------------------------------------------------

    @property
    def drop_count(self) -> int:
        """Batch files lost: evicted by the byte cap, or dropped while the disk failed."""
        return self.stats.get("evicted_files") + self.dropped_files

    def disk_bytes(self) -> int:
        return self.directory.scan()[1]

    # -- internals -----------------------------------------------------------------------

    def _drop(self, records: int, reason: str) -> None:
        self.stats.add(dropped=records)
        self.dropped_files += 1  # only this sink's worker thread counts it
        reason = f"{records} records: {reason} (last write error: {self._last_write_error})"
        # Kept apart from last_error, which the next failing write overwrites.
        self.stats.set(last_drop_reason=reason)
        self.stats.error("batch dropped", reason)

    def _trim_queue(self) -> None:
        # Keep the newest data when the disk has been failing for long: drop oldest first.
        while self._queued_records > self.retry_records and len(self._queue) > 1:
            item = self._queue.popleft()
            self._queued_records -= item.weight
            self.stats.add(pending=-item.records, snapshots_dropped=item.snapshot_count)
            self._drop(item.records, f"over {self.retry_records} records waiting for the disk")
