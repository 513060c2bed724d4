"""Marks as metrics, end to end against the in-process receivers (both protocols): the points
arrive with their names and labels, wait in their own outbox through an outage, follow the
settings, and an endpoint that takes no metrics turns them off with one warning.
(`tests/backends/test_metrics_stack.py` takes them on to a real collector and Prometheus.)"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest

import cirron_otel as ci
from cirron_otel import _warn
from tests.support.otlp import Receiver, start, wait_until
from tests.support.otlp_receivers import GrpcReceiver, HttpReceiver

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _env(clean_env: None) -> None:
    _warn.reset()


def metrics_health() -> dict:
    return ci.health()["sinks"]["otlp_metrics"]


def test_points_arrive_with_their_scope_rank_and_session(out: Path, receiver: Receiver) -> None:
    prof = start(out, receiver)
    for step in ci.batches(range(3)):
        ci.mark("loss", 1.0 / (step + 1))
        ci.mark("label", "text")  # not a number: no point
    ci.mark("lr", 3)
    ci.shutdown()
    points = receiver.wait_for_metric_points(4, "cirron.mark.")
    assert sorted((p[0], p[1]["cirron.scope"], p[2]) for p in points) == [
        ("cirron.mark.loss", "batch", 1 / 3),
        ("cirron.mark.loss", "batch", 0.5),
        ("cirron.mark.loss", "batch", 1.0),
        ("cirron.mark.lr", "cirron.session", 3),
    ]
    assert {(p[1]["cirron.rank"], p[1]["cirron.session.id"]) for p in points} == {(0, prof.session.id)}
    recorded = receiver.wait_for_metric_points(1, "cirron.health.records.recorded")
    # the last health point (at shutdown's final export) counts every record of the run
    assert max(p[2] for p in recorded) == ci.health()["records_recorded"] > 0
    assert metrics_health()["exported"] == 4 and metrics_health()["dropped"] == 0


def test_the_last_health_point_counts_what_the_spool_wrote_by_the_end(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool counts a file once its commit (fsync, rename) is done, which runs beside the
    next export; a slow disk makes the last export's health request too early for it. The
    metrics sink's shutdown sends one more, after the spool's own shutdown."""
    from cirron_otel.exporters.spool_dir import SpoolDirectory

    real = SpoolDirectory.commit

    def slow_spool_commit(self: SpoolDirectory, staged: object) -> None:
        if self.suffix == ".json":
            time.sleep(0.3)
        real(self, staged)  # type: ignore[arg-type]

    monkeypatch.setattr(SpoolDirectory, "commit", slow_spool_commit)
    start(out, receiver)
    for step in ci.batches(range(5)):
        ci.mark("loss", float(step))
    ci.shutdown()
    written = ci.health()["sinks"]["spool"]["exported"]
    assert written == 5 + 5 + 1  # 5 marks, 5 batch spans, the session

    def last_spool_written() -> float:
        points = [
            p
            for p in receiver.metric_points()
            if p[0] == "cirron.health.records.written" and p[1].get("cirron.sink") == "spool"
        ]
        return max((p[2] for p in points), default=-1)

    wait_until(lambda: last_spool_written() == written, what=f"a health point with {written} written")


def test_an_export_of_more_points_than_one_request_holds_is_delivered_whole(
    out: Path, receiver: Receiver
) -> None:
    # ~23,000 points filled a 4 MiB request; an export of more once made a request a point
    # past the limit, which the sender "split" into itself for ever: nothing went out.
    start(out, receiver)
    n = 60_000
    with ci.scope("step"):
        for i in range(n):
            ci.mark("loss", float(i))
    assert ci.flush(timeout=60)
    points = receiver.wait_for_metric_points(n, "cirron.mark.loss")
    assert sorted(p[2] for p in points) == [float(i) for i in range(n)]
    assert metrics_health()["exported"] == n and metrics_health()["dropped"] == 0
    assert list((out / "otlp-metrics-outbox").glob("*.pb")) == []


def test_an_outage_loses_no_point_the_outbox_keeps_them(out: Path, receiver: Receiver) -> None:
    receiver.stop()
    start(out, receiver)
    for step in range(5):
        with ci.scope("step", step):
            ci.mark("loss", float(step))
    assert not ci.flush(timeout=1)  # the receiver is down: delivered later
    pending = list((out / "otlp-metrics-outbox").glob("*.pb"))
    assert pending, "the points wait on disk"
    receiver.start()  # the sender's backoff (and gRPC's reconnect) decide when: no deadline here
    points = receiver.wait_for_metric_points(5, "cirron.mark.loss", timeout=60)
    assert sorted(p[2] for p in points) == [0.0, 1.0, 2.0, 3.0, 4.0]
    wait_until(lambda: metrics_health()["pending"] == 0, timeout=60, what="the outbox to empty")
    # every file of points delivered (a health request, "-0.pb", may be on its way meanwhile)
    left = [p.name for p in (out / "otlp-metrics-outbox").glob("*.pb") if not p.name.endswith("-0.pb")]
    assert metrics_health()["dropped"] == 0 and left == []
    ci.shutdown()


def test_prefix_and_turning_them_off(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    start(out, grpc_receiver, metrics_prefix="train.")
    ci.mark("loss", 0.5)
    ci.shutdown()
    assert [p[0] for p in grpc_receiver.wait_for_metric_points(1, "train.")] == ["train.loss"]
    grpc_receiver.clear()
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    start(out, grpc_receiver)
    assert "otlp_metrics" not in ci.health()["sinks"]
    ci.mark("loss", 0.5)
    ci.shutdown()
    grpc_receiver.wait_for_spans(1)
    assert grpc_receiver.metric_requests == []


@pytest.mark.parametrize("kind", [GrpcReceiver, HttpReceiver])
def test_an_endpoint_without_metrics_turns_them_off_quietly(out: Path, kind: type) -> None:
    """Jaeger's own OTLP port takes traces only: a common setup, so no warning, the queue is
    dropped at once (nothing waits for the shutdown deadline), and health() says why."""
    receiver = kind()
    receiver.accept_metrics = False
    with receiver, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start(out, receiver)
        for step in range(3):
            with ci.scope("step", step):
                ci.mark("loss", float(step))
            ci.flush(timeout=10)
        wait_until(lambda: metrics_health()["unsupported"], what="the metrics sink to give up")
        refusals = receiver.metric_refusals if isinstance(receiver, HttpReceiver) else None
        with ci.scope("later"):
            ci.mark("loss", 9.0)
        ci.flush(timeout=10)
        health = metrics_health()
        ci.shutdown()
        assert len(receiver.wait_for_spans(5)) == 5  # the traces are not affected
        if refusals is not None:
            assert receiver.metric_refusals == refusals  # nothing more is sent
    assert health["pending"] == 0 and "does not take OTLP metrics" in health["last_error"]
    assert not list((out / "otlp-metrics-outbox").glob("*.pb"))
    assert [str(w.message) for w in caught if "metric" in str(w.message)] == []
