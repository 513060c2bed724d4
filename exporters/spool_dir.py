"""A spool directory on disk: durable atomic batch files, the byte cap, the byte count.

Shared by every writer of the spool (`SpoolSink` for Cirron records, `SpoolSpanExporter`
for spans from any OpenTelemetry instrumentation) and the OTLP outbox, so they agree on
names, durability, permissions and eviction.

Temporary files: a batch is written as `<name>.tmp` while its writer holds an exclusive
`flock` on it. A process killed mid-write leaves the `.tmp` behind, but the kernel releases
its lock; so at start-up every `.tmp` whose lock can be taken belongs to nobody and is
removed, while one another live process (several may share an output directory) is still
writing stays locked and is left alone. A lock, unlike a pid in the name, cannot be fooled
by pid reuse or by processes in other pid namespaces sharing the directory, and keeps the
`<name>.json.tmp` naming of the spool v1. Temporary files never count toward the byte cap.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Sequence

from cirron_otel.sink import BackgroundThread


def new_batch_id() -> str:
    """A random UUID4 as 32 lowercase hex digits: what `uuid.uuid4().hex` returns, without
    importing `uuid` (which imports `platform`: ~2 ms of every profiled program's start-up)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def new_file_name(suffix: str = ".json") -> tuple[int, str, str]:
    """(created_ns, batch_id, file name) for a batch sealed now; names sort by time."""
    created_ns = time.time_ns()
    batch_id = new_batch_id()
    return created_ns, batch_id, f"{created_ns:020d}-{batch_id}{suffix}"


# file_mode: permissions of created files and directories. Spool and outbox files hold
# exception messages, attributes and whole requests, so by default only the user reads them.
FILE_MODES: dict[str, tuple[int, int]] = {"user": (0o600, 0o700), "group": (0o640, 0o750)}
_default_file_mode = "user"


def set_default_file_mode(mode: str) -> None:
    """The mode of SpoolDirectory objects created without an explicit `file_mode`
    (`profile(file_mode=...)` sets it, so the OTLP outbox follows the spool)."""
    global _default_file_mode
    if mode not in FILE_MODES:
        raise ValueError(f"file_mode must be one of {tuple(FILE_MODES)}, got {mode!r}")
    _default_file_mode = mode


def make_dirs(path: str, dir_mode: int) -> None:
    """Create `path` and missing parents with exactly `dir_mode` (whatever the umask); a
    directory that already exists keeps its mode."""
    missing: list[str] = []
    head = os.path.abspath(path)
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, dir_mode)
        except FileExistsError:
            continue  # another process made it first: its mode is its creator's choice
        os.chmod(directory, dir_mode)  # mkdir's mode is masked by the umask


class StagedFile:
    """A file written under its temporary name, waiting for `SpoolDirectory.commit`."""

    __slots__ = ("fd", "final", "size", "tmp")

    def __init__(self, final: str, tmp: str, fd: int) -> None:
        self.final = final
        self.tmp = tmp
        self.fd = fd
        self.size = 0


class Committer:
    """Commits one group of staged files at a time on a thread of its own, so the writer
    encodes and writes the next file while the disk syncs this one (the spool's worker
    spent about 40% of its time in fsync). `submit` hands a group over; `wait` returns its
    outcome (None, or the exception `commit` raised). Where no thread can be started (at
    interpreter shutdown), `submit` commits on the caller's thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cv = threading.Condition()
        self._job: tuple[SpoolDirectory, Sequence[StagedFile]] | None = None
        self._busy = False
        self._outcome: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def submit(self, directory: SpoolDirectory, staged: Sequence[StagedFile]) -> None:
        """Start committing `staged`; the previous group must have been waited for."""
        with self._cv:
            assert not self._busy, "Committer.submit before wait()"
            self._busy = True
            self._outcome = None
            if self._running():
                self._job = (directory, staged)
                self._cv.notify_all()
                return
        self._finish(_commit_outcome(directory, staged))

    def wait(self) -> BaseException | None:
        """Wait for the group in flight (if any); its outcome, None when it was committed."""
        with self._cv:
            while self._busy:
                self._cv.wait()
            outcome, self._outcome = self._outcome, None
            return outcome

    def _running(self) -> bool:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return True
        thread = BackgroundThread(target=self._run, name=self.name)
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return False
        self._thread, self._pid = thread, os.getpid()
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._job is None:
                    self._cv.wait()
                directory, staged = self._job
                self._job = None
            self._finish(_commit_outcome(directory, staged))

    def _finish(self, outcome: BaseException | None) -> None:
        with self._cv:
            self._outcome = outcome
            self._busy = False
            self._cv.notify_all()


def _commit_outcome(directory: SpoolDirectory, staged: Sequence[StagedFile]) -> BaseException | None:
    try:
        directory.commit(staged)
    except Exception as exc:  # handed to the writer, which keeps the batch for a retry
        return exc
    return None


_CAN_DROP_PAGES = hasattr(os, "posix_fadvise")


def _drop_cached_pages(fd: int) -> None:
    """Drop a file's (clean, just fsynced) pages from the page cache. The spool is written
    once and never read back by this process, so its pages only crowd out the application's
    own files; and freed, they go back to the kernel's free lists, where the next file's
    writes reuse them while still warm. Writing into fresh page-cache pages instead was the
    spool worker's largest cost: on a 2-core VM the kernel's copy into never-touched memory
    took 2.5x the encoder's time, and dropping the pages raised the flat-out spool from ~2.9M
    to ~4.0M records/s (issue 10's note). Advice only: a failure changes nothing."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class SpoolDirectory:
    """`<output_dir>/spool`: writes files atomically and keeps the total under `max_bytes`.

    `subdir` and `suffix` let other durable queues (the OTLP outbox) use the same rules.
    With `drop_cached_pages`, a file's pages leave the page cache once it is on disk (for
    files this process never reads back: see `_drop_cached_pages`).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        max_bytes: int,
        *,
        subdir: str = "spool",
        suffix: str = ".json",
        file_mode: str | None = None,
        drop_cached_pages: bool = False,
    ) -> None:
        self.path = os.path.join(os.fspath(output_dir), subdir)
        self.drop_cached_pages = drop_cached_pages and _CAN_DROP_PAGES
        self.suffix = suffix
        self.max_bytes = max_bytes
        self.file_mode = _default_file_mode if file_mode is None else file_mode
        if self.file_mode not in FILE_MODES:
            raise ValueError(f"file_mode must be one of {tuple(FILE_MODES)}, got {self.file_mode!r}")
        self._file_perm, self._dir_perm = FILE_MODES[self.file_mode]
        self.stale_tmp_removed = 0
        self.last_cleanup_error: str | None = None
        self._disk_bytes: int | None = None
        self._ready = False
        self._lock = threading.Lock()
        self.remove_stale_tmp()

    def remove_stale_tmp(self) -> int:
        """Delete `.tmp` files no live process is writing (see the module docstring).
        Never raises: a failure is kept in `last_cleanup_error`. Returns how many."""
        removed = 0
        try:
            entries = [e.name for e in os.scandir(self.path) if e.name.endswith(self.suffix + ".tmp")]
        except (FileNotFoundError, NotADirectoryError):
            return 0  # nothing written here yet (a write will report why the path is unusable)
        except OSError as exc:
            self.last_cleanup_error = f"{type(exc).__name__}: {exc}"
            return 0
        for name in entries:
            path = os.path.join(self.path, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # renamed or removed meanwhile
            except OSError as exc:
                self.last_cleanup_error = f"{type(exc).__name__}: {exc}"
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # a live writer holds it
            try:
                # Unlink only if the name still is this inode (its writer may have renamed it
                # to the final name before we got the lock). A writer that opened it just
                # before us notices the unlink once it gets the lock, and starts over.
                if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.last_cleanup_error = f"{type(exc).__name__}: {exc}"
            finally:
                os.close(fd)  # releases the lock
        self.stale_tmp_removed += removed
        return removed

    def write(self, name: str, fill: Callable[[int], int]) -> int:
        """Create `name` durably: `fill(fd)` writes the content into `<name>.tmp` and returns its
        size; then fsync, rename over `name`, fsync the directory. Returns the size; raises
        OSError (and leaves no temporary file) on failure."""
        return self.write_many([(name, fill)])[0]

    def write_many(self, files: Sequence[tuple[str, Callable[[int], int]]]) -> list[int]:
        """Create several files durably with one group commit: all written, then each fsynced,
        renamed, and the directory fsynced once (one directory fsync for the group instead of
        one per file). All or nothing: on failure none of them is left, and OSError is raised.
        `_lock` guards only the byte count and the directory check, never a write or an
        fsync, so the sender deleting files never waits for the disk."""
        staged: list[StagedFile] = []
        try:
            for name, fill in files:
                staged.append(self.stage(name, fill))
        except BaseException:
            self.discard(staged)
            raise
        self.commit(staged)
        return [f.size for f in staged]

    def stage(self, name: str, fill: Callable[[int], int]) -> StagedFile:
        """The first half of a durable write: `fill(fd)` writes the content into `<name>.tmp`
        (created locked). Nothing is visible under `name` until `commit`; `discard` undoes it.
        Raises OSError (and leaves no temporary file) on failure."""
        with self._lock:
            if not self._ready:
                make_dirs(self.path, self._dir_perm)
                self._ready = True
        final = os.path.join(self.path, name)
        tmp = final + ".tmp"
        try:
            fd = self._open_locked(tmp)
        except OSError:
            with self._lock:
                self._ready = False  # the directory may have gone: look again next time
            raise
        staged = StagedFile(final, tmp, fd)
        try:
            staged.size = fill(fd)
        except BaseException:
            self.discard([staged])
            raise
        return staged

    def commit(self, staged: Sequence[StagedFile]) -> None:
        """The second half: fsync each staged file, rename it over its name, fsync the
        directory once. All or nothing: on failure none of them is left, and OSError is raised.
        Safe on another thread than `stage` (the spool overlaps one file's commit with the
        encoding of the next)."""
        renamed: list[str] = []
        try:
            for f in staged:
                os.fsync(f.fd)
                if self.drop_cached_pages:
                    _drop_cached_pages(f.fd)
            for f in staged:
                os.replace(f.tmp, f.final)
                renamed.append(f.final)
        except BaseException:
            # Unlink while still holding each flock, so a cleaner never sees it unlocked.
            for f in staged:
                _unlink_quietly(f.final if f.final in renamed else f.tmp)
                os.close(f.fd)
            raise
        for f in staged:
            os.close(f.fd)  # the flocks go with them, after the renames
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        total = sum(f.size for f in staged)
        with self._lock:
            if self._disk_bytes is None:
                self._disk_bytes = self.scan()[1]
            else:
                self._disk_bytes += total

    def discard(self, staged: Sequence[StagedFile]) -> None:
        """Undo `stage`: remove the temporary files (under their locks) and close them."""
        for f in staged:
            _unlink_quietly(f.tmp)
            os.close(f.fd)

    def _open_locked(self, tmp: str) -> int:
        """Create `tmp` with this directory's file mode and hold an exclusive flock on it."""
        for _ in range(100):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self._file_perm)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink == 0:
                    # A cleaner unlinked it between our open and our lock: make a new one.
                    os.close(fd)
                    continue
                os.fchmod(fd, self._file_perm)  # os.open's mode is masked by the umask
            except BaseException:
                os.close(fd)
                raise
            return fd
        raise OSError(f"could not create {tmp}: removed by concurrent cleaners 100 times")

    def write_bytes(self, name: str, data: bytes) -> int:
        return self.write(name, bytes_filler(data))

    def write_bytes_many(self, files: Sequence[tuple[str, bytes]]) -> list[int]:
        """`write_many` for contents already in memory (one group commit)."""
        return self.write_many([(name, bytes_filler(data)) for name, data in files])

    @property
    def disk_bytes(self) -> int:
        """Bytes of the files written here, as counted so far (0 before the first write)."""
        return self._disk_bytes or 0

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
        """Sealed batches oldest first, and the bytes they hold. `.tmp` files are neither:
        they are being written (and counted once sealed) or stale (and removed at start-up);
        counting them let a killed run's leftovers evict new batches."""
        files: list[tuple[str, int]] = []
        total = 0
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return files, 0
        for entry in entries:
            name = entry.name
            if not name.endswith(self.suffix):
                continue
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            total += size
            files.append((name, size))
        files.sort()
        return files, total

    def enforce_cap(self, keep: str, on_error: Callable[[OSError], None]) -> int:
        """Delete the oldest files (never `keep`) until under the cap; returns how many (the
        caller counts them: its sink's stats are their one owner)."""
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
            return evicted


def bytes_filler(data: bytes) -> Callable[[int], int]:
    """A `fill` for `stage`/`write` that writes `data` whole."""

    def fill(fd: int) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return len(data)

    return fill


def _size_or_zero(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
