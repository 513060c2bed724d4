"""The interface between the drainer and a sink, and the registry the profiler makes sinks from.

The producer side (this package) owns this interface; the consumer side (`exporters/`,
installed as `cirron_otel.exporters`) implements it. The producer never imports a sink's
module by name: it asks `make_sink` for one, and the module is imported then, so a sink the
program does not use costs nothing at start-up.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

from ._native import Batch
from ._threads import BackgroundThread as BackgroundThread  # for sinks with threads
from ._warn import warn_once

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up cost)
if TYPE_CHECKING:
    from typing import Any

    from ._config import Settings


# cirron-sdk's SnapshotBuffer soft cap: snapshots waiting for a sink's next export
SNAPSHOTS_PENDING_MAX = 100_000


class Snapshot:
    """One weight / gradient snapshot record (cirron_otel._snapshots makes them): `record` is
    the spool's snapshot record, `json` its encoding, `stats` the statistics as computed
    (non-finite values as they are, for OpenTelemetry), `span` the epoch span's id halves
    (the OpenTelemetry span) and whether it is sampled. A plain class (start-up cost)."""

    __slots__ = ("json", "record", "sampled", "span_hi", "span_lo", "stats")

    def __init__(
        self, record: dict[str, Any], json: bytes, stats: dict[str, Any] | None, span: tuple[int, int, bool]
    ) -> None:
        self.record = record
        self.json = json
        self.stats = stats
        self.span_hi, self.span_lo, self.sampled = span


class SinkStats:
    """Counters a sink reports in `health()["sinks"][name]`. Counts are in the sink's unit
    (`Sink.count`: records, spans + marks, by default; spans for OTLP).

    Every change goes through `add`, `set` or `error`, under this object's own lock, so a
    counter has exactly one guard whichever thread (drainer, sink worker, sender) counts.
    A plain class (importing `dataclasses` costs ~7 ms of every profiled program's start-up).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.exported = 0
        self.failed = 0
        self.dropped = 0
        self.pending = 0
        self.last_error: str | None = None
        self.extra: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"SinkStats(name={self.name!r}, exported={self.exported}, failed={self.failed}, "
            f"dropped={self.dropped}, pending={self.pending}, last_error={self.last_error!r}, "
            f"extra={self.extra!r})"
        )

    def add(
        self, *, exported: int = 0, failed: int = 0, dropped: int = 0, pending: int = 0, **extra: int
    ) -> None:
        """Add to the counters at once (negative `pending` for what left the sink); `extra`
        names counters of `self.extra`, which must have been given a starting value."""
        with self._lock:
            self.exported += exported
            self.failed += failed
            self.dropped += dropped
            self.pending += pending
            for key, value in extra.items():
                self.extra[key] += value

    def set(self, **values: Any) -> None:
        """Set values of `self.extra`: a sink's own counters at their start (before `add`),
        or values that are not running counts (a state, a reason)."""
        with self._lock:
            self.extra.update(values)

    def error(self, kind: str, exc: BaseException | str, *, warn: bool = True) -> None:
        """Record a failure and warn once per (sink, kind), unless `warn` is False (an expected
        condition, kept in `last_error` for health() only). Never raises."""
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.last_error = f"{kind}: {text}"
        if warn:
            warn_once(f"{self.name}:{kind}", f"cirron_otel {self.name} sink: {kind}: {text}")

    def get(self, key: str) -> Any:
        """One value of `self.extra`, read under the lock."""
        with self._lock:
            return self.extra[key]

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "exported": self.exported,
                "failed": self.failed,
                "dropped": self.dropped,
                "pending": self.pending,
                "last_error": self.last_error,
                **self.extra,
            }


class Sink(ABC):
    """Receives every batch the drainer collects, on the sink's own worker thread.

    `export` must not raise: a sink records its own failures in `stats` and keeps what it
    could not deliver for a later attempt, within its own bounds.
    """

    name: str = "sink"
    # True: when this sink falls behind, the drainer stops claiming records, so the rings
    # fill and producers wait briefly (the spool: durable data is never dropped for speed).
    # False: what the sink cannot keep up with is dropped and counted.
    backpressure: bool = False
    # True: the sink is handed the weight / gradient snapshots captured at epoch ends
    # (`add_snapshots`) and takes them with `take_snapshots` in its next `export`.
    takes_snapshots: bool = False

    def __init__(self) -> None:
        self.stats = SinkStats(self.name)
        self._snapshots: list[Snapshot] = []
        self._snapshots_lock = threading.Lock()
        if self.takes_snapshots:
            self.stats.set(snapshots_dropped=0)

    def add_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        """Snapshots captured at an epoch end (any thread), for the next `export`: at most
        SNAPSHOTS_PENDING_MAX wait (cirron-sdk's buffer cap), the newest beyond are dropped
        and counted (`snapshots_dropped`)."""
        with self._snapshots_lock:
            room = max(0, SNAPSHOTS_PENDING_MAX - len(self._snapshots))
            self._snapshots.extend(snapshots[:room])
        if len(snapshots) > room:
            self.stats.add(snapshots_dropped=len(snapshots) - room)

    def take_snapshots(self) -> list[Snapshot]:
        """The snapshots added since the last call, oldest first (on the sink's worker).
        Captured before their epoch span closed, they reach the sink no later than it."""
        with self._snapshots_lock:
            out, self._snapshots = self._snapshots, []
        return out

    @abstractmethod
    def export(self, batches: Sequence[Batch]) -> None:
        """Deliver these batches (each batch is handed over exactly once)."""

    def count(self, batches: Sequence[Batch]) -> int:
        """How many of this sink's counting units the batches hold (records by default; the
        OTLP sink counts spans), so a drop anywhere is counted in the sink's own unit."""
        return sum(len(b) for b in batches)

    def outbox_bytes(self) -> int:
        """Bytes waiting on disk for delivery (the OTLP outbox); reported in the health metrics."""
        return 0

    def retry(self) -> None:  # noqa: B027 - optional hook
        """Try again what earlier exports could not deliver."""

    def settle(self) -> None:  # noqa: B027 - optional hook
        """Finish what `export` left in flight (the spool's last commit): the worker calls it
        whenever its queue runs empty, so `export` may return before its last write is
        durable, overlapping it with the next export. `wait_idle` must wait for it."""

    def wait_idle(self, timeout: float) -> bool:
        """After a flush: wait until what was handed over is delivered, or it fails."""
        return True

    def shutdown(self, timeout: float) -> None:  # noqa: B027 - optional hook
        """Deliver what is pending, within `timeout` seconds, and release resources."""

    def before_fork(self) -> None:  # noqa: B027 - optional hook
        """The process is about to fork (on the forking thread): leave nothing half done that
        the child cannot survive. Must be quick: fork waits for it."""

    def after_fork_in_parent(self) -> None:  # noqa: B027 - optional hook
        """The fork is done, in the parent: carry on."""

    def at_exit(self) -> None:  # noqa: B027 - optional hook
        """The process is exiting (called before `shutdown`): do not wait for a destination
        that is failing; what is durable waits for the next run."""


# The sinks the profiler can make: kind -> "module:factory". A factory takes the settings
# and keyword arguments (see `cirron_otel.exporters.factories`) and returns a Sink; its
# module is imported on first use only. "setup" runs once before a profiler makes its sinks.
SINK_FACTORIES: dict[str, str] = {
    "setup": "cirron_otel.exporters.factories:setup",
    "spool": "cirron_otel.exporters.factories:spool",
    "otlp": "cirron_otel.exporters.factories:otlp",
    "otlp_metrics": "cirron_otel.exporters.factories:otlp_metrics",
    "tracer_provider": "cirron_otel.exporters.factories:tracer_provider",
    "span_exporter": "cirron_otel.exporters.factories:span_exporter",
}


def _factory(kind: str) -> Any:
    module, _, name = SINK_FACTORIES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def setup_sinks(settings: Settings) -> None:
    """Process-wide choices every sink follows (e.g. the file mode of spool directories)."""
    _factory("setup")(settings)


def make_sink(kind: str, settings: Settings, **kwargs: Any) -> Sink:
    """A new sink of `kind` (a key of SINK_FACTORIES) for these settings."""
    sink: Sink = _factory(kind)(settings, **kwargs)
    return sink
