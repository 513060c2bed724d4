"""The spool commits one file (fsync, rename, directory fsync) while it encodes the next, and
gives up nothing for it: a flush returns only once every file is durable, and a commit that
fails is written again, first, with nothing lost or written twice."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest
from cirron_otel.exporters.spool import SpoolSink

import cirron_otel as ci
from cirron_otel import _native
from tests.support.helpers import drained_batch

# a failing commit warns once (CirronWarning); asserted through the counters
pytestmark = pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning")

SCOPES = 40  # 120 records: 4 files of 30


def _batches() -> list[_native.Batch]:
    """Four batches of 30 records: with max_records_per_file=30, one file each."""
    return [drained_batch(SCOPES // 4) for _ in range(4)]


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _records(spool_dir: str) -> list[str]:
    ids: list[str] = []
    for name in sorted(os.listdir(spool_dir)):
        assert name.endswith(".json"), f"left behind: {name}"
        with open(os.path.join(spool_dir, name)) as f:
            doc = json.load(f)
        ids += [r["id"] for r in doc["spans"]] + [r["id"] for r in doc["marks"]]
    return ids


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_the_next_file_is_encoded_while_the_previous_one_syncs(tmp_path, monkeypatch):
    batches = _batches()
    sink = SpoolSink(tmp_path, max_records_per_file=30)
    events: list[tuple[str, float]] = []
    real_fsync, real_write = os.fsync, _native.write_spool

    def slow_fsync(fd: int) -> None:
        if _fd_path(fd).endswith(".json.tmp"):
            events.append(("sync-start", time.monotonic()))
            time.sleep(0.2)  # a slow disk
            real_fsync(fd)
            events.append(("sync-end", time.monotonic()))
        else:
            real_fsync(fd)

    def write_spool(*args: object, **kwargs: object) -> int:
        events.append(("encode", time.monotonic()))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    monkeypatch.setattr(_native, "write_spool", write_spool)
    sink.export(batches)
    sink.settle()
    monkeypatch.undo()

    kinds = [k for k, _ in events]
    assert kinds.count("encode") == 4 and kinds.count("sync-start") == 4
    # every file after the first was encoded before the one before it had finished syncing
    encoded = [t for k, t in events if k == "encode"]
    synced = [t for k, t in events if k == "sync-end"]
    assert all(encoded[i] < synced[i - 1] for i in range(1, 4)), kinds
    ids = _records(sink.spool_dir)
    assert len(ids) == len(set(ids)) == 3 * SCOPES
    stats = sink.stats.as_dict()
    assert stats["exported"] == 3 * SCOPES and stats["pending"] == 0 and stats["files_written"] == 4


def test_a_commit_that_fails_is_written_again_first_nothing_lost_or_twice(tmp_path, monkeypatch):
    batches = _batches()
    sink = SpoolSink(tmp_path, max_records_per_file=30)
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync_failing_once(fd: int) -> None:
        if _fd_path(fd).endswith(".json.tmp"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.EIO, "Input/output error (injected)")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_failing_once)
    sink.export(batches)  # the second file's commit fails: found when the third is written
    sink.settle()
    stats = sink.stats.as_dict()
    assert stats["failed"] == 1 and "Input/output error" in (stats["last_error"] or "")
    assert stats["exported"] == 30 and stats["pending"] == 90  # the first file only
    assert not [n for n in os.listdir(sink.spool_dir) if n.endswith(".tmp")]
    sink.retry()  # the worker's next attempt
    sink.settle()
    monkeypatch.undo()
    ids = _records(sink.spool_dir)
    assert len(ids) == len(set(ids)) == 3 * SCOPES
    stats = sink.stats.as_dict()
    assert stats["exported"] == 3 * SCOPES and stats["pending"] == 0 and stats["dropped"] == 0
    assert stats["files_written"] == 4


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_flush_returns_only_once_the_last_file_is_durable(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_fsync = os.fsync
    synced: list[str] = []
    lock = threading.Lock()

    def slow_fsync(fd: int) -> None:
        path = _fd_path(fd)
        if path.endswith(".json.tmp"):
            time.sleep(0.3)
        real_fsync(fd)
        with lock:
            synced.append(path)

    ci.profile(output_dir=str(out), flush_interval=30, install_signal_handlers=False)
    try:
        monkeypatch.setattr(os, "fsync", slow_fsync)
        for i in range(100):
            ci.mark("loss", float(i))
        assert ci.flush()
        # at this point the file is renamed and its directory entry synced, with no .tmp left
        names = os.listdir(out / "spool")
        assert not [n for n in names if n.endswith(".tmp")], names
        with lock:
            assert synced and synced[-1] == str(out / "spool")
        marks = [m for d in names for m in json.loads((out / "spool" / d).read_text())["marks"]]
        assert len(marks) == 100
        assert ci.health()["sinks"]["spool"]["pending"] == 0
    finally:
        monkeypatch.undo()
        ci.shutdown()


def test_shutdown_commits_what_is_in_flight(tmp_path):
    sink = SpoolSink(tmp_path, max_records_per_file=30)
    sink.export(_batches())
    sink.shutdown(5)
    assert len(_records(sink.spool_dir)) == 3 * SCOPES
    assert sink.stats.as_dict()["pending"] == 0
