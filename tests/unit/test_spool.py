"""The spool v1 writer: names, atomic durable writes, record caps, the byte cap."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import re
import sys
from pathlib import Path

import pytest
from cirron_otel.exporters import spool as spool_mod
from cirron_otel.exporters.schema import loads_strict

import cirron_otel as ci
from tests.support.helpers import read_spool


def test_batch_file_layout(prof, out):
    with ci.scope("s"):
        ci.mark("loss", 0.5)
    ci.flush()
    (doc,) = read_spool(out)
    name = os.listdir(out / "spool")[0]
    assert re.fullmatch(r"\d{20}-[0-9a-f]{32}\.json", name)
    assert doc["schema_version"] == 1
    assert doc["sdk_version"] == ci.__version__
    assert doc["snapshots"] == []
    assert list(doc) == [
        "schema_version",
        "sdk_version",
        "batch_id",
        "created_ns",
        "spans",
        "marks",
        "snapshots",
    ]
    mark = doc["marks"][0]
    assert list(mark) == ["id", "span_id", "name", "value_type", "value", "attrs", "ts_ns", "kind"]
    assert int(mark["id"][12], 16) == 4  # UUID4 layout: 122 random bits
    span = doc["spans"][0]
    assert span["mark_ids"] == [mark["id"]]
    assert span["pid"] == os.getpid() and span["rank"] == 0
    assert span["memory_peak_bytes"] is None and span["gpu_ns"] is None


def test_write_is_tmp_fsync_replace_dirfsync(prof, out, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    opened: dict[int, str] = {}

    def spy_open(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        opened[fd] = os.fspath(path)
        return fd

    def spy_fsync(fd):
        events.append(("fsync", opened.get(fd, "?")))
        return real_fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", os.fspath(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(spool_mod.os, "open", spy_open)
    monkeypatch.setattr(spool_mod.os, "fsync", spy_fsync)
    monkeypatch.setattr(spool_mod.os, "replace", spy_replace)
    ci.mark("x", 1)
    ci.flush()
    monkeypatch.undo()
    kinds = [(k, p.endswith(".json.tmp"), p.endswith("spool")) for k, p in events]
    assert kinds[:3] == [("fsync", True, False), ("replace", True, False), ("fsync", False, True)]


def test_at_most_100k_records_per_file(out):
    ci.profile(output_dir=str(out), flush_interval=30, install_signal_handlers=False)
    for i in range(23_000):
        with ci.scope("step"):
            for _ in range(10):
                ci.mark("loss", i)
    ci.shutdown()
    docs = read_spool(out)
    sizes = [len(d["spans"]) + len(d["marks"]) for d in docs]
    assert max(sizes) <= 100_000
    assert sum(len(d["marks"]) for d in docs) == 230_000
    assert sum(len(d["spans"]) for d in docs) == 23_001
    assert len(docs) >= 3
    # every span lists exactly its marks, even when they landed in other files
    spans = [s for d in docs for s in d["spans"]]
    owner = {m["id"]: m["span_id"] for d in docs for m in d["marks"]}
    for s in spans:
        if s["name"] == "step":
            assert len(s["mark_ids"]) == 10
            assert all(owner[mid] == s["id"] for mid in s["mark_ids"])


def test_byte_cap_evicts_oldest_first_and_counts(out):
    ci.profile(output_dir=str(out), spool_max_bytes=30_000, flush_interval=30, install_signal_handlers=False)
    written = []
    for round_ in range(12):
        for i in range(20):
            ci.mark("r", round_ * 100 + i)
        ci.flush()
        written.append(round_)
    h = ci.health()
    files = sorted(os.listdir(out / "spool"))
    total = sum(os.path.getsize(out / "spool" / f) for f in files)
    assert total <= 30_000
    assert h["spool_drop_count"] == 12 - len(files) > 0
    assert h["spool_bytes"] == total
    kept_rounds = sorted({m["value"] // 100 for d in read_spool(out) for m in d["marks"]})
    assert kept_rounds == list(range(12 - len(files), 12))  # the newest survive


def test_strict_json_with_nonfinite_everywhere(prof, out):
    ci.mark("loss", float("nan"), bad=float("inf"))
    with ci.scope("s", w=float("-inf")):
        ci.mark("g", float("-inf"))
    ci.flush()
    raw = next((out / "spool").glob("*.json")).read_bytes()
    assert b"NaN" not in raw and b"Infinity" not in raw
    loads_strict(raw)
    with pytest.raises(ValueError):
        loads_strict(json.dumps({"v": float("nan")}))


def test_output_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRRON_OUTPUT_DIR", str(tmp_path / "from-env"))
    ci.profile(install_signal_handlers=False)
    ci.mark("e", 1)
    ci.shutdown()
    assert read_spool(tmp_path / "from-env")


def test_integers_and_ids_are_written_exactly(prof, out):
    """The encoder's integer and hex writers (json.h) against Python's: every digit-count
    boundary, both signs, random values; span ids, trace ids and times against the handle's
    (formatted by snprintf, a separate path)."""
    rng = random.Random(1234)
    values = [0, 1, -1, 9, 10, 99, 100, 10**8 - 1, 10**8, 10**8 + 1, -(10**8), 10**16 - 1, 10**16]
    values += [2**63 - 1, -(2**63), 1234567890123456789]
    values += [10**k + d for k in range(1, 19) for d in (-1, 0, 1)]
    values += [rng.randint(-(2**63), 2**63 - 1) for _ in range(500)]
    values += [rng.randint(0, 10 ** rng.randint(1, 18)) for _ in range(500)]
    handles = []
    for v in values:
        with ci.scope("s", index=v) as h:
            ci.mark("v", v)
        handles.append(h)
    ci.flush()
    docs = read_spool(out)
    assert [m["value"] for d in docs for m in d["marks"]] == values
    spans = {s["id"]: s for d in docs for s in d["spans"]}
    for h, v in zip(handles, values, strict=True):
        s = spans[h.id]
        assert (s["trace_id"], s["parent_id"], s["index"]) == (h.trace_id, h.parent_id, v)
        assert (s["start_ns"], s["end_ns"]) == (h.start_ns, h.end_ns)
        assert int(h.id, 16) >> 64 == h.span_id_int


def _resident_pages(path: os.PathLike[str] | str) -> int:
    """How many of a file's pages are in the page cache (mincore on a shared mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    c_int = ctypes.c_int
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, c_int, c_int, c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw[:pages])
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def _written_and_fsynced(path: Path, size: int, *, drop: bool) -> int:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
        if drop:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return _resident_pages(path)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or sys.platform != "linux", reason="Linux page cache")
@pytest.mark.parametrize("writer", ["profile", "span_exporter"])
def test_committed_spool_files_leave_the_page_cache(out, writer):
    """Nothing reads a spool file back in the writing process, so once it is on disk its pages
    are dropped: they would crowd out the application's files, and (issue 10) writing into
    fresh page-cache pages made the kernel's copy the flat-out spool's largest cost."""
    out.mkdir(exist_ok=True)
    size = 1 << 20
    if _written_and_fsynced(out / "kept", size, drop=False) == 0:
        pytest.skip("this filesystem does not keep written pages cached")
    if _written_and_fsynced(out / "dropped", size, drop=True) != 0:
        pytest.skip("this filesystem ignores POSIX_FADV_DONTNEED")
    if writer == "profile":
        ci.profile(output_dir=out, install_signal_handlers=False)
        for step in range(20_000):
            with ci.scope("step"):
                ci.mark("loss", step * 0.001)
        ci.shutdown()
    else:
        from cirron_otel.exporters.otel_spool import SpoolSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(SpoolSpanExporter(out)))
        with provider.get_tracer("t").start_as_current_span("s") as span:
            span.set_attribute("blob", "x" * 200_000)
        provider.shutdown()
    files = sorted((out / "spool").glob("*.json"))
    assert files and sum(f.stat().st_size for f in files) > 100_000
    assert {f.name: _resident_pages(f) for f in files} == {f.name: 0 for f in files}
