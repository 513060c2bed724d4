"""A spool directory on disk: durable atomic batch files, the byte cap, the byte count.

Shared by every writer of the spool (`SpoolSink` for Cirron records, `SpoolSpanExporter`
for spans from any OpenTelemetry instrumentation), so they agree on names, durability and
eviction.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable


def new_file_name(suffix: str = ".json") -> tuple[int, str, str]:
    """(created_ns, batch_id, file name) for a batch sealed now; names sort by time."""
    created_ns = time.time_ns()
    batch_id = uuid.uuid4().hex
    return created_ns, batch_id, f"{created_ns:020d}-{batch_id}{suffix}"


class SpoolDirectory:
    """`<output_dir>/spool`: writes files atomically and keeps the total under `max_bytes`.

    `subdir` and `suffix` let other durable queues (the OTLP outbox) use the same rules.
    """

    def __init__(
        self, output_dir: str | os.PathLike[str], max_bytes: int, *, subdir: str = "spool",
        suffix: str = ".json",
    ) -> None:
        self.path = os.path.join(os.fspath(output_dir), subdir)
        self.suffix = suffix
        self.max_bytes = max_bytes
        self.evicted_files = 0
        self._disk_bytes: int | None = None
        self._ready = False
        self._lock = threading.Lock()

    def write(self, name: str, fill: Callable[[int], int]) -> int:
        """Create `name` durably: `fill(fd)` writes the content into `<name>.tmp` and returns its
        size; then fsync, rename over `name`, fsync the directory. Returns the size; raises
        OSError (and leaves no temporary file) on failure."""
        with self._lock:
            if not self._ready:
                os.makedirs(self.path, exist_ok=True)
                self._ready = True
            final = os.path.join(self.path, name)
            tmp = final + ".tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError:
                self._ready = False  # the directory may have gone: look again next time
                raise
            try:
                size = fill(fd)
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
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            if self._disk_bytes is None:
                self._disk_bytes = self.scan()[1]
            else:
                self._disk_bytes += size
            return size

    def write_bytes(self, name: str, data: bytes) -> int:
        def fill(fd: int) -> int:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            return len(data)

        return self.write(name, fill)

    def over_cap(self) -> bool:
        return self._disk_bytes is not None and self._disk_bytes > self.max_bytes

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def remove(self, name: str) -> None:
        with self._lock:
            size = _size_or_zero(os.path.join(self.path, name))
            os.unlink(os.path.join(self.path, name))
            if self._disk_bytes is not None:
                self._disk_bytes -= size

    def scan(self) -> tuple[list[tuple[str, int]], int]:
        """Sealed batches oldest first, and the bytes held by sealed and unsealed files."""
        files: list[tuple[str, int]] = []
        total = 0
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return files, 0
        for entry in entries:
            name = entry.name
            sealed = name.endswith(self.suffix)
            if not (sealed or name.endswith(self.suffix + ".tmp")):
                continue
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            total += size
            if sealed:
                files.append((name, size))
        files.sort()
        return files, total

    def enforce_cap(self, keep: str, on_error: Callable[[OSError], None]) -> int:
        """Delete the oldest files (never `keep`) until under the cap; returns how many."""
        with self._lock:
            if self._disk_bytes is None or self._disk_bytes <= self.max_bytes:
                return 0
            files, total = self.scan()
            evicted = 0
            for name, size in files:
                if total <= self.max_bytes:
                    break
                if name == keep:
                    continue
                try:
                    os.unlink(os.path.join(self.path, name))
                except FileNotFoundError:
                    total -= size
                    continue
                except OSError as exc:
                    on_error(exc)
                    break
                total -= size
                evicted += 1
            self._disk_bytes = total
            self.evicted_files += evicted
            return evicted


def _size_or_zero(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
