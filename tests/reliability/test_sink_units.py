"""A drop is counted in the unit of the sink that lost it: spans for OTLP, records for the spool."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from cirron_otel.exporters.otlp import OtlpSink

from cirron_otel import _native
from cirron_otel._drainer import SinkWorker
from cirron_otel.sink import Sink
from tests.support.helpers import drained_batch

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


def _drops_when_full(unit_of: type[Sink]) -> int:
    sink = _Stuck(unit_of)
    worker = SinkWorker(sink, max_queued_records=100, retry_interval=0.05)
    worker.start()
    try:
        first = drained_batch(10)  # 30 records: taken by the stuck export
        assert worker.submit([first], len(first)) > 0
        assert sink.entered.wait(10)
        queued = drained_batch(20)  # 60 records: waits in the queue
        assert worker.submit([queued], len(queued)) > 0
        over = drained_batch(20)  # 60 more: over the 100-record bound, dropped
        assert worker.submit([over], len(over)) == -1
        return sink.stats.dropped
    finally:
        sink.release.set()
        worker.stop(10)


def test_otlp_counts_a_full_worker_queue_in_spans() -> None:
    assert _drops_when_full(OtlpSink) == 20  # the 20 spans, not their 60 records


def test_other_sinks_count_records() -> None:
    assert _drops_when_full(Sink) == 60


def test_the_metrics_sink_counts_marks() -> None:
    from cirron_otel.exporters.otlp_metrics import OtlpMetricsSink

    assert _drops_when_full(OtlpMetricsSink) == 40  # the 40 marks of the dropped batch


class _BadCount(_Stuck):
    def count(self, batches: Sequence[_native.Batch]) -> int:
        raise TypeError("a bug in a sink's count()")


def test_a_sink_whose_count_fails_costs_no_other_sink_a_record() -> None:
    # Once, a sink's count() raised in the drainer: the drain cycle stopped there and the
    # records still in the rings at exit were lost to every sink, uncounted.
    from cirron_otel._drainer import Drainer, TraceStore

    bad, good = _BadCount(Sink), _Collect()
    drainer = Drainer([bad, good], flush_interval=0.05, max_records=100, trace_store=TraceStore(10))
    drainer.workers[0].max_queued_records = 100  # the bad sink's queue fills; the good one's never does
    drainer.start()
    try:
        first = drained_batch(10)
        drainer._pending, drainer._pending_records = [first], len(first)
        drainer._export()
        assert bad.entered.wait(10)  # the bad sink is stuck: its queue fills from now on
        for _ in range(3):
            batch = drained_batch(20)
            drainer._pending, drainer._pending_records = [batch], len(batch)
            drainer._export()  # over the bad sink's bound: its drop is counted, in records
        assert drainer.cycle_errors == 0
        assert bad.stats.dropped > 0
        assert good.done.wait(10), good.records
        assert good.records == 30 + 3 * 60  # every record reached the other sink
    finally:
        bad.release.set()
        drainer.stop(10)


class _Collect(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.records = 0
        self.done = threading.Event()

    def export(self, batches: Sequence[_native.Batch]) -> None:
        self.records += sum(len(b) for b in batches)
        if self.records >= 210:
            self.done.set()
