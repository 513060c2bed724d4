"""A drop is counted in the unit of the sink that lost it: spans for OTLP, records for the spool."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from cirron_otel.exporters.otlp import OtlpSink

import cirron_otel as ci
from cirron_otel import _native
from cirron_otel._drainer import SinkWorker
from cirron_otel.sink import Sink

# the drop is expected: it warns once (CirronWarning), and is asserted through the counters
pytestmark = pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning")


class _Stuck(Sink):
    """A sink whose first export blocks until released, so the worker's queue fills."""

    def __init__(self, unit_of: type[Sink]) -> None:
        super().__init__()
        self.unit_of = unit_of
        self.entered = threading.Event()
        self.release = threading.Event()

    def count(self, batches: Sequence[_native.Batch]) -> int:
        return self.unit_of.count(self, batches)  # type: ignore[arg-type]

    def export(self, batches: Sequence[_native.Batch]) -> None:
        self.entered.set()
        self.release.wait(30)


def _batch(scopes: int) -> _native.Batch:
    while _native.drain(1_000_000) is not None:  # whatever earlier tests left in the rings
        pass
    for i in range(scopes):  # before profile(): recorded into the ring, collected by hand
        with ci.scope("s"):
            ci.mark("m", i)
            ci.mark("m2", i)
    batch = _native.drain(1_000_000)
    assert batch is not None and batch.span_count == scopes and batch.mark_count == 2 * scopes
    return batch


def _drops_when_full(unit_of: type[Sink]) -> int:
    sink = _Stuck(unit_of)
    worker = SinkWorker(sink, max_queued_records=100, retry_interval=0.05)
    worker.start()
    try:
        first = _batch(10)  # 30 records: taken by the stuck export
        assert worker.submit([first], len(first)) > 0
        assert sink.entered.wait(10)
        queued = _batch(20)  # 60 records: waits in the queue
        assert worker.submit([queued], len(queued)) > 0
        over = _batch(20)  # 60 more: over the 100-record bound, dropped
        assert worker.submit([over], len(over)) == -1
        return sink.stats.dropped
    finally:
        sink.release.set()
        worker.stop(10)


def test_otlp_counts_a_full_worker_queue_in_spans() -> None:
    assert _drops_when_full(OtlpSink) == 20  # the 20 spans, not their 60 records


def test_other_sinks_count_records() -> None:
    assert _drops_when_full(Sink) == 60
