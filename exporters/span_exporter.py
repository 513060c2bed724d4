"""Cirron spans through any OpenTelemetry `SpanExporter` named in OTEL_TRACES_EXPORTER.

`OTEL_TRACES_EXPORTER=console` (or any name registered in the `opentelemetry_traces_exporter`
entry points, as the SDK loads them) gets Cirron's spans as SDK `ReadableSpan`s: the native
mapping (`_native.otlp_encode`) decoded by `provider.readable_spans`, under the process's
resource, handed to the exporter's `export` on this sink's worker. `otlp` and `cirron_spool`
never come here: the native OTLP sink and the spool sink serve them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from cirron_otel import _native

from .otlp import encode_resource
from .otlp_encoding import OtlpEncodingSink
from .provider import readable_spans

ENTRY_POINT_GROUP = "opentelemetry_traces_exporter"


def load_span_exporter(name: str) -> Any:
    """A new instance of the SpanExporter registered under `name`, as the SDK's configurator
    makes it (no arguments: exporters configure themselves from the environment)."""
    from importlib.metadata import entry_points

    found = list(entry_points(group=ENTRY_POINT_GROUP, name=name))
    if not found:
        raise LookupError(f"no {ENTRY_POINT_GROUP} entry point named {name!r} is installed")
    return found[0].load()()


class SpanExporterSink(OtlpEncodingSink):
    """Feeds Cirron spans to one SDK SpanExporter; counts spans."""

    backpressure = False

    def __init__(
        self,
        name: str,
        exporter: Any,
        *,
        resource_attrs: dict[str, Any],
        session_trace: Callable[[], tuple[int, int]],
        event_limit: int = 128,
    ) -> None:
        self.name = name
        super().__init__()
        from opentelemetry.sdk.resources import Resource

        self.exporter = exporter
        self.resource = Resource(resource_attrs)
        self._resource_bytes = encode_resource(resource_attrs)
        self.session_trace = session_trace
        self.state = _native.OtlpState(event_limit)
        self.stats.set(unsampled_spans=0)

    def export(self, batches: Sequence[_native.Batch]) -> None:
        spans = self.encode(batches, self._resource_bytes, lambda r: readable_spans(r, self.resource))
        if spans is None:
            return
        self.stats.set(unsampled_spans=self.state.unsampled_spans)
        if not spans:
            return
        try:
            from opentelemetry.sdk.trace.export import SpanExportResult

            result = self.exporter.export(spans)
            ok = result is SpanExportResult.SUCCESS
            why: BaseException | str = f"{type(self.exporter).__name__}.export returned {result!r}"
        except Exception as exc:  # an exporter must not raise; if it does, it is its failure
            ok, why = False, exc
        if ok:
            self.stats.add(exported=len(spans))
        else:
            self.stats.add(failed=1, dropped=len(spans))
        if not ok:
            self.stats.error("export failed", why)
        _native.progress()

    def shutdown(self, timeout: float) -> None:
        with contextlib.suppress(Exception):
            self.exporter.force_flush(int(timeout * 1000))
        with contextlib.suppress(Exception):
            self.exporter.shutdown()
