"""The one place a sink runs the native OTLP mapping (`_native.otlp_encode`) and counts a
failure: the OTLP sink, the TracerProvider sink and the SpanExporter sink share it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cirron_otel import _native
from cirron_otel._version import __version__
from cirron_otel.sink import Sink

SCOPE_NAME = "cirron_otel"


class OtlpEncodingSink(Sink):
    """A sink fed through the native OTLP mapping; subclasses set `state` (the encoder's
    per-sink state) and `session_trace` in their constructor."""

    state: _native.OtlpState
    session_trace: Callable[[], tuple[int, int]]

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
        trace = self.session_trace()
        return _native.otlp_encode(self.state, batches, resource, SCOPE_NAME, __version__, trace)
