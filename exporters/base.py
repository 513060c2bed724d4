"""The interface between the drainer and a sink."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

from cirron_otel._native import Batch
from cirron_otel._warn import warn_once

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up cost)
if TYPE_CHECKING:
    from typing import Any


class SinkStats:
    """Counters a sink reports in `health()["sinks"][name]`. Counts are in the sink's unit
    (`Sink.count`: records, spans + marks, by default; spans for OTLP).

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
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"SinkStats(name={self.name!r}, exported={self.exported}, failed={self.failed}, "
                f"dropped={self.dropped}, pending={self.pending}, last_error={self.last_error!r}, "
                f"extra={self.extra!r})")

    def error(self, kind: str, exc: BaseException | str) -> None:
        """Record a failure and warn once per (sink, kind). Never raises."""
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.last_error = f"{kind}: {text}"
        warn_once(f"{self.name}:{kind}", f"cirron_otel {self.name} sink: {kind}: {text}")

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "exported": self.exported,
                "failed": self.failed,
                "dropped": self.dropped,
                "pending": self.pending,
                "last_error": self.last_error,
                **self.extra,
            }


class Sink(ABC):
    """Receives every batch the drainer collects, on the drainer thread.

    `export` must not raise: a sink records its own failures in `stats` and keeps what it
    could not deliver for a later attempt, within its own bounds.
    """

    name: str = "sink"
    # True: when this sink falls behind, the collector stops claiming records, so the rings
    # fill and producers wait briefly (the spool: durable data is never dropped for speed).
    # False: what the sink cannot keep up with is dropped and counted.
    backpressure: bool = False

    def __init__(self) -> None:
        self.stats = SinkStats(self.name)

    @abstractmethod
    def export(self, batches: Sequence[Batch]) -> None:
        """Deliver these batches (each batch is handed over exactly once)."""

    def count(self, batches: Sequence[Batch]) -> int:
        """How many of this sink's counting units the batches hold (records by default; the
        OTLP sink counts spans), so a drop anywhere is counted in the sink's own unit."""
        return sum(len(b) for b in batches)

    def retry(self) -> None:  # noqa: B027 - optional hook
        """Try again what earlier exports could not deliver."""

    def wait_idle(self, timeout: float) -> bool:
        """After a flush: wait until what was handed over is delivered, or it fails."""
        return True

    def shutdown(self, timeout: float) -> None:  # noqa: B027 - optional hook
        """Deliver what is pending, within `timeout` seconds, and release resources."""

    def at_exit(self) -> None:  # noqa: B027 - optional hook
        """The process is exiting (called before `shutdown`): do not wait for a destination
        that is failing; what is durable waits for the next run."""
