"""Marks as metrics over OTLP (README, "Marks as metrics"): the OTLP sink's durable delivery
for ExportMetricsServiceRequests.

Every numeric mark becomes one data point (native: `_native.otlp_metrics_encode`, from a
metrics-only encoder state that keeps a scope's points until it closes, when its name and
trace are known); each export also sends the library's health as metrics
(`health_metrics`). The requests travel exactly as the traces' do (`OtlpSink`): through an
outbox of their own (`<output_dir>/otlp-metrics-outbox/`, so a collector outage loses no
point), with the same retry rules, to the metrics endpoint (`OTEL_EXPORTER_OTLP_METRICS_*`).
A sink of its own, on its own worker: the metrics never slow the traces, and metrics off
costs nothing.

Counters count data points (`exported`, `dropped`, `pending`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from cirron_otel import _native
from cirron_otel._version import __version__

from .health_metrics import health_request
from .otlp import OtlpSink
from .otlp_encoding import SCOPE_NAME
from .otlp_transport import SendError, Transport

OUTBOX_DIR = "otlp-metrics-outbox"


class HealthSnapshot(NamedTuple):
    """What the health metrics report: the profiler's `_metrics_health()` tuple, by name."""

    recorded: int
    sinks: dict[str, tuple[int, int]]  # sink name -> (written, dropped), in the sink's unit
    ring_fill: float
    outbox_bytes: int


class OtlpMetricsSink(OtlpSink):
    name = "otlp_metrics"
    takes_snapshots = False  # snapshots are span events, not metrics
    # With its outbox it paces a flat-out producer as the traces' sink does (OtlpSink's
    # backpressure): measured, that loses no point at the same throughput as dropping them.
    outbox_subdir = OUTBOX_DIR

    def __init__(
        self,
        transport: Transport,
        *,
        resource: bytes,
        session_trace: Callable[[], tuple[int, int]],
        prefix: str,
        rank: int,
        metric_attrs: Sequence[str] = (),
        health: Callable[[], tuple[int, dict[str, tuple[int, int]], float, int]] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(transport, resource=resource, session_trace=session_trace, **kwargs)  # type: ignore[arg-type]
        self.state = _native.OtlpState(metrics=True, traces=False, metric_attrs=list(metric_attrs))
        self.prefix = prefix
        self.rank = rank
        self.health = health
        self._session: tuple[int, int, int] | None = None  # (start_ns, hi, lo) of the last session seen
        self.unsupported = False  # the endpoint refused metrics for good (UNIMPLEMENTED, 404)
        self.stats.set(points_dropped=0, health_errors=0, unsupported=False)

    def count(self, batches: Sequence[_native.Batch]) -> int:
        return sum(b.mark_count for b in batches)  # at most one point per mark

    def encode_requests(self, batches: Sequence[_native.Batch], resource: bytes) -> list[tuple[bytes, int]]:
        if self.unsupported:
            return []
        session = self._session_ids()
        # the marks' points are collected by the trace encoder's pass over the batches
        _native.otlp_encode(self.state, batches, resource, SCOPE_NAME, __version__, self.session_trace())
        requests = _native.otlp_metrics_encode(
            self.state,
            resource,
            SCOPE_NAME,
            __version__,
            self.prefix,
            session[0],
            (session[1], session[2]),
            max_request_bytes=self.max_request_bytes,
        )
        if self.health is not None:
            try:
                requests.append((self._health_request(resource, session), 0))
            except Exception as exc:  # the marks' points go on without the health
                self.stats.add(health_errors=1)
                self.stats.error("health metrics failed", exc)
        return requests

    def shutdown(self, timeout: float) -> None:
        """One last health request first: the last export's was taken while the other sinks
        were still writing that export (the spool counts a file once its commit is done). The
        profiler shuts its sinks down in order, the spool and the OTLP traces' before this
        one, so the run's final counts are the ones sent."""
        if self.health is not None and not self.unsupported:
            try:
                self._enqueue([(self._health_request(self.resource, self._session_ids()), 0)])
            except Exception as exc:
                self.stats.add(health_errors=1)
                self.stats.error("health metrics failed", exc)
        super().shutdown(timeout)

    def _session_ids(self) -> tuple[int, int, int]:
        session = _native.session()
        if session is not None:
            self._session = (session.start_ns, int(session.id[:16], 16), int(session.id[16:], 16))
        return self._session or (time.time_ns(), 0, 0)

    def _health_request(self, resource: bytes, session: tuple[int, int, int]) -> bytes:
        assert self.health is not None
        snap = HealthSnapshot(*self.health())
        return health_request(
            resource=resource,
            scope_version=__version__,
            start_ns=session[0],
            now_ns=time.time_ns(),
            rank=self.rank,
            session_id=f"{session[1]:016x}{session[2]:016x}",
            recorded=snap.recorded,
            sinks=snap.sinks,
            ring_fill=snap.ring_fill,
            outbox_bytes=snap.outbox_bytes,
        )

    def _fit(self, request: bytes, spans: int) -> list[tuple[bytes, int]]:
        """The encoder cuts requests at max_request_bytes, between points: one over it is a
        lone point larger than that (its allow-listed attrs), which no split can send."""
        if len(request) <= self.max_request_bytes:
            return [(request, spans)]
        self._drop(
            spans,
            "point too large",
            f"{spans} point(s) in {len(request)} bytes, over {self.max_request_bytes}",
        )
        return []

    def _check(self, data: bytes, spans: int) -> str | None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

        try:
            request = ExportMetricsServiceRequest.FromString(data)
        except Exception as exc:
            return f"not an ExportMetricsServiceRequest ({type(exc).__name__})"
        points = sum(
            len(getattr(m, m.WhichOneof("data")).data_points)
            for rm in request.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.WhichOneof("data")
        )
        if not request.resource_metrics or (spans and points != spans):
            return f"holds {points} points, its name says {spans}"
        return None

    def _settle(self, head: Any, outcome: Any) -> None:
        if not (
            isinstance(outcome, SendError)
            and not outcome.retryable
            and outcome.message.startswith(("gRPC UNIMPLEMENTED", "HTTP 404"))
        ):
            super()._settle(head, outcome)
            return
        # An endpoint that takes traces only (Jaeger's own OTLP port, a collector without a
        # metrics pipeline): not a failure of the program's telemetry, so no warning, but
        # health() says so. Nothing more is made or sent this run: what is queued goes at
        # once (counted as dropped; the spool and the traces keep every mark).
        endpoint = getattr(getattr(self.transport, "config", None), "endpoint", "?")
        with self._cv:
            self.unsupported = True
            dropped = [item for item in self._queue if not item.sending or item is head]
            for item in dropped:
                self._queue.remove(item)
            head.sending = False
            self._cv.notify_all()
        for item in dropped:
            if item.name is not None:
                self._remove(item.name)
        points = sum(item.spans for item in dropped)
        self.stats.add(pending=-points, dropped=points, requests_rejected=1)
        self.stats.set(unsupported=True)
        self.stats.error(
            "metrics not taken",
            f"{endpoint} does not take OTLP metrics ({outcome.message}): marks are not sent as metrics "
            "this run (OTEL_METRICS_EXPORTER=none turns them off)",
            warn=False,
        )

    def _update_counters(self) -> None:
        self.stats.set(points_dropped=self.state.metric_points_dropped)
