"""`SpoolSpanExporter`: spans from any OpenTelemetry instrumentation, written to the Cirron spool v1.

The inverse of the Cirron → OpenTelemetry mapping (README, "OpenTelemetry"):

- a span Cirron produced (attribute `cirron.span_id`) keeps its 32-hex spool id; any other
  span gets its 16-hex span id + the first 16 hex of its trace id. A parent id is built the
  same way from the parent span context, except that a parent seen earlier as a Cirron span
  resolves to its full spool id (a bounded in-memory map), and a Cirron span that started a
  trace of its own (no parent, `cirron.session.id`) gets the session as its parent;
- `cirron.index`, `thread.id`, `cirron.rank`, `cirron.cpu_ns` / `cirron.gpu_ns` become the span
  record's fields; the other attributes its attrs, except, on a span Cirron produced, the
  ones its mapping adds and the spool has no place for (`thread.name`, `code.*`); status
  ERROR adds `error`, `error.type`, `error.message` (from the `exception` event, which is not
  kept as a mark, else the status description);
- events carrying `cirron.mark.*` become the original marks (id, typed value, kind, attrs);
  `cirron.summary.<name>` attributes become summary marks; any other event becomes a string
  mark named after the event, whose value is that name and whose attrs are its attributes.

Each `export()` call writes one batch file (several past 100,000 records) through
`SpoolDirectory`, so files are atomic, durable and under the byte cap like the SpoolSink's.
Registered as the `cirron_spool` traces exporter, so `OTEL_TRACES_EXPORTER=cirron_spool`
works under `opentelemetry-instrument`; the output directory is `$CIRRON_OUTPUT_DIR` or
`./.cirron`.

Not twice: in a program that also calls `ci.profile()`, Cirron's spans reach this exporter
through the app's TracerProvider (instrumentation scope `cirron_otel`) while the profiler's
own spool sink writes them natively. While a profiler of this process writes the same spool
directory, those spans are skipped here (counted in `skipped_spans`); every other span is
written.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext, StatusCode

from cirron_otel import _native, _profiler
from cirron_otel._config import DEFAULT_SPOOL_MAX_BYTES, MAX_RECORDS_PER_FILE
from cirron_otel._config import default_output_dir as _default_output_dir
from cirron_otel._version import __version__

from .spool_dir import SpoolDirectory, new_file_name

SCHEMA_VERSION = 1
CIRRON_SCOPE = "cirron_otel"  # the instrumentation scope of the spans profile() produces
STRING_CAP = 256  # UTF-8 bytes of a mark's string value, and of error.message
ID_MAP_SIZE = 65_536  # Cirron span ids remembered for resolving later children's parents
MAX_DEPTH = 32  # nesting of attribute values written as JSON; deeper becomes str()

# The mapping's attribute keys are defined once, in the native module (mapping.h).
MARK_VALUE = _native.KEY_MARK_VALUE
MARK_KIND = _native.KEY_MARK_KIND
MARK_ID = _native.KEY_MARK_ID
MARK_KEYS = frozenset({MARK_VALUE, MARK_KIND, MARK_ID})
SUMMARY_PREFIX = _native.KEY_SUMMARY_PREFIX
SPAN_ID = _native.KEY_SPAN_ID
SESSION_ID = _native.KEY_SESSION_ID
# Attributes the Cirron mapping adds to a span: fields of the spool record, not attrs.
FIELD_KEYS = frozenset(
    {
        _native.KEY_INDEX,
        SPAN_ID,
        _native.KEY_THREAD_ID,
        _native.KEY_RANK,
        _native.KEY_CPU_NS,
        _native.KEY_GPU_NS,
        SESSION_ID,
    }
)
# Attributes the Cirron mapping adds to a span that the spool does not keep at all (the
# thread's name; a decorated function's code location): left out of a Cirron span's attrs.
MAPPING_ONLY_KEYS = FIELD_KEYS | {
    _native.KEY_THREAD_NAME,
    _native.KEY_CODE_FUNCTION,
    _native.KEY_CODE_FILE,
    _native.KEY_CODE_LINE,
}

Record = dict[str, Any]
Unit = list[Record]  # a span record followed by its marks

_HEX32 = re.compile(r"[0-9a-f]{32}")


def default_output_dir() -> str:
    """`$CIRRON_OUTPUT_DIR`, else `./.cirron` (the same rule as `profile(output_dir=None)`)."""
    return _default_output_dir()


# -- values ------------------------------------------------------------------------------


def cap_utf8(text: str, cap: int = STRING_CAP) -> str:
    """`text` cut to at most `cap` UTF-8 bytes, on a character boundary."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= cap:
        return text
    end = cap
    while end > 0 and data[end] & 0xC0 == 0x80:
        end -= 1
    return data[:end].decode("utf-8", "surrogatepass")


def _str_of(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return "<unserializable>"


def json_safe(value: Any, depth: int = 0) -> Any:
    """`value` as strict JSON can carry it, by the spool's attrs rule."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if depth < MAX_DEPTH and isinstance(value, list | tuple):
        return [json_safe(item, depth + 1) for item in value]
    if depth < MAX_DEPTH and isinstance(value, Mapping):
        return {k if isinstance(k, str) else _str_of(k): json_safe(v, depth + 1) for k, v in value.items()}
    return _str_of(value)


def json_attrs(attrs: Mapping[str, Any] | None, skip: Sequence[str] | frozenset[str] = ()) -> Record:
    return {key: json_safe(value) for key, value in (attrs or {}).items() if key not in skip}


def typed_value(value: Any) -> Record:
    """`value_type`, `value` (and `value_nonfinite`) of a mark holding `value`."""
    if isinstance(value, bool):
        return {"value_type": "bool", "value": value}
    if isinstance(value, int):
        return {"value_type": "int", "value": value}
    if isinstance(value, float):
        if math.isfinite(value):
            return {"value_type": "float", "value": value}
        nonfinite = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return {"value_type": "float", "value": None, "value_nonfinite": nonfinite}
    text = value if isinstance(value, str) else _str_of(value)
    return {"value_type": "string", "value": cap_utf8(text)}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _hex32_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and _HEX32.fullmatch(value) else None


def _nonempty(name: str) -> str:
    return name or "unnamed"  # the schema requires a non-empty span / mark name


# -- ids ---------------------------------------------------------------------------------


def conventional_id(context: SpanContext) -> str:
    """16-hex span id + the first 16 hex of the trace id: the spool id of a non-Cirron span."""
    return f"{context.span_id:016x}{context.trace_id:032x}"[:32]


class CirronIds:
    """span id (16 hex) -> full 32-hex spool id of the Cirron spans seen lately (bounded)."""

    def __init__(self, size: int = ID_MAP_SIZE) -> None:
        self._size = size
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, short: str, full: str) -> None:
        with self._lock:
            self._ids[short] = full
            self._ids.move_to_end(short)
            while len(self._ids) > self._size:
                self._ids.popitem(last=False)

    def resolve(self, context: SpanContext) -> str:
        with self._lock:
            full = self._ids.get(f"{context.span_id:016x}")
        return full or conventional_id(context)


def span_id_of(span: ReadableSpan) -> str:
    own = _hex32_or_none((span.attributes or {}).get(SPAN_ID))
    return own or conventional_id(_context(span))


def parent_id_of(span: ReadableSpan, ids: CirronIds) -> str | None:
    parent = span.parent
    if parent is not None and parent.is_valid:
        return ids.resolve(parent)
    # A Cirron span that opened a trace of its own: its parent is the session.
    return _hex32_or_none((span.attributes or {}).get(SESSION_ID))


def _context(span: ReadableSpan) -> SpanContext:
    return span.context or INVALID_SPAN_CONTEXT  # every span the SDK ends has a context


# -- spans and marks ---------------------------------------------------------------------


def _exception_event(span: ReadableSpan) -> Event | None:
    """The `exception` event that an ERROR status stands for (the last one), if any."""
    if span.status.status_code is not StatusCode.ERROR:
        return None
    found = [event for event in span.events if event.name == _native.EVENT_EXCEPTION]
    return found[-1] if found else None


def error_attrs(span: ReadableSpan, exception: Event | None) -> Record:
    if span.status.status_code is not StatusCode.ERROR:
        return {}
    attrs: Record = {"error": True}
    event_attrs = (exception.attributes or {}) if exception is not None else {}
    if _native.KEY_EXCEPTION_TYPE in event_attrs:
        attrs["error.type"] = _str_of(event_attrs[_native.KEY_EXCEPTION_TYPE])
    message = event_attrs.get(_native.KEY_EXCEPTION_MESSAGE, span.status.description)
    if message is not None:
        attrs["error.message"] = cap_utf8(_str_of(message))
    return attrs


def mark_record(
    mark_id: str, span_id: str, name: str, value: Any, attrs: Record, ts_ns: int, kind: str
) -> Record:
    return {
        "id": mark_id,
        "span_id": span_id,
        "name": _nonempty(name),
        **typed_value(value),
        "attrs": attrs,
        "ts_ns": ts_ns,
        "kind": kind,
    }


def event_mark(event: Event, span_id: str) -> Record:
    """A `cirron.mark.*` event as the original mark; any other event as a string mark."""
    attrs = event.attributes or {}
    if not MARK_KEYS.intersection(attrs):
        return mark_record(
            uuid.uuid4().hex, span_id, event.name, event.name, json_attrs(attrs), event.timestamp, "point"
        )
    kind = attrs.get(MARK_KIND)
    return mark_record(
        _hex32_or_none(attrs.get(MARK_ID)) or uuid.uuid4().hex,
        span_id,
        event.name,
        attrs.get(MARK_VALUE, ""),
        json_attrs(attrs, MARK_KEYS),
        event.timestamp,
        kind if kind in ("point", "summary") else "point",
    )


def summary_marks(span: ReadableSpan, span_id: str, end_ns: int) -> list[Record]:
    return [
        mark_record(uuid.uuid4().hex, span_id, key[len(SUMMARY_PREFIX) :], value, {}, end_ns, "summary")
        for key, value in (span.attributes or {}).items()
        if key.startswith(SUMMARY_PREFIX)
    ]


def span_unit(span: ReadableSpan, ids: CirronIds) -> Unit:
    """The spool span record of `span`, followed by its marks."""
    attributes = span.attributes or {}
    resource = span.resource.attributes if span.resource is not None else {}
    span_id = span_id_of(span)
    start_ns = span.start_time or 0
    end_ns = span.end_time or start_ns
    exception = _exception_event(span)
    marks = [event_mark(event, span_id) for event in span.events if event is not exception]
    marks += summary_marks(span, span_id, end_ns)
    cirron = _hex32_or_none(attributes.get(SPAN_ID)) is not None
    attrs = json_attrs(attributes, MAPPING_ONLY_KEYS if cirron else FIELD_KEYS)
    for key in [key for key in attrs if key.startswith(SUMMARY_PREFIX)]:
        del attrs[key]
    for key, value in error_attrs(span, exception).items():
        attrs.setdefault(key, value)
    pid = _int_or_none(resource.get("process.pid"))
    rank = _int_or_none(attributes.get(_native.KEY_RANK))
    record: Record = {
        "id": span_id,
        "name": _nonempty(span.name),
        "parent_id": parent_id_of(span, ids),
        "index": _int_or_none(attributes.get(_native.KEY_INDEX)),
        "start_ns": start_ns,
        "end_ns": end_ns,
        "cpu_ns": _int_or_none(attributes.get(_native.KEY_CPU_NS)),
        "gpu_ns": _int_or_none(attributes.get(_native.KEY_GPU_NS)),
        "memory_peak_bytes": None,
        "thread_id": _int_or_none(attributes.get(_native.KEY_THREAD_ID)) or 0,
        "pid": pid if pid is not None and pid >= 1 else os.getpid(),
        "rank": rank if rank is not None else _int_or_none(resource.get(_native.KEY_RANK)) or 0,
        "attrs": attrs,
        "mark_ids": [mark["id"] for mark in marks],
        "trace_id": f"{_context(span).trace_id:032x}",
    }
    return [record, *marks]


def pack(units: Sequence[Unit], max_records: int) -> Iterator[list[Record]]:
    """Records in files of at most `max_records`, a span and its marks together when they fit."""
    group: list[Record] = []
    for unit in units:
        if group and len(group) + len(unit) > max_records:
            yield group
            group = []
        for start in range(0, len(unit), max_records):
            piece = unit[start : start + max_records]
            if group and len(group) + len(piece) > max_records:
                yield group
                group = []
            group.extend(piece)
    if group:
        yield group


def _is_span(record: Record) -> bool:
    return "mark_ids" in record  # only span records have it


def encode_batch(records: Sequence[Record], created_ns: int, batch_id: str) -> bytes:
    doc = {
        "schema_version": SCHEMA_VERSION,
        "sdk_version": __version__,
        "batch_id": batch_id,
        "created_ns": created_ns,
        "spans": [r for r in records if _is_span(r)],
        "marks": [r for r in records if not _is_span(r)],
        "snapshots": [],
    }
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace")


# -- the exporter ------------------------------------------------------------------------


def _from_cirron(span: ReadableSpan) -> bool:
    """A span the profiler itself made (handed to the app's TracerProvider by profile())."""
    scope = span.instrumentation_scope
    return scope is not None and scope.name == CIRRON_SCOPE


class SpoolSpanExporter(SpanExporter):
    """Writes every exported span, and its events as marks, into `<output_dir>/spool`."""

    max_records_per_file: int = MAX_RECORDS_PER_FILE

    def __init__(
        self, output_dir: str | os.PathLike[str] | None = None, *, max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    ) -> None:
        self.directory = SpoolDirectory(
            default_output_dir() if output_dir is None else output_dir, max_bytes, drop_cached_pages=True
        )
        self.last_error: str | None = None
        self.failed_exports = 0
        self.files_written = 0
        self._ids = CirronIds()
        self._shutdown = False
        self.skipped_spans = 0  # Cirron's own, written by the profiler's spool sink instead

    def _profiler_writes_here(self) -> bool:
        theirs = _profiler.spool_path()
        return theirs is not None and os.path.realpath(theirs) == os.path.realpath(self.directory.path)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        try:
            if self._profiler_writes_here():
                kept = [span for span in spans if not _from_cirron(span)]
                self.skipped_spans += len(spans) - len(kept)
                spans = kept
            for span in spans:
                own = _hex32_or_none((span.attributes or {}).get(SPAN_ID))
                if own is not None:  # first, so children earlier in the batch resolve too
                    self._ids.remember(f"{_context(span).span_id:016x}", own)
            units = [span_unit(span, self._ids) for span in spans]
            for records in pack(units, self.max_records_per_file):
                self._write(records)
        except Exception as exc:  # an exporter never raises into the SDK
            self.failed_exports += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _write(self, records: Sequence[Record]) -> None:
        created_ns, batch_id, name = new_file_name()
        self.directory.write_bytes(name, encode_batch(records, created_ns, batch_id))
        self.files_written += 1
        self.directory.enforce_cap(name, self._eviction_failed)

    def _eviction_failed(self, exc: OSError) -> None:
        self.last_error = f"eviction failed: {type(exc).__name__}: {exc}"

    def shutdown(self) -> None:
        self._shutdown = True

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # every export() is on disk when it returns
