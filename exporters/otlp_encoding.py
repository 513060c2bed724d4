"""The one place a sink runs the native OTLP mapping (`_native.otlp_encode`) and counts a
failure: the OTLP sink, the TracerProvider sink and the SpanExporter sink share it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cirron_otel import _native
from cirron_otel._version import __version__
from cirron_otel.sink import Sink, Snapshot

SCOPE_NAME = "cirron_otel"
# a snapshot's spool fields that become its event's attributes (its stats follow)
_SNAPSHOT_FIELDS = ("id", "tensor_name", "shape", "dtype", "mode", "blob_uri")


def snapshot_event_attrs(snapshot: Snapshot) -> dict[str, Any]:
    """A snapshot's span event attributes: `cirron.snapshot.<field>` for the spool record's
    fields and statistics, nested ones dotted (`histogram.bins`, `finite.mean`); non-finite
    statistics as the doubles themselves (as a mark's value), absent values left out."""
    prefix = _native.KEY_SNAPSHOT_PREFIX
    attrs: dict[str, Any] = {}
    for key in _SNAPSHOT_FIELDS:
        value = snapshot.record.get(key)
        if value is not None:
            attrs[prefix + key] = value

    def flat(stats: dict[str, Any], at: str) -> None:
        for key, value in stats.items():
            if isinstance(value, dict):
                flat(value, f"{at}{key}.")
            elif value is not None:
                attrs[at + key] = value

    flat(snapshot.stats or {}, prefix)
    return attrs


class OtlpEncodingSink(Sink):
    """A sink fed through the native OTLP mapping; subclasses set `state` (the encoder's
    per-sink state) and `session_trace` in their constructor. Snapshots become `cirron.snapshot`
    events on their epoch span."""

    state: _native.OtlpState
    session_trace: Callable[[], tuple[int, int]]
    takes_snapshots = True
    # where the encoder starts a new request (it cuts between spans, so one may be a span over)
    request_cut_bytes = 1 << 20

    def count(self, batches: Sequence[_native.Batch]) -> int:
        return sum(b.span_count for b in batches)  # every counter of these sinks is in spans

    def encode(
        self,
        batches: Sequence[_native.Batch],
        resource: bytes,
        decode: Callable[[bytes], list[Any]] | None = None,
    ) -> list[Any] | None:
        """The batches as `(request, units)` pairs, or with `decode` the items it makes of
        each request (SDK spans); None when that failed: what they hold is counted as
        dropped (in the sink's unit, `count`) and the failure is recorded."""
        try:
            requests = self.encode_requests(batches, resource)
            if decode is None:
                return requests
            return [item for request, _ in requests for item in decode(request)]
        except Exception as exc:
            self.stats.add(dropped=self.count(batches))
            self.stats.error("encoding failed", exc)
            return None

    def encode_requests(self, batches: Sequence[_native.Batch], resource: bytes) -> list[tuple[bytes, int]]:
        """The OTLP requests for the batches (traces; the metrics sink makes metrics)."""
        # Captured before their epoch span closed: on it by the time it is encoded here.
        for snap in self.take_snapshots():
            if snap.sampled:
                ts = snap.record["ts_ns"]
                attrs = snapshot_event_attrs(snap)
                _native.otlp_add_event(
                    self.state, snap.span_hi, snap.span_lo, ts, _native.EVENT_SNAPSHOT, attrs
                )
        trace = self.session_trace()
        return _native.otlp_encode(
            self.state, batches, resource, SCOPE_NAME, __version__, trace, self.request_cut_bytes
        )
