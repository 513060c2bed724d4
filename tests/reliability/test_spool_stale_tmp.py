"""Defect 4: temporary files of a killed run are removed at start-up and never count.

A batch is written as `<name>.tmp` under an exclusive flock held by its writer. A killed
writer's lock is gone, so start-up removes its `.tmp`; a live writer (another process
sharing the output directory) keeps its lock, and its `.tmp` is left alone. Neither counts
toward the byte cap. The OTLP outbox uses the same class (`.pb.tmp`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from cirron_otel.exporters import spool_dir as spool_dir_mod
from cirron_otel.exporters.spool_dir import SpoolDirectory

import cirron_otel as ci
from tests.support.helpers import read_spool

pytestmark = pytest.mark.timeout(120)


def _stale_name(suffix: str) -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex}{suffix}.tmp"


def _leave_killed_writer_tmp(directory: Path, suffix: str, size: int) -> Path:
    """A real writer process killed by SIGKILL in the middle of a batch: its .tmp stays."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _stale_name(suffix)
    code = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(path)!r}, os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"{{" * {size})
        print("written", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert path.stat().st_size == size
    return path


def test_stale_spool_tmp_files_do_not_evict_new_batches(out):
    # The reproducer: 3 MB of stale temp files, spool_max_bytes=2_000_000.
    stale = [_leave_killed_writer_tmp(out / "spool", ".json", 300_000) for _ in range(10)]
    ci.profile(
        output_dir=str(out), spool_max_bytes=2_000_000, flush_interval=60, install_signal_handlers=False
    )
    assert not any(p.exists() for p in stale)
    assert ci.health()["sinks"]["spool"]["stale_tmp_removed"] == 10
    for round_ in range(10):
        for i in range(50):
            ci.mark("r", round_ * 1000 + i, pad="x" * 100)
        assert ci.flush(timeout=30)
    h = ci.health()
    on_disk = sum(p.stat().st_size for p in (out / "spool").glob("*.json"))
    ci.shutdown()
    assert h["spool_bytes"] == on_disk
    assert h["spool_drop_count"] == 0
    assert h["sinks"]["spool"]["evicted_files"] == 0
    rounds = {m["value"] // 1000 for doc in read_spool(out) for m in doc["marks"] if m["name"] == "r"}
    assert rounds == set(range(10))


def test_tmp_files_never_count_toward_the_cap(tmp_path):
    # A .tmp that appears later (a live writer in another process) is not counted either.
    d = SpoolDirectory(tmp_path, max_bytes=10_000)
    d.write_bytes("00000000000000000001-a.json", b"{}" * 1000)
    (Path(d.path) / _stale_name(".json")).write_bytes(b"x" * 50_000)
    files, total = d.scan()
    assert files == [("00000000000000000001-a.json", 2000)] and total == 2000
    assert d.enforce_cap("none", lambda e: None) == 0 and not d.over_cap()


def test_stale_outbox_tmp_removed_and_not_counted(tmp_path):
    outbox = tmp_path / "otlp-outbox"
    stale = [_leave_killed_writer_tmp(outbox, "-3.pb", 100_000) for _ in range(3)]
    d = SpoolDirectory(tmp_path, max_bytes=150_000, subdir="otlp-outbox", suffix=".pb")
    assert d.stale_tmp_removed == 3 and not any(p.exists() for p in stale)
    d.write_bytes("00000000000000000001-x-3.pb", b"\0" * 100_000)
    assert d.scan()[1] == 100_000 and not d.over_cap()


def test_tmp_of_a_live_writer_in_another_process_is_kept(tmp_path):
    # Another process is in the middle of SpoolDirectory.write (it holds the lock): a new
    # process starting on the same directory must leave its .tmp, then the batch lands whole.
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex}.json"
    code = textwrap.dedent(f"""
        import os, sys
        from cirron_otel.exporters.spool_dir import SpoolDirectory
        def fill(fd):
            os.write(fd, b'{{"half": ')
            print("writing", flush=True)
            sys.stdin.readline()          # hold the batch open until the parent says so
            os.write(fd, b'1}}')
            return 11
        SpoolDirectory({str(tmp_path)!r}, 10**9).write({name!r}, fill)
        print("done", flush=True)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        dead = _leave_killed_writer_tmp(tmp_path / "spool", ".json", 10)
        live = tmp_path / "spool" / (name + ".tmp")
        d = SpoolDirectory(tmp_path, 10**9)
        assert d.stale_tmp_removed == 1 and not dead.exists()
        assert live.exists(), "the live writer's temporary file was removed"
        assert d.scan() == ([], 0)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert (tmp_path / "spool" / name).read_bytes() == b'{"half": 1}'
    assert not live.exists()


def test_writer_survives_a_cleaner_between_its_open_and_its_lock(tmp_path, monkeypatch):
    # The one race of the lock protocol, made deterministic: a cleaner (another process at
    # start-up) takes the unlocked new .tmp and unlinks it just before the writer locks it.
    d = SpoolDirectory(tmp_path, 10**9)
    os.makedirs(d.path)
    real_flock = spool_dir_mod.fcntl.flock
    raced = []

    def flock(fd: int, op: int) -> None:
        if op == spool_dir_mod.fcntl.LOCK_EX and not raced:  # the writer's blocking lock
            raced.append(SpoolDirectory(tmp_path, 10**9).stale_tmp_removed)
        real_flock(fd, op)

    monkeypatch.setattr(spool_dir_mod.fcntl, "flock", flock)
    d.write_bytes("00000000000000000001-a.json", b'{"a": 1}')
    monkeypatch.undo()
    assert raced == [1]  # the cleaner did remove the first .tmp
    assert (Path(d.path) / "00000000000000000001-a.json").read_bytes() == b'{"a": 1}'
    assert os.listdir(d.path) == ["00000000000000000001-a.json"]
