"""The drainer: one background thread that moves records from the rings to the sinks.

Each cycle it sleeps in native code (no GIL) until a producer crosses its ring's high-water
mark or the tick passes, collects (`_native.collect`, mostly without the GIL), and hands
the batches to every sink once `flush_interval` has passed, a file's worth is waiting, or
someone asked for a flush.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

from . import _native
from ._warn import warn_once
from .exporters.base import Sink

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


class Drainer(threading.Thread):
    def __init__(
        self,
        sinks: Sequence[Sink],
        *,
        flush_interval: float,
        max_records: int,
        trace_store: TraceStore,
    ) -> None:
        super().__init__(name="cirron-otel-drainer", daemon=True)
        self.sinks = list(sinks)
        self.flush_interval = flush_interval
        self.max_records = max_records
        self.trace_store = trace_store
        self.cycle_errors = 0
        self.exports = 0
        self._pending: list[_native.Batch] = []
        self._pending_records = 0
        self._requests: list[threading.Event] = []
        self._requests_lock = threading.Lock()
        self._stopping = False
        self._last_export = time.monotonic()

    # -- called from other threads --------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Collect and export everything recorded before this call; False on timeout."""
        if threading.current_thread() is self:
            self._cycle(drain_all=True)
            return True
        if not self.is_alive():
            return False
        done = threading.Event()
        with self._requests_lock:
            self._requests.append(done)
        _native.wake()
        return done.wait(timeout)

    def stop(self, timeout: float) -> bool:
        self._stopping = True
        _native.wake()
        if threading.current_thread() is not self:
            self.join(timeout)
        return not self.is_alive()

    # -- the thread -----------------------------------------------------------------------

    def run(self) -> None:
        while True:
            _native.wait(min(_TICK, self.flush_interval))
            with self._requests_lock:
                requests, self._requests = self._requests, []
            stopping = self._stopping
            self._cycle(drain_all=bool(requests) or stopping)
            for done in requests:
                done.set()
            if stopping:
                return

    def _cycle(self, *, drain_all: bool) -> None:
        try:
            self._collect(drain_all)
            now = time.monotonic()
            due = now - self._last_export >= self.flush_interval
            if self._pending and (drain_all or due or self._pending_records >= self.max_records):
                self._export()
                self._last_export = now
            elif due:
                for sink in self.sinks:
                    sink.retry()
                self._last_export = now
            _native.free_orphans()
        except Exception as exc:  # the drainer must outlive any bug in a sink
            self.cycle_errors += 1
            warn_once("drainer", f"cirron_otel: drainer cycle failed: {type(exc).__name__}: {exc}")

    def _collect(self, drain_all: bool) -> None:
        # With drain_all, take everything recorded up to now, but not what producers keep
        # adding while we work (a flat-out producer would keep us here forever).
        rounds = _native.pending() // self.max_records + 2 if drain_all else 8
        for _ in range(rounds):
            batch = _native.collect(self.max_records)
            if batch is None:
                return
            self._pending.append(batch)
            self._pending_records += len(batch)
            if self._pending_records >= self.max_records:
                self._export()
                self._last_export = time.monotonic()

    def _export(self) -> None:
        batches, self._pending = self._pending, []
        self._pending_records = 0
        for sink in self.sinks:
            try:
                sink.export(batches)
            except Exception as exc:
                sink.stats.error("export raised", exc)
        self.trace_store.add(batches)
        self.exports += 1
