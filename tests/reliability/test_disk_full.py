"""Disk full on a real, small tmpfs: the spool keeps the program running, counts and explains
every loss, and recovers once space comes back, even when the batch waiting for the disk is
larger than the space that came back (it is split into smaller files)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cirron_otel.exporters.spool import SpoolSink

import cirron_otel as ci
from cirron_otel import _native, _warn
from tests.support.helpers import read_spool

# real_backend: needs root for the tmpfs; with CI set, a skip fails the run (tests/conftest.py).
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.real_backend,
    pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning"),
]

FS_BYTES = 24 << 20
PAD = "x" * 100  # about 300 bytes of JSON per mark


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    _warn.reset()
    try:
        yield mnt
    finally:
        ci.shutdown()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path, leave: int = 0) -> None:
    """Write `path` until the file system has at most `leave` bytes free."""
    chunk = b"\0" * (64 << 10)
    with open(path, "wb") as f:
        while True:
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                return
            try:
                f.write(chunk[: max(4096, min(len(chunk), free - leave))])
                f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _recorded_and_ring_drops(base: dict[str, int]) -> tuple[int, int]:
    """Records recorded and lost in the rings since `base` (native counters are process-wide)."""
    now = _native.stats()
    recorded = sum(now[k] - base[k] for k in ("marks_recorded", "spans_recorded"))
    return recorded, sum(now[k] - base[k] for k in ("marks_dropped", "spans_dropped"))


def _mark_values(out: Path) -> list[int]:
    return [m["value"] for doc in read_spool(out) for m in doc["marks"] if m["name"] == "fill"]


def test_disk_full_counts_explains_and_recovers_with_split(tmpfs):
    out = tmpfs / "cirron"
    base = _native.stats()
    prof = ci.profile(
        output_dir=str(out),
        flush_interval=60,
        install_signal_handlers=False,
        spool_retry_records=45_000,
        ring_full_wait=3600,
    )
    sink = next(s for s in prof.sinks if isinstance(s, SpoolSink))
    ci.mark("fill", -1, pad=PAD)
    assert ci.flush(timeout=30)
    assert sink.backpressure is True
    _fill(tmpfs / "filler")

    # 10,000 marks, then 40,000 from a flat-out producer thread, while the disk is full.
    # The ring waits up to an hour for progress: a stalled spool would hang it (timeout).
    for i in range(10_000):
        ci.mark("fill", i, pad=PAD)
    assert ci.flush(timeout=30) is False
    assert sink.backpressure is False  # the failing spool does not hold producers back

    def produce() -> None:
        for i in range(10_000, 50_000):
            ci.mark("fill", i, pad=PAD)

    t = threading.Thread(target=produce)
    t.start()
    t.join(120)
    assert not t.is_alive()
    assert ci.flush(timeout=30) is False
    h = ci.health()
    spool = h["sinks"]["spool"]
    recorded, ring_drops = _recorded_and_ring_drops(base)
    assert ring_drops == 0  # nothing was lost in the rings
    # Past the retry bound the oldest batch (the first 10,000) was dropped, and health says why.
    assert spool["dropped"] == 10_000
    assert spool["pending"] == 40_000
    assert "No space left on device" in spool["last_error"]
    assert "10000 records: over 45000 records waiting for the disk" in spool["last_drop_reason"]
    assert "No space left on device" in spool["last_drop_reason"]
    assert recorded == h["records_written"] + spool["dropped"] + spool["pending"]

    # Some space comes back, less than the 12 MB batch waiting: it is split, and what fits
    # is written at once.
    os.unlink(tmpfs / "filler")
    _fill(tmpfs / "filler", leave=4 << 20)
    assert _free(tmpfs) < 6 << 20
    ci.flush(timeout=30)
    spool = ci.health()["sinks"]["spool"]
    assert spool["split_files"] > 1
    assert 0 < spool["pending"] < 40_000
    partial = spool["exported"]
    print(
        f"after partial space: {spool['split_files']} pieces, {partial} written, {spool['pending']} pending"
    )

    # All space back: everything left is written.
    os.unlink(tmpfs / "filler")
    assert ci.flush(timeout=30)
    h = ci.health()
    spool = h["sinks"]["spool"]
    assert spool["pending"] == 0 and spool["exported"] > partial
    print(
        f"recovered: {spool['exported']} written, {spool['dropped']} dropped, {spool['files_written']} files"
    )
    assert sink.backpressure is True
    # Every loss is explained: recorded = written + dropped, exactly.
    recorded, ring_drops = _recorded_and_ring_drops(base)
    assert recorded == h["records_written"] + spool["dropped"] + ring_drops
    values = _mark_values(out)  # strict JSON, schema-valid, no .tmp left
    assert len(values) == len(set(values)) == h["records_written"]
    assert set(values) == {-1, *range(10_000, 50_000)}
    ids = [m["id"] for doc in read_spool(out) for m in doc["marks"]]
    assert len(ids) == len(set(ids))
    ci.shutdown()


def test_split_pieces_are_valid_batches_with_the_same_records(tmpfs):
    # The pieces of a split batch carry exactly the records the batch would have carried,
    # byte for byte in every field (same ids), spans and their mark_ids included.
    out = tmpfs / "cirron"
    ci.profile(output_dir=str(out), flush_interval=60, install_signal_handlers=False)
    assert ci.flush(timeout=30)
    _fill(tmpfs / "filler", leave=1 << 20)
    for i in range(200):
        with ci.scope("step", i, note="n" * 50):
            for j in range(20):
                ci.mark("fill", i * 100 + j, pad=PAD, v=float("nan"))
    ci.flush(timeout=30)
    os.unlink(tmpfs / "filler")
    assert ci.flush(timeout=30)
    h = ci.health()
    assert h["sinks"]["spool"]["split_files"] > 1
    docs = read_spool(out)
    spans = [s for d in docs for s in d["spans"] if s["name"] == "step"]
    marks = {m["id"]: m for d in docs for m in d["marks"] if m["name"] == "fill"}
    assert len(spans) == 200 and len(marks) == 4000
    for s in spans:
        assert len(s["mark_ids"]) == 20
        assert all(marks[mid]["span_id"] == s["id"] for mid in s["mark_ids"])
    assert all(m["attrs"] == {"pad": PAD, "v": "nan"} for m in marks.values())
    names = [p.name for p in (out / "spool").iterdir()]
    assert len(names) == len(set(names)) == len(docs)
    ci.shutdown()


def test_health_before_any_space_comes_back(tmpfs):
    # While the disk stays full: flushes fail quickly, never raise, and keep the records.
    out = tmpfs / "cirron"
    base = _native.stats()
    ci.profile(output_dir=str(out), flush_interval=60, install_signal_handlers=False)
    assert ci.flush(timeout=30)
    _fill(tmpfs / "filler")
    for _ in range(5):
        for i in range(1000):
            ci.mark("fill", i, pad=PAD)
        assert ci.flush(timeout=30) is False
    spool = ci.health()["sinks"]["spool"]
    assert spool["pending"] == 5000 and spool["dropped"] == 0
    assert "No space left on device" in spool["last_error"]
    assert _recorded_and_ring_drops(base)[1] == 0
    assert not [p for p in (out / "spool").iterdir() if p.name.endswith(".tmp")]
