"""With the outbox on, the OTLP sink loses nothing to a flat-out producer, and sends in parallel.

The outbox is the buffer between the program and the network: the OTLP worker only encodes
and writes it, so like the spool it may pace the producer (backpressure) instead of dropping;
several sender threads deliver it with requests in flight at once; the outbox writes one group
commit per export. Real receivers on loopback, real profiles; no test asserts on speed.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from cirron_otel.exporters import otlp as otlp_mod
from cirron_otel.exporters import spool_dir as spool_dir_mod
from cirron_otel.exporters.spool_dir import SpoolDirectory

import cirron_otel as ci
from tests.support.helpers import run_script, spans_and_marks
from tests.support.otlp import Receiver, otlp_health, protocol, start, wait_until
from tests.support.otlp_receivers import GrpcReceiver


@pytest.fixture(autouse=True)
def _clean_env(clean_env: None) -> None:
    """No OTEL_*, CIRRON_* or rank variable of the calling environment leaks into these tests."""


pytestmark = [pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning"), pytest.mark.timeout(180)]


# A producer flat out for a second while every outbox commit takes 50 ms longer (a slow disk):
# far slower than the producer, so the OTLP worker's bounded queue overflows at once unless
# the sink paces the producer. Small exports (2,000 records) make many of them.
_FLAT_OUT = """
    import json, sys, time
    import cirron_otel as ci
    from cirron_otel import _config
    from cirron_otel.exporters import spool_dir

    out, endpoint, proto = sys.argv[1:4]
    real_commit = spool_dir.SpoolDirectory.commit

    def slow_outbox(self, staged):
        if self.suffix == ".pb":
            time.sleep(0.05)
        return real_commit(self, staged)

    spool_dir.SpoolDirectory.commit = slow_outbox
    _config.Settings.max_records_per_file = 2000  # (a default, not a profile() argument)
    ci.profile(output="spool,otlp", output_dir=out, otlp_endpoint=endpoint, otlp_protocol=proto,
               install_signal_handlers=False, tracer_provider=None)
    marks = scopes = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for _ in range(10):
            with ci.scope("step"):
                for i in range(10):
                    ci.mark("loss", i)
        marks += 100
        scopes += 10
    ci.shutdown(timeout=120)
    h = ci.health()
    print(json.dumps({"marks": marks, "scopes": scopes, "health": h}, default=str))
"""


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_a_flat_out_producer_loses_nothing_on_otlp_when_the_outbox_is_slower(
    out: Path, receiver: Receiver, compression: str
):
    """Every record reaches the receiver (spans, and marks as their events), none dropped
    anywhere: the slow outbox paced the producer instead."""
    result = run_script(
        _FLAT_OUT.replace("sys.argv[1:4]", repr([str(out), receiver.endpoint, protocol(receiver)])),
        timeout=170,
        # the metrics sink on too: with its outbox it paces the producer as well, losing no point
        env={"OTEL_EXPORTER_OTLP_COMPRESSION": compression},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    health = report["health"]
    otlp = health["sinks"]["otlp"]
    assert otlp["dropped"] == 0 and otlp["pending"] == 0, otlp
    assert health["sinks"]["spool"]["dropped"] == 0, health["sinks"]["spool"]
    metrics = health["sinks"]["otlp_metrics"]
    assert metrics["dropped"] == 0 and metrics["points_dropped"] == 0, metrics
    assert health["mark_drop_count"] == 0 and health["span_drop_count"] == 0, health
    assert health["drainer"]["cycle_errors"] == 0 and health["records_pending"] == 0, health["drainer"]
    spans, marks = spans_and_marks(out)
    assert len(marks) == report["marks"] > 2000 * 8  # more than the worker's queue holds
    assert len(spans) == report["scopes"] + 1  # + the session span
    assert otlp["exported"] == len(spans)
    got_spans = got_events = 0
    for request in list(receiver.requests):
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                got_spans += len(ss.spans)
                got_events += sum(len(span.events) for span in ss.spans)
    assert (got_spans, got_events) == (len(spans), len(marks))
    points = receiver.wait_for_metric_points(len(marks), "cirron.mark.loss")
    assert len(points) == len(marks)  # one point per (numeric) mark
    if compression == "gzip" and protocol(receiver) != "grpc":  # (grpcio hides grpc-encoding)
        assert all(h.get("content-encoding") == "gzip" for h in receiver.headers)


def test_several_requests_are_in_flight_at_once(out: Path, receiver: Receiver):
    """A slow collector holds each request 0.5 s: the next ones arrive meanwhile (at most
    one per sender thread), rather than one after another's answer."""
    receiver.delay = 0.5
    start(out, receiver, flush_interval=30)
    for i in range(6):  # six exports: six requests queued at once
        with ci.scope("step", index=i):
            pass
        ci.flush(timeout=0.01)
    wait_until(lambda: otlp_health()["pending"] == 0, timeout=30, what="every request delivered")
    times = sorted(receiver.arrival_times)
    # the most requests that arrived within one delay window: all were on the wire together
    overlap = max(sum(1 for t in times if start <= t < start + 0.4) for start in times)
    assert overlap >= 2, times
    assert overlap <= otlp_mod.SENDERS, times
    assert otlp_health()["dropped"] == 0
    ci.shutdown()


def test_the_outbox_writes_an_export_with_one_directory_fsync_and_no_lock_across_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Group commit: every file fsynced before any is renamed, the directory fsynced once for
    the group; the directory's lock (which the sender needs to delete) free during each fsync."""
    directory = SpoolDirectory(tmp_path, 1 << 30, subdir="otlp-outbox", suffix=".pb")
    events: list[tuple[str, str, bool]] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    opened: dict[int, str] = {}

    def spy_open(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        fd = real_open(path, flags, *a, **kw)
        opened[fd] = os.fspath(path)
        return fd

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", opened.get(fd, "?"), directory._lock.locked()))
        real_fsync(fd)

    def spy_replace(src: Any, dst: Any) -> None:
        events.append(("replace", os.fspath(dst), directory._lock.locked()))
        real_replace(src, dst)

    monkeypatch.setattr(spool_dir_mod.os, "open", spy_open)
    monkeypatch.setattr(spool_dir_mod.os, "fsync", spy_fsync)
    monkeypatch.setattr(spool_dir_mod.os, "replace", spy_replace)
    names = [f"{i:020d}-{'a' * 32}-1.pb" for i in range(3)]
    sizes = directory.write_bytes_many([(name, b"x" * (i + 1)) for i, name in enumerate(names)])
    monkeypatch.undo()
    assert sizes == [1, 2, 3]
    kinds = [(what, path.endswith(".pb.tmp"), path == directory.path) for what, path, _ in events]
    assert kinds == [("fsync", True, False)] * 3 + [("replace", False, False)] * 3 + [("fsync", False, True)]
    assert not any(locked for _, _, locked in events)
    assert directory.scan() == ([(name, i + 1) for i, name in enumerate(names)], 6)


def test_requests_reach_the_senders_only_once_their_outbox_commit_is_durable(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch
):
    """The outbox commit of one export runs while the next is encoded; its requests are
    queued for sending only when that commit is done (so nothing is sent that a crash could
    leave half-written on disk), and a flush waits for it."""
    sink = next(s for s in start(out, grpc_receiver, flush_interval=30).sinks if s.name == "otlp")
    release = threading.Event()
    committing = threading.Event()
    real = SpoolDirectory.commit

    def held(self: SpoolDirectory, staged: Any) -> None:
        if self.suffix == ".pb":
            committing.set()
            release.wait(30)
        real(self, staged)

    monkeypatch.setattr(SpoolDirectory, "commit", held)
    with ci.scope("held"):
        pass
    assert not ci.flush(timeout=1.0)  # the commit is held: not delivered, and flush says so
    assert committing.is_set()
    assert grpc_receiver.spans() == []
    assert otlp_health()["pending"] > 0
    release.set()
    assert ci.flush(timeout=10)
    assert "held" in {s["name"] for s in grpc_receiver.spans()}
    assert sink.outbox is not None and not [n for n in os.listdir(sink.outbox.path) if n.endswith(".tmp")]
    assert otlp_health()["dropped"] == 0
    ci.shutdown()


def test_a_failing_outbox_lifts_the_backpressure_and_memory_takes_over(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch
):
    """A disk that fails must not slow the program: no backpressure while outbox writes fail
    (the in-memory queue and its bound apply), back once a write succeeds."""
    sink = next(s for s in start(out, grpc_receiver, flush_interval=30).sinks if s.name == "otlp")
    assert sink.backpressure
    failing = threading.Event()
    failing.set()
    real = SpoolDirectory.stage

    def flaky(self: SpoolDirectory, name: str, fill: Any) -> Any:
        if self.suffix == ".pb" and failing.is_set():
            raise OSError(28, "No space left on device")
        return real(self, name, fill)

    monkeypatch.setattr(SpoolDirectory, "stage", flaky)
    with ci.scope("while failing"):
        pass
    grpc_receiver.delay = 0.0
    ci.flush(timeout=10)
    assert not sink.backpressure
    failing.clear()
    with ci.scope("after"):
        pass
    assert ci.flush(timeout=10)
    assert sink.backpressure
    wait_until(lambda: otlp_health()["pending"] == 0, what="delivery")
    assert {s["name"] for s in grpc_receiver.spans()} >= {"while failing", "after"}
    assert otlp_health()["dropped"] == 0
    ci.shutdown()
