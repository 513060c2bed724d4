"""OTLP delivery never stalls and never loses silently.

Real receivers on loopback (tests/support/otlp_receivers.py), real profiles, real subprocesses. Each
test pins one promise: failures are classified as the OTLP specification says; a permanently
rejected request is dropped, counted, and the queue moves on; a retryable one is retried with
exponential backoff and as late as the collector asks; corrupt outbox files are quarantined;
no request exceeds the collector's limit; the queues are bounded and what they evict is counted.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from cirron_otel.exporters.otlp import OUTBOX_DIR, make_transport
from cirron_otel.exporters.spool_dir import SpoolDirectory
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

import cirron_otel as ci
from cirron_otel._config import otlp_transport_config
from tests.support.helpers import run_script, spans_and_marks
from tests.support.otlp import Receiver, otlp_health, protocol, received_ids, spool_ids, start, wait_until
from tests.support.otlp_receivers import GrpcReceiver, HttpReceiver


@pytest.fixture(autouse=True)
def _clean_env(clean_env: None) -> None:
    """No OTEL_*, CIRRON_* or rank variable of the calling environment leaks into these tests."""


pytestmark = [pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning"), pytest.mark.timeout(120)]


def one_span_request(name: str = "s") -> bytes:
    span = Span(
        trace_id=os.urandom(16),
        span_id=os.urandom(8),
        name=name,
        start_time_unix_nano=1,
        end_time_unix_nano=2,
    )
    resource_spans = ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])
    return ExportTraceServiceRequest(resource_spans=[resource_spans]).SerializeToString()


# -- classification, one attempt per send ------------------------------------------------------

GRPC_RETRYABLE = {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "DATA_LOSS"}


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK], ids=lambda c: c.name
)
def test_grpc_status_classified_as_the_otlp_spec_says(grpc_receiver: GrpcReceiver, code: grpc.StatusCode):
    transport = make_transport(otlp_transport_config("grpc", grpc_receiver.endpoint, env={}))
    try:
        grpc_receiver.fail_next(1, code)
        error = transport.send(one_span_request())
        assert error is not None and code.name in error.message
        assert error.retryable == (code.name in GRPC_RETRYABLE)  # RESOURCE_EXHAUSTED: no RetryInfo here
        assert error.retry_after is None
        assert grpc_receiver.attempts == 1  # one attempt per send: the sink's queue does the retrying
        assert transport.send(one_span_request()) is None
        assert grpc_receiver.span_count() == 1
    finally:
        transport.shutdown()


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE])
def test_grpc_retry_info_makes_resource_exhausted_retryable_and_sets_the_delay(
    grpc_receiver: GrpcReceiver, code: grpc.StatusCode
):
    transport = make_transport(otlp_transport_config("grpc", grpc_receiver.endpoint, env={}))
    try:
        grpc_receiver.fail_next(1, code, retry_after=2.5)
        error = transport.send(one_span_request())
        assert error is not None and error.retryable and error.retry_after == 2.5
    finally:
        transport.shutdown()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 413, 415, 429, 500, 501, 502, 503, 504])
def test_http_status_classified_as_the_otlp_spec_says(http_receiver: HttpReceiver, status: int):
    transport = make_transport(otlp_transport_config("http/protobuf", http_receiver.endpoint, env={}))
    try:
        http_receiver.fail_next(1, status, retry_after=3)
        error = transport.send(one_span_request())
        assert error is not None and str(status) in error.message
        retryable = status in (429, 502, 503, 504)
        assert error.retryable == retryable
        assert error.retry_after == (3.0 if retryable else None)
        assert http_receiver.attempts == 1
        assert transport.send(one_span_request()) is None
    finally:
        transport.shutdown()


def test_http_retry_after_as_an_http_date(http_receiver: HttpReceiver):
    transport = make_transport(otlp_transport_config("http/protobuf", http_receiver.endpoint, env={}))
    try:
        http_receiver.fail_next(1, 503, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True))
        error = transport.send(one_span_request())
        assert error is not None and error.retryable
        assert error.retry_after is not None and 25 <= error.retry_after <= 31
    finally:
        transport.shutdown()


def test_a_collector_that_is_down_is_retryable(receiver: Receiver):
    transport = make_transport(
        otlp_transport_config(
            protocol(receiver), receiver.endpoint, env={"OTEL_EXPORTER_OTLP_TIMEOUT": "2000"}
        )
    )
    receiver.stop()
    try:
        error = transport.send(one_span_request())
        assert error is not None and error.retryable
    finally:
        transport.shutdown()


# -- a permanent rejection: dropped, counted, the queue moves on -----------------------------


@pytest.mark.parametrize(
    "case",
    [
        ("grpc", grpc.StatusCode.INVALID_ARGUMENT),
        ("grpc", grpc.StatusCode.PERMISSION_DENIED),
        ("grpc", grpc.StatusCode.UNAUTHENTICATED),
        ("grpc", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("http/protobuf", 400),
        ("http/protobuf", 401),
        ("http/protobuf", 403),
        ("http/protobuf", 413),
    ],
    ids=lambda c: f"{c[0]}-{getattr(c[1], 'name', c[1])}",
)
def test_a_rejected_request_is_dropped_counted_and_the_queue_moves_on(
    out: Path, request: pytest.FixtureRequest, case: tuple[str, Any]
):
    proto, code = case
    receiver: Receiver = request.getfixturevalue("grpc_receiver" if proto == "grpc" else "http_receiver")
    start(out, receiver)
    receiver.fail_next(1, code)
    with ci.scope("rejected"):
        pass
    ci.flush(timeout=10)
    wait_until(lambda: otlp_health()["dropped"] == 1, what="the rejected span counted as dropped")
    health = otlp_health()
    assert str(getattr(code, "name", code)) in health["last_error"]
    assert health["requests_rejected"] == 1 and health["pending"] == 0
    with ci.scope("after"):
        pass
    assert ci.flush(timeout=10)  # the head is gone: the next request goes through at once
    assert [s["name"] for s in receiver.wait_for_spans(1)] == ["after"]
    ci.shutdown()
    names = Counter(s["name"] for s in receiver.spans())
    assert names == {"after": 1, "cirron.session": 1}
    health = otlp_health()
    assert health["exported"] == 2 and health["dropped"] == 1 and health["pending"] == 0
    assert not list((out / OUTBOX_DIR).glob("*.pb"))


_PRODUCER = """
import json, sys, time
import cirron_otel as ci
ci.profile(output_dir=sys.argv[1], otlp_endpoint=sys.argv[2], otlp_protocol=sys.argv[3],
           flush_interval=0.05, install_signal_handlers=False, tracer_provider=None)
for i in range(int(sys.argv[4])):
    with ci.scope("step", index=i):
        ci.mark("loss", 1.0 / (i + 1))
    ci.flush(timeout=float(sys.argv[5]))
ci.shutdown(timeout=float(sys.argv[5]))
print(json.dumps(ci.health()["sinks"]["otlp"]))
"""


def run_producer(
    out: Path,
    receiver: Receiver,
    steps: int,
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    wall: float = 60,
) -> dict[str, Any]:
    argv = [str(out), receiver.endpoint, protocol(receiver), str(steps), str(timeout)]
    result = run_script(f"import sys; sys.argv[1:] = {argv!r}\n" + _PRODUCER, env=env, timeout=wall)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_permanently_failing_collector_drops_everything_counted_and_exits_promptly(
    out: Path, receiver: Receiver
):
    """Every request rejected for good (INVALID_ARGUMENT / HTTP 400): nothing is stuck, the
    program ends without waiting out its shutdown timeout (60 s > the 30 s the run may take)."""
    receiver.fail_next(10**6, grpc.StatusCode.INVALID_ARGUMENT if protocol(receiver) == "grpc" else 400)
    report = run_producer(out, receiver, steps=10, timeout=60, wall=30)
    spool = spool_ids(out)
    assert len(spool) == 10 + 1
    assert report["exported"] == 0 and report["pending"] == 0
    assert report["dropped"] == len(spool)  # every span, counted
    assert report["requests_rejected"] == receiver.attempts >= 2
    assert receiver.span_count() == 0
    assert ("INVALID_ARGUMENT" if protocol(receiver) == "grpc" else "400") in report["last_error"]
    assert not list((out / OUTBOX_DIR).glob("*.pb"))  # nothing left for the next run to choke on


@pytest.mark.parametrize("retry_after", [1.0, 0.6])
def test_a_collector_that_fails_then_recovers_gets_everything_once_no_sooner_than_it_asked(
    out: Path, receiver: Receiver, retry_after: float
):
    """UNAVAILABLE with RetryInfo / HTTP 503 with Retry-After, three times, then accepting."""
    failures = 3
    if protocol(receiver) == "grpc":
        receiver.fail_next(failures, grpc.StatusCode.UNAVAILABLE, retry_after=retry_after)
    else:
        receiver.fail_next(failures, 503, retry_after=retry_after)
    start(out, receiver)
    for i in range(5):
        with ci.scope("step", index=i):
            ci.mark("m", i)
    # flush() retries at once: only the collector's delay can hold it back
    wait_until(lambda: ci.flush(timeout=5), timeout=30, what="a flush that delivers everything")
    ci.shutdown()
    spool = spool_ids(out)
    receiver.wait_for_spans(len(spool))
    assert received_ids(receiver) == spool  # every span, exactly once
    health = otlp_health()
    assert health["failed"] == failures and health["dropped"] == 0 and health["pending"] == 0
    assert health["exported"] == len(spool)
    # each retry came no sooner than the collector asked (times taken by the receiver)
    times = receiver.arrival_times
    for failed_at in receiver.failed_times:
        later = [t for t in times if t > failed_at]
        assert later and later[0] - failed_at >= retry_after, (later[:1], failed_at)


def test_a_long_outage_never_stops_the_sender(out: Path, receiver: Receiver):
    """More than 1,024 retryable failures in a row (flush() retries at once, so a loop of
    flushes gets there in seconds): the backoff must not overflow and kill the sender thread;
    once the collector accepts, everything is delivered."""
    failures = 1100
    if protocol(receiver) == "grpc":
        receiver.fail_next(failures, grpc.StatusCode.UNAVAILABLE)
    else:
        receiver.fail_next(failures, 503)
    start(out, receiver)
    with ci.scope("step"):
        ci.mark("m", 1)
    deadline = time.monotonic() + 90
    while otlp_health()["failed"] < failures:
        assert time.monotonic() < deadline, otlp_health()
        assert not ci.flush(timeout=2)
    wait_until(lambda: ci.flush(timeout=5), timeout=30, what="delivery after the outage")
    ci.shutdown()
    spool = spool_ids(out)
    assert received_ids(receiver) == spool
    health = otlp_health()
    assert health["failed"] == failures and health["exported"] == len(spool) and health["pending"] == 0
    assert health["sender_errors"] == 0, health["last_error"]


def test_retries_back_off_exponentially_with_jitter(out: Path, grpc_receiver: GrpcReceiver):
    """Without a delay from the collector, the sink's own backoff doubles (times a random
    factor in [0.5, 1]) from 0.25 s: every gap at least the previous one, each within its bounds."""
    failures = 5
    grpc_receiver.fail_next(failures, grpc.StatusCode.UNAVAILABLE)
    start(out, grpc_receiver, flush_interval=0.05)
    with ci.scope("step"):
        pass
    # no flush(): it would cut the backoff short; the periodic export brings the span
    grpc_receiver.wait_for_spans(1, timeout=30)
    times = grpc_receiver.arrival_times[: failures + 1]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == failures
    for n, gap in enumerate(gaps):
        assert 0.25 * 2**n * 0.5 <= gap, (n, gaps)
    for earlier, later in itertools.pairwise(gaps):
        assert later >= earlier * 0.95, gaps  # 5%: scheduling noise, far below the doubling
    assert otlp_health()["failed"] == failures


# -- corrupt outbox files ---------------------------------------------------------------------


def test_a_corrupt_file_at_the_head_of_the_outbox_is_quarantined_and_the_rest_delivered(
    out: Path, receiver: Receiver
):
    endpoint = receiver.endpoint
    receiver.stop()
    report = run_producer(out, receiver, steps=3, timeout=1, env={"OTEL_EXPORTER_OTLP_TIMEOUT": "1000"})
    assert report["pending"] == 3 + 1
    outbox = out / OUTBOX_DIR
    good = sorted(outbox.glob("*.pb"))
    assert good
    # older than every real request, so at the head: garbage, and a valid request whose
    # span count is not the one its name says (a file cut short or mixed up)
    garbage = outbox / f"{1:020d}-{'a' * 32}-3.pb"
    garbage.write_bytes(b"\xff\x00 definitely not protobuf \x07" * 10)
    mismatch = outbox / f"{2:020d}-{'b' * 32}-5.pb"
    mismatch.write_bytes(one_span_request("mismatch"))
    receiver.start()
    assert receiver.endpoint == endpoint
    start(out, receiver)
    receiver.wait_for_spans(3 + 1)
    wait_until(lambda: otlp_health()["pending"] == 0, what="the outbox drained")
    health = otlp_health()
    assert health["outbox_quarantined"] == 2
    assert health["dropped"] == 3 + 5  # as their names say
    assert "quarantined" in health["last_error"] or health["exported"] == 3 + 1
    ci.shutdown()
    assert Counter(s["name"] for s in receiver.spans())["mismatch"] == 0
    quarantined = {p.name for p in outbox.glob("*.corrupt")}
    assert quarantined == {garbage.name + ".corrupt", mismatch.name + ".corrupt"}
    assert not list(outbox.glob("*.pb"))
    # set aside for good: not counted against the byte cap, not read again by the next run
    assert SpoolDirectory(out, 1, subdir=OUTBOX_DIR, suffix=".pb").scan() == ([], 0)
    start(out, receiver)
    assert otlp_health()["pending"] == 0
    ci.shutdown()
    assert otlp_health()["outbox_quarantined"] == 0


# -- no request over the collector's limit -----------------------------------------------------


def test_a_span_with_a_5_mib_attribute_is_truncated_to_fit_and_nothing_after_it_is_lost(
    out: Path, grpc_receiver: GrpcReceiver
):
    """The receiver keeps gRPC's default 4 MiB maximum message size, like the collector."""
    start(out, grpc_receiver)
    with ci.scope("before"):
        pass
    with ci.scope("huge", blob="x" * (5 << 20), small="kept"):
        ci.mark("note", "y" * 1000)
    for i in range(3):
        with ci.scope("after", index=i):
            pass
    ci.flush(timeout=30)
    ci.shutdown(timeout=30)
    spool = spool_ids(out)
    received = grpc_receiver.wait_for_spans(len(spool), timeout=30)
    assert received_ids(grpc_receiver) == spool
    huge = next(s for s in received if s["name"] == "huge")
    blob = huge["attributes"]["blob"]
    assert 3 << 20 < len(blob) < 4 << 20 and blob.endswith("…") and set(blob[:-1]) == {"x"}
    assert huge["attributes"]["small"] == "kept"
    (note,) = spans_and_marks(out)[1]
    assert huge["events"][0]["attributes"]["cirron.mark.value"] == note["value"]  # small values untouched
    health = otlp_health()
    assert health["values_truncated"] == 1 and health["requests_split"] >= 1
    assert health["dropped"] == 0 and health["exported"] == len(spool)
    assert all(r.ByteSize() <= 4 * 1024 * 1024 for r in grpc_receiver.requests)


def test_a_large_request_is_split_between_spans(out: Path, receiver: Receiver):
    limit = 64 * 1024
    start(out, receiver, otlp_max_request_bytes=limit, flush_interval=30)
    for i in range(400):
        with ci.scope("step", index=i, payload="p" * 500):
            pass
    ci.shutdown(timeout=30)
    spool = spool_ids(out)
    receiver.wait_for_spans(len(spool), timeout=30)
    assert received_ids(receiver) == spool  # every span once, none cut
    assert len(receiver.requests) >= 400 * 500 // limit
    assert all(r.ByteSize() <= limit for r in receiver.requests)
    assert all(s["attributes"].get("payload", "p" * 500) == "p" * 500 for s in receiver.spans())
    health = otlp_health()
    assert health["requests_split"] >= 1 and health["values_truncated"] == 0
    assert health["exported"] == len(spool) and health["dropped"] == 0


# -- the queues are bounded, and what they evict is counted -----------------------------------


def test_the_memory_queue_is_bounded_and_evictions_are_counted(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
    receiver.stop()
    start(out, receiver, output="otlp", otlp_queue_requests=3, flush_interval=30)
    for i in range(10):
        with ci.scope("step", index=i):
            pass
        ci.flush(timeout=2)  # one request per flush
    health = otlp_health()
    assert health["outbox"] is None
    assert health["pending"] == 3 and health["dropped"] == 10 - 3
    assert "queue full" in health["last_error"] or health["failed"] >= 1
    receiver.start()
    ci.shutdown(timeout=20)
    # The session span's request, queued at shutdown, evicts one more step (3 requests in
    # all), unless a sender's backoff retry delivered the oldest queued step between the
    # receiver's start and that moment (the queue then had room): 4 requests.
    health = otlp_health()
    assert health["pending"] == 0 and health["exported"] + health["dropped"] == 10 + 1
    received = receiver.wait_for_spans(health["exported"])
    steps = sorted(s["attributes"]["cirron.index"] for s in received if s["name"] == "step")
    # the newest requests were kept: the oldest were evicted, and counted
    assert steps in ([8, 9], [7, 8, 9]), steps
    assert health["exported"] == len(steps) + 1 and health["dropped"] == 10 - len(steps)


def test_the_outbox_is_bounded_and_evictions_are_counted(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
    receiver.stop()
    cap = 4000
    start(out, receiver, otlp_outbox_max_bytes=cap, flush_interval=30)
    for i in range(20):
        with ci.scope("step", index=i, pad="z" * 300):
            pass
        ci.flush(timeout=2)
    outbox = out / OUTBOX_DIR
    on_disk = sorted(outbox.glob("*.pb"))
    assert sum(p.stat().st_size for p in on_disk) <= cap
    health = otlp_health()
    assert 0 < len(on_disk) < 20
    assert health["pending"] == len(on_disk) and health["dropped"] == 20 - len(on_disk)
    receiver.start()
    ci.shutdown(timeout=20)
    health = otlp_health()
    assert health["exported"] + health["dropped"] == 20 + 1 and health["pending"] == 0
    received = receiver.wait_for_spans(health["exported"])
    assert len(received) == health["exported"]
    indexes = sorted(s["attributes"]["cirron.index"] for s in received if s["name"] == "step")
    # the newest survive (the session span's request, written at shutdown, may evict one more)
    assert indexes == list(range(20 - len(indexes), 20)) and len(indexes) >= len(on_disk) - 1


def test_an_oversized_request_left_in_the_outbox_is_split_before_it_is_sent(out: Path, receiver: Receiver):
    """A request written by a run with a larger limit (or an older version) is not sent whole."""
    limit = 64 * 1024
    spans = [
        Span(
            trace_id=os.urandom(16),
            span_id=os.urandom(8),
            name="old",
            start_time_unix_nano=1,
            end_time_unix_nano=2,
            attributes=[],
        )
        for _ in range(300)
    ]
    for span in spans:
        span.attributes.add(key="pad", value={"string_value": "q" * 1000})
    resource_spans = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    data = ExportTraceServiceRequest(resource_spans=[resource_spans]).SerializeToString()
    assert len(data) > 4 * limit
    outbox = out / OUTBOX_DIR
    outbox.mkdir(parents=True)
    (outbox / f"{1:020d}-{'c' * 32}-300.pb").write_bytes(data)
    start(out, receiver, otlp_max_request_bytes=limit)
    health = otlp_health()  # found at start (the senders may have sent some pieces already)
    assert health["pending"] + health["exported"] == 300
    receiver.wait_for_spans(300, timeout=30)
    ci.shutdown()
    old = [s for s in receiver.spans() if s["name"] == "old"]
    assert sorted(s["span_id"] for s in old) == sorted(s.span_id.hex() for s in spans)  # each once
    assert all(s["attributes"]["pad"] == "q" * 1000 for s in old)
    assert len(receiver.requests) >= 5 and all(r.ByteSize() <= limit for r in receiver.requests)
    health = otlp_health()
    assert health["requests_split"] == 1 and health["dropped"] == 0 and health["pending"] == 0
    assert not list(outbox.glob("*.pb"))


def test_spans_a_collector_rejects_in_a_partial_success_are_counted_as_dropped(out: Path, receiver: Receiver):
    start(out, receiver, flush_interval=30)  # the flush below makes one request of the three
    receiver.reject_spans_next(2, "two too many")
    for i in range(3):
        with ci.scope("step", index=i):
            pass
    assert ci.flush(timeout=10)  # accepted: not retried, as the specification says
    health = otlp_health()
    assert health["exported"] == 1 and health["dropped"] == 2 and health["pending"] == 0
    assert "two too many" in health["last_error"]
    ci.shutdown()
    assert receiver.attempts == 2  # the partly rejected request and the session span's, once each
    assert otlp_health()["exported"] == 1 + 1
