"""The drainer: moves records from the rings to the sinks, off the application's threads.

Two kinds of thread:
- the drainer sleeps in native code (no GIL) until a producer crosses its ring's
  high-water mark or the tick passes, then claims records (natively, mostly without
  the GIL) and hands them to every sink worker once `flush_interval` has passed, a file's
  worth is waiting, or someone asked for a flush;
- one worker per sink, so a slow or failing sink never holds up the drainer or another
  sink. A worker's queue is bounded: a sink with `backpressure` (the spool) makes the
  drainer stop claiming until it catches up, so the rings fill and producers wait briefly
  rather than lose data; any other sink drops what it cannot take, and counts it.

("Collector", in this project, means only the OpenTelemetry Collector in `deploy/`.)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from . import _native
from ._threads import BackgroundThread
from ._warn import warn_once
from .sink import Sink

_TICK = 0.05


class TraceStore:
    """The most recent batches of the live session, for `ci.trace()`; bounded by records."""

    def __init__(self, max_records: int) -> None:
        self._max = max_records
        self._batches: deque[_native.Batch] = deque()
        self._records = 0
        self._lock = threading.Lock()

    def add(self, batches: Sequence[_native.Batch]) -> None:
        with self._lock:
            for b in batches:
                self._batches.append(b)
                self._records += len(b)
            while self._records > self._max and len(self._batches) > 1:
                self._records -= len(self._batches.popleft())

    def snapshot(self) -> list[_native.Batch]:
        with self._lock:
            return list(self._batches)


class SinkWorker(BackgroundThread):
    """Feeds one sink from a bounded queue of batch lists."""

    def __init__(self, sink: Sink, *, max_queued_records: int, retry_interval: float) -> None:
        super().__init__(name=f"cirron-otel-{sink.name}", daemon=True)
        self.sink = sink
        self.max_queued_records = max_queued_records
        self.retry_interval = retry_interval
        self._queue: deque[tuple[int, list[_native.Batch], int]] = deque()
        self._queued_records = 0
        self._submitted = 0
        self._done = 0
        self._cv = threading.Condition()
        self._stopping = False

    def full(self) -> bool:
        return self._queued_records >= self.max_queued_records

    def submit(self, batches: list[_native.Batch], records: int) -> int:
        """Queue batches; returns a ticket for `wait_done`, or -1 if dropped (queue full)."""
        with self._cv:
            if (
                self._queued_records
                and self._queued_records + records > self.max_queued_records
                and not self.sink.backpressure
            ):
                self.sink.stats.add(dropped=_count(self.sink, batches))
                self.sink.stats.error("queue full", f"{records} records dropped: the sink is behind")
                return -1
            self._submitted += 1
            self._queue.append((self._submitted, batches, records))
            self._queued_records += records
            self._cv.notify_all()
            return self._submitted

    def wait_done(self, ticket: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._done < ticket:
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    return False
                self._cv.wait(left)
        return True

    def stop(self, timeout: float) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if (
            threading.current_thread() is not self and self.ident is not None
        ):  # never started: nothing to join
            self.join(timeout)

    def run(self) -> None:
        while True:
            with self._cv:
                idle = not self._queue
            if idle:
                self._settle()  # the queue ran dry: finish what the last export left in flight
            with self._cv:
                if not self._queue and not self._stopping:
                    self._cv.wait(self.retry_interval)
                if not self._queue:
                    if self._stopping:
                        return
                    item = None
                else:
                    item = self._queue[0]
            try:
                if item is None:
                    self.sink.retry()
                else:
                    self.sink.export(item[1])
                    _native.progress()
            except Exception as exc:  # a sink bug must not kill its worker
                self.sink.stats.error("export raised", exc)
            if item is not None:
                with self._cv:
                    self._queue.popleft()
                    self._queued_records -= item[2]
                    self._done = item[0]
                    self._cv.notify_all()

    def _settle(self) -> None:
        try:
            self.sink.settle()
        except Exception as exc:  # a sink bug must not kill its worker
            self.sink.stats.error("settle raised", exc)


class Drainer(BackgroundThread):
    """The drainer thread (see the module docstring)."""

    def __init__(
        self,
        sinks: Sequence[Sink],
        *,
        flush_interval: float,
        max_records: int,
        trace_store: TraceStore,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="cirron-otel-drainer", daemon=True)
        self.on_tick = on_tick  # the profiler's watch over signals (called every tick)
        self.flush_interval = flush_interval
        self.max_records = max_records
        self.trace_store = trace_store
        self.workers = [
            SinkWorker(s, max_queued_records=8 * max_records, retry_interval=flush_interval) for s in sinks
        ]
        self.cycle_errors = 0
        self.exports = 0
        self._pending: list[_native.Batch] = []
        self._pending_records = 0
        self._requests: list[threading.Event] = []  # flush(): claim, export, deliver
        self._claims: list[threading.Event] = []  # claim(): claim only
        self._requests_lock = threading.Lock()
        self._stopping = False
        self._last_export = time.monotonic()
        self._tickets: dict[SinkWorker, int] = {}  # newest ticket per worker (FIFO queues)

    def start(self) -> None:
        for w in self.workers:
            w.start()
        super().start()

    # -- called from other threads --------------------------------------------------------

    def on_own_thread(self) -> bool:
        """True on the drainer or a sink worker: user code reached from there (an attr's
        `__str__`, a span processor) must not wait for those threads, nor re-enter the
        native claim step."""
        me = threading.current_thread()
        return me is self or any(me is w for w in self.workers)

    def flush(self, timeout: float) -> bool:
        """Deliver everything recorded before this call to every sink; False on timeout."""
        deadline = time.monotonic() + timeout
        if not self._ask(self._requests, timeout, "flush"):
            return False
        return self._wait_workers(deadline)

    def claim(self, timeout: float) -> bool:
        """Claim everything recorded before this call from the rings (its marks get their
        ids), without waiting for the sinks nor exporting early; False on timeout."""
        return self._ask(self._claims, timeout, "claim")

    def recent_batches(self) -> list[_native.Batch]:
        """The batches claimed and not yet exported, then the trace store's; newest last."""
        pending = list(self._pending)  # read first: an export moves them to the store
        return self.trace_store.snapshot() + pending

    def _ask(self, requests: list[threading.Event], timeout: float, what: str) -> bool:
        """Queue a request for the next cycle and wait for it."""
        if self.on_own_thread():
            # the drainer may be inside its native claim step (holding its mutex) and a worker
            # would wait for itself: either deadlocks, so refuse at once
            warn_once(
                f"reentrant-{what}",
                f"cirron_otel: {what}() called from cirron_otel's own thread "
                "(e.g. inside an attribute's __str__); ignored",
            )
            return False
        if not self.is_alive():
            return False
        done = threading.Event()
        with self._requests_lock:
            requests.append(done)
        _native.wake()
        return done.wait(timeout)

    def stop(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        self._stopping = True
        _native.wake()
        if (
            threading.current_thread() is not self and self.ident is not None
        ):  # never started: nothing to join
            self.join(timeout)
        self._wait_workers(deadline)
        for w in self.workers:
            w.stop(max(0.0, deadline - time.monotonic()))
        return not self.is_alive()

    def _wait_workers(self, deadline: float) -> bool:
        ok = True
        for worker, ticket in list(self._tickets.items()):
            ok = worker.wait_done(ticket, max(0.0, deadline - time.monotonic())) and ok
        return ok

    # -- the thread -----------------------------------------------------------------------

    def run(self) -> None:
        while True:
            _native.wait(min(_TICK, self.flush_interval))
            if self.on_tick is not None:
                try:
                    self.on_tick()
                except Exception:  # the drainer must outlive any bug
                    self.cycle_errors += 1
            with self._requests_lock:
                requests, self._requests = self._requests, []
                claims, self._claims = self._claims, []
            stopping = self._stopping
            self._cycle(drain_all=bool(requests) or stopping, claim_all=bool(claims))
            for done in requests + claims:
                done.set()
            if stopping:
                return

    def _cycle(self, *, drain_all: bool, claim_all: bool = False) -> None:
        try:
            self._claim(drain_all or claim_all)
            now = time.monotonic()
            # drain_all also hands every sink an empty delivery when nothing is new, so a
            # sink holding back records after a failure tries them again now.
            if drain_all or (self._pending and now - self._last_export >= self.flush_interval):
                self._export()
            _native.free_orphans()
        except Exception as exc:  # the drainer must outlive any bug
            self.cycle_errors += 1
            warn_once("drainer", f"cirron_otel: drainer cycle failed: {type(exc).__name__}: {exc}")

    def _claim(self, drain_all: bool) -> None:
        # drain_all takes everything recorded up to now, but not what producers keep adding
        # while we work (a flat-out producer would keep us here forever).
        rounds = _native.pending() // self.max_records + 2 if drain_all else 8
        for _ in range(rounds):
            if not drain_all and any(w.full() and w.sink.backpressure for w in self.workers):
                return  # the spool is behind: let the rings hold the records meanwhile
            batch = _native.drain(self.max_records)
            if batch is None:
                return
            self._pending.append(batch)
            self._pending_records += len(batch)
            if self._pending_records >= self.max_records:
                self._export()

    def _export(self) -> None:
        batches, records = self._pending, self._pending_records
        self._pending, self._pending_records = [], 0
        self._last_export = time.monotonic()
        for w in self.workers:
            # One sink's bug must not cost the others these records (nor abort the drain,
            # which would leave records in the rings at exit): counted as its own drop.
            try:
                ticket = w.submit(batches, records)
            except Exception as exc:
                w.sink.stats.add(dropped=_count(w.sink, batches))
                w.sink.stats.error("hand-over failed", exc)
                continue
            if ticket > 0:
                self._tickets[w] = ticket
        self.trace_store.add(batches)
        self.exports += 1


def _count(sink: Sink, batches: Sequence[_native.Batch]) -> int:
    """`sink.count(batches)`, or the records when the sink's own count fails."""
    try:
        return sink.count(batches)
    except Exception:
        return sum(len(b) for b in batches)
