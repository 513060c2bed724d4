"""The OTLP outbox keeps its promises (README "Durability").

- durable: each request is written to a temporary file, fsynced, renamed atomically, and the
  directory fsynced, all before the request is sent;
- crash-safe: a process that dies without shutdown (`os._exit`, SIGKILL) with the collector down
  leaves its requests on disk, and the next run delivers them;
- shared: processes sharing an outbox (ranks, a forked child) deliver each request once, even
  when every one of them has found the same files;
- at-least-once under SIGKILL on the wire: duplicates never exceed the requests in flight at
  the kills.

Everything is real: receivers on loopback, files, child processes, signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cirron_otel.exporters import spool_dir as spool_dir_mod
from cirron_otel.exporters.otlp import OUTBOX_DIR
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import cirron_otel as ci
from tests.support.otlp import Receiver, protocol, received_ids, spool_ids
from tests.support.otlp_receivers import GrpcReceiver, decode_spans


@pytest.fixture(autouse=True)
def _clean_env(clean_env: None) -> None:
    """No OTEL_*, CIRRON_* or rank variable of the calling environment leaks into these tests."""


pytestmark = [pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning"), pytest.mark.timeout(240)]


def outbox_ids(out: Path) -> Counter[str]:
    ids: Counter[str] = Counter()
    for path in sorted((out / OUTBOX_DIR).glob("*.pb")):
        for span in decode_spans(ExportTraceServiceRequest.FromString(path.read_bytes())):
            ids[span["span_id"]] += 1
    return ids


def spawn(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {**os.environ, "OTEL_EXPORTER_OTLP_TIMEOUT": "1000", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err
    return out


# -- (a) durable: tmp, fsync, atomic rename, directory fsync, before the send ------------------


def test_each_request_is_fsynced_renamed_and_its_directory_fsynced_before_it_is_sent(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch
):
    ci.profile(
        output_dir=str(out),
        otlp_endpoint=grpc_receiver.endpoint,
        flush_interval=30,
        install_signal_handlers=False,
        tracer_provider=None,
        metrics=False,  # the traces' outbox alone (the metrics' is the same SpoolDirectory code)
    )
    events: list[tuple[str, str, int]] = []  # (what, path, spans the receiver had at that moment)
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    opened: dict[int, str] = {}

    def spy_open(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        fd = real_open(path, flags, *a, **kw)
        opened[fd] = os.fspath(path)
        return fd

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", opened.get(fd, "?"), grpc_receiver.span_count()))
        real_fsync(fd)

    def spy_replace(src: Any, dst: Any) -> None:
        events.append(("replace", f"{os.fspath(src)} -> {os.fspath(dst)}", grpc_receiver.span_count()))
        real_replace(src, dst)

    monkeypatch.setattr(spool_dir_mod.os, "open", spy_open)
    monkeypatch.setattr(spool_dir_mod.os, "fsync", spy_fsync)
    monkeypatch.setattr(spool_dir_mod.os, "replace", spy_replace)
    with ci.scope("work"):
        pass
    assert ci.flush(timeout=10)
    monkeypatch.undo()
    assert grpc_receiver.span_count() == 1
    outbox = str(out / OUTBOX_DIR)
    mine = [(what, path, seen) for what, path, seen in events if ".pb" in path or path == outbox]
    kinds = [(what, path.endswith(".pb.tmp"), path.endswith(".pb"), path == outbox) for what, path, _ in mine]
    assert kinds[:3] == [
        ("fsync", True, False, False),
        ("replace", False, True, False),
        ("fsync", False, False, True),
    ], mine
    # the rename is from <name>.pb.tmp to <name>.pb, in the outbox
    src, dst = mine[1][1].split(" -> ")
    assert src == dst + ".tmp" and os.path.dirname(dst) == outbox
    # all of it happened while the receiver had nothing yet
    assert [seen for _, _, seen in mine[:3]] == [0, 0, 0]
    ci.shutdown()


# -- (b) in the outbox before it is sent: a crash keeps it for the next run -----------------


_CRASHING_RUN = """
    import os, sys, time
    import cirron_otel as ci
    out, endpoint, proto, how = sys.argv[1:5]
    ci.profile(output_dir=out, otlp_endpoint=endpoint, otlp_protocol=proto, flush_interval=30,
               install_signal_handlers=False, tracer_provider=None)
    for i in range(3):
        with ci.scope("step", index=i):
            ci.mark("loss", i)
        ci.flush(timeout=2)  # the collector is down: False, and the request waits in the outbox
    print("recorded", flush=True)
    if how == "exit":
        os._exit(0)  # no shutdown, no atexit, no flush
    time.sleep(120)  # waits for SIGKILL
"""

_DELIVERING_RUN = """
    import json, sys
    import cirron_otel as ci
    out, endpoint, proto = sys.argv[1:4]
    ci.profile(output_dir=out, otlp_endpoint=endpoint, otlp_protocol=proto, flush_interval=0.05,
               install_signal_handlers=False, tracer_provider=None)
    ci.shutdown(timeout=30)
    print(json.dumps(ci.health()["sinks"]["otlp"]))
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_requests_recorded_before_a_crash_with_the_collector_down_are_delivered_by_the_next_run(
    out: Path, receiver: Receiver, how: str
):
    endpoint = receiver.endpoint
    receiver.stop()
    proc = spawn(_CRASHING_RUN, str(out), endpoint, protocol(receiver), how)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "recorded"
    if how == "kill":
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if how == "kill" else 0)
    recorded = spool_ids(out)
    assert len(recorded) == 3  # the steps (the session never ended)
    assert outbox_ids(out) == recorded  # on disk, each once, although nothing was ever sent
    assert not list((out / OUTBOX_DIR).glob("*.tmp"))

    receiver.start()
    assert receiver.endpoint == endpoint
    output = finish(spawn(_DELIVERING_RUN, str(out), endpoint, protocol(receiver)))
    report = json.loads(output.splitlines()[-1])
    receiver.wait_for_spans(len(recorded) + 1)
    got = received_ids(receiver)
    assert {k: got[k] for k in recorded} == dict(recorded)  # every crashed request, exactly once
    assert sum(got.values()) == len(recorded) + 1  # + the second run's session span
    assert report["pending"] == 0 and report["dropped"] == 0 and report["exported"] == len(recorded) + 1
    assert not list((out / OUTBOX_DIR).glob("*.pb"))


# -- (d) processes sharing an outbox deliver each request once ---------------------------------


_LEFTOVERS = """
    import sys
    import cirron_otel as ci
    out, endpoint, proto = sys.argv[1:4]
    ci.profile(output_dir=out, otlp_endpoint=endpoint, otlp_protocol=proto, flush_interval=30,
               install_signal_handlers=False, tracer_provider=None)
    for i in range(4):
        with ci.scope("leftover", index=i):
            pass
        ci.flush(timeout=2)
    ci.shutdown(timeout=1)
"""

# Every process (and a child it forks) finds the leftovers, says so with a file, and waits for
# "go": none may deliver before all have scanned. Then all flush at once.
_SHARER = """
    import json, os, sys, time
    import cirron_otel as ci
    out, endpoint, proto, barrier, leftover_spans, fork = sys.argv[1:7]

    child = 0  # the forked child, watched by its parent: it must not die unseen

    def wait_for(path):
        global child
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise SystemExit("no go")
            ended, status = os.waitpid(child, os.WNOHANG) if child else (0, 0)
            if ended:
                with open(os.path.join(barrier, "failed-child"), "w") as f:
                    f.write(f"the forked child ended before the go: wait status {status:#x}")
                child = 0
            time.sleep(0.01)

    def share(tag):
        pending = ci.health()["sinks"]["otlp"]["pending"]
        assert pending >= int(leftover_spans), pending  # this process holds every leftover
        open(os.path.join(barrier, f"scanned-{tag}"), "w").close()
        wait_for(os.path.join(barrier, "go"))
        deadline = time.monotonic() + 60
        while ci.health()["sinks"]["otlp"]["pending"] and time.monotonic() < deadline:
            ci.flush(timeout=5)
        ci.shutdown(timeout=30)
        health = ci.health()["sinks"]["otlp"]
        with open(os.path.join(barrier, f"report-{tag}"), "w") as f:
            json.dump(health, f)

    ci.profile(output_dir=out, otlp_endpoint=endpoint, otlp_protocol=proto, flush_interval=30,
               install_signal_handlers=False, tracer_provider=None)
    if fork == "fork":
        pid = child = os.fork()
        if pid == 0:  # the child: a sink of its own, which scans the outbox again
            code = 0
            try:
                share(f"{os.getpid()}-child")
            except BaseException:  # the test reads why, instead of waiting for a scan that never comes
                import traceback
                with open(os.path.join(barrier, "failed-child"), "w") as f:
                    f.write(traceback.format_exc())
                code = 1
            finally:
                os._exit(code)
        share(str(os.getpid()))
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
    else:
        share(str(os.getpid()))
"""


def test_processes_sharing_an_outbox_all_find_the_leftovers_and_deliver_each_once(
    out: Path, tmp_path: Path, receiver: Receiver
):
    endpoint = receiver.endpoint
    receiver.stop()
    finish(spawn(_LEFTOVERS, str(out), endpoint, protocol(receiver)))
    leftovers = outbox_ids(out)
    assert len(leftovers) == 4 + 1  # + the first run's session span
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        spawn(_SHARER, str(out), endpoint, protocol(receiver), str(barrier), str(len(leftovers)), fork)
        for fork in ("fork", "no", "no")
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(barrier.glob("scanned-*"))) < 4:  # 3 processes + the forked child
            assert not (barrier / "failed-child").exists(), (barrier / "failed-child").read_text()
            assert time.monotonic() < deadline, "not every process scanned the outbox"
            ended = [p.communicate() for p in procs if p.poll() is not None]
            assert not ended, ended
            time.sleep(0.02)
        # a slow collector keeps every request on the wire long enough for all to try the same one
        receiver.delay = 0.3
        receiver.start()
        assert receiver.endpoint == endpoint
        (barrier / "go").touch()
        for p in procs:
            finish(p, timeout=120)
    finally:  # a failed test leaves no sharer behind, waiting for its go
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    reports = [json.loads(p.read_text()) for p in barrier.glob("report-*")]
    assert len(reports) == 4
    assert all(r["pending"] == 0 and r["dropped"] == 0 for r in reports), reports
    spool = spool_ids(out)  # leftovers + each process's and the child's session span
    assert len(spool) == len(leftovers) + 4
    receiver.wait_for_spans(len(spool), timeout=30)
    time.sleep(0.5)  # a duplicate would be on the wire now
    assert received_ids(receiver) == spool  # each exactly once
    assert sum(r["exported"] for r in reports) == len(spool)
    assert not list((out / OUTBOX_DIR).glob("*.pb"))


# -- fork safety: the sink's threads never import a module for the first time -----------------
#
# A process forked while one of its threads is importing a module inherits that module's import
# lock held by a thread that does not exist in the child: the child blocks forever on its first
# import of that module. When the child's OTLP sender did that while holding the outbox lock,
# every process sharing the outbox stopped delivering (the sharing test above failed about one
# run in five). So everything the sink's threads need is imported when profile() runs.

_IMPORTS_ON_SINK_THREADS = """
    import json, os, sys, threading, time
    loaded = []
    def hook(event, args):
        if event == "import" and threading.current_thread().name.startswith("cirron-otel"):
            loaded.append(f"{threading.current_thread().name}: {args[0]}")
    sys.addaudithook(hook)
    import cirron_otel as ci
    out, endpoint, proto, barrier = sys.argv[1:5]
    ci.profile(output_dir=out, otlp_endpoint=endpoint, otlp_protocol=proto, flush_interval=30,
               install_signal_handlers=False, tracer_provider=None)
    for i in range(3):  # accepted, then rejected (retryable, with a delay), then accepted again
        with ci.scope("step", index=i):
            ci.mark("loss", 1.0 / (i + 1))
        ci.flush(timeout=10)
        open(f"{barrier}/flushed-{i}", "w").close()
        while i == 0 and not os.path.exists(f"{barrier}/failing"):
            time.sleep(0.01)
    deadline = time.monotonic() + 30
    while ci.health()["sinks"]["otlp"]["pending"] and time.monotonic() < deadline:
        ci.flush(timeout=5)
    ci.shutdown(timeout=10)
    print(json.dumps({"loaded": loaded, "otlp": ci.health()["sinks"]["otlp"]}))
"""


def test_the_sink_threads_import_nothing_for_the_first_time(out: Path, tmp_path: Path, receiver: Receiver):
    proc = spawn(_IMPORTS_ON_SINK_THREADS, str(out), receiver.endpoint, protocol(receiver), str(tmp_path))
    deadline = time.monotonic() + 60
    while not (tmp_path / "flushed-0").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    if isinstance(receiver, GrpcReceiver):
        receiver.fail_next(2, retry_after=0.2)  # RetryInfo: the rich-status path
    else:
        receiver.fail_next(2, 503, retry_after=0.2)  # Retry-After
    (tmp_path / "failing").touch()
    report = json.loads(finish(proc).splitlines()[-1])
    assert report["otlp"]["failed"] >= 1 and report["otlp"]["pending"] == 0, report["otlp"]
    assert report["loaded"] == []


# -- fork while a request is on the wire ---------------------------------------------------------
#
# gRPC skips its fork handlers when a thread is in a call at fork(), and the child then crashes
# (SIGSEGV) making a channel of its own: the call on the wire is cancelled before the fork (it
# stays in the outbox and goes again), and no call starts until the fork is done.

_FORK_ON_THE_WIRE = """
    import json, os, sys, time
    import cirron_otel as ci
    out, endpoint, proto, barrier = sys.argv[1:5]
    ci.profile(output_dir=out, otlp_endpoint=endpoint, otlp_protocol=proto, flush_interval=30,
               install_signal_handlers=False, tracer_provider=None)
    with ci.scope("before-fork"):
        pass
    ci.flush(timeout=0.01)  # the request goes on the wire; the collector answers in seconds
    while not os.path.exists(os.path.join(barrier, "on-the-wire")):
        time.sleep(0.001)
    pid = os.fork()
    with ci.scope("child" if pid == 0 else "parent"):
        pass
    deadline = time.monotonic() + 60
    while ci.health()["sinks"]["otlp"]["pending"] and time.monotonic() < deadline:
        ci.flush(timeout=5)
    ci.shutdown(timeout=30)
    if pid == 0:
        os._exit(0 if ci.health()["sinks"]["otlp"]["pending"] == 0 else 3)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child_status": status, "otlp": ci.health()["sinks"]["otlp"]}))
"""


def test_a_fork_while_a_request_is_on_the_wire_loses_nothing_and_the_child_delivers(
    out: Path, tmp_path: Path, receiver: Receiver
):
    receiver.delay = 2.0  # the first request stays on the wire while the program forks
    # gRPC says when it forks unsafely: "Other threads are currently calling into gRPC,
    # skipping fork() handlers" (logged at INFO)
    proc = spawn(
        _FORK_ON_THE_WIRE,
        str(out),
        receiver.endpoint,
        protocol(receiver),
        str(tmp_path),
        env={"GRPC_VERBOSITY": "INFO", "OTEL_EXPORTER_OTLP_TIMEOUT": "10000"},
    )
    try:
        receiver.wait_for_arrivals(1, timeout=60)
        (tmp_path / "on-the-wire").touch()
        time.sleep(0.2)
        receiver.delay = 0.0
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "skipping fork() handlers" not in stderr
    report = json.loads(stdout.splitlines()[-1])
    assert report["child_status"] == 0, f"the forked child: wait status {report['child_status']:#x}"
    assert report["otlp"]["pending"] == 0, report["otlp"]
    spool = spool_ids(out)  # before-fork, parent, child and both sessions
    assert len(spool) == 5
    receiver.wait_for_spans(len(spool), timeout=30)
    assert set(received_ids(receiver)) == set(spool)  # a cancelled request may also have arrived


# -- SIGKILL while a request is on the wire: at-least-once, duplicates <= requests in flight ----


_KILLED_WHILE_SENDING = """
    import sys
    import cirron_otel as ci
    out, endpoint, proto, run = sys.argv[1:5]
    ci.profile(output_dir=out, otlp_endpoint=endpoint, otlp_protocol=proto, flush_interval=30,
               install_signal_handlers=False, tracer_provider=None)
    i = 0
    while True:  # until SIGKILL: record, and flush so a request goes out
        with ci.scope("step", run=int(run), index=i):
            pass
        i += 1
        ci.flush(timeout=10)
"""


def test_sigkill_while_a_request_is_on_the_wire_is_at_least_once_with_at_most_one_duplicate_per_kill(
    out: Path, receiver: Receiver
):
    kills = 6
    receiver.delay = 0.5  # a request stays on the wire half a second: the kill lands inside it
    on_disk: Counter[str] = Counter()  # every span some kill left in the outbox
    for run in range(kills):
        before = len(receiver.arrival_times)
        proc = spawn(_KILLED_WHILE_SENDING, str(out), receiver.endpoint, protocol(receiver), str(run))
        try:
            receiver.wait_for_arrivals(before + 1, timeout=60)
        finally:
            proc.send_signal(signal.SIGKILL)  # the sender thread has one request on the wire
            proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        on_disk |= outbox_ids(out)
    receiver.delay = 0.0
    finish(spawn(_DELIVERING_RUN, str(out), receiver.endpoint, protocol(receiver)))
    spool = spool_ids(out)
    got = received_ids(receiver)
    assert on_disk and not set(on_disk) - set(got)  # at least once: nothing that reached the outbox is lost
    # a kill may land between the spool's write and the outbox's (the scope being flushed at
    # that moment): that span was never a request. At most one per kill.
    missing = set(spool) - set(got)
    assert len(missing) <= kills, missing
    # duplicates, counted in requests: at most the one request on the wire at each kill
    requests = Counter(frozenset(s["span_id"] for s in decode_spans(r)) for r in receiver.requests)
    duplicates = sum(n - 1 for n in requests.values())
    assert duplicates <= kills, (duplicates, kills)
    assert sum(n - 1 for n in got.values()) <= sum(len(k) * (n - 1) for k, n in requests.items())
    assert not list((out / OUTBOX_DIR).glob("*.pb"))
    print(f"{kills} kills: {duplicates} duplicate requests, {len(missing)} spans never encoded")
