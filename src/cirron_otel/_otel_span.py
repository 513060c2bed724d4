"""An open Cirron scope seen as an OpenTelemetry span (`ScopeSpan`).

Split from `_otel_context` because it subclasses OpenTelemetry's `NonRecordingSpan`, so
importing it imports `opentelemetry.trace`; `_otel_context` imports it only once a scope has
to be shown to OpenTelemetry (see there why that module must not import OpenTelemetry).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.util import types

from . import _native

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)


def exception_type_name(exception: BaseException) -> str:
    """`module.QualName` (builtins: `QualName`), as the native side names the exception that
    closes a scope."""
    cls = type(exception)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def span_context_of(scope: _native.Scope) -> SpanContext:
    return SpanContext(
        trace_id=(scope.trace_id_hi << 64) | scope.trace_id_lo,
        span_id=scope.span_id_int,
        is_remote=False,
        trace_flags=_SAMPLED if scope.sampled else _UNSAMPLED,
    )


class ScopeSpan(NonRecordingSpan):
    """An open Cirron scope seen as an OpenTelemetry span.

    Attributes set through it land in the scope's attrs (while the scope is open), events
    (and a recorded exception, as an `exception` event) become string marks on it, and an
    ERROR status marks it as failed (status ERROR when exported), so instrumentation that
    decorates "the current span" decorates the scope.
    """

    def __init__(self, scope: _native.Scope) -> None:
        super().__init__(span_context_of(scope))
        self.scope = scope

    def is_recording(self) -> bool:
        return self.scope.state == "open"

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self.is_recording():
            self.scope.attrs[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if self.is_recording():
            self.scope.attrs.update(attributes)

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self.is_recording() and _native.current_scope() is self.scope:
            _native.mark(name, name, **dict(attributes or {}))

    def set_status(self, status: Any, description: str | None = None) -> None:
        code = getattr(status, "status_code", status)
        if self.is_recording() and code == trace.StatusCode.ERROR:
            message = description or getattr(status, "description", None) or ""
            self.scope.attrs["error"] = True
            if message:
                self.scope.attrs["error.message"] = message
            # the exported span gets status ERROR with this description
            self.scope._set_error_status(str(message))

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # As OpenTelemetry's SDK does: an `exception` event (a point mark on the scope, so
        # the spool has it too) with the exception.* attributes. The status is the caller's
        # to set (instrumentations call set_status(ERROR) beside it).
        if self.is_recording() and _native.current_scope() is self.scope:
            attrs = {
                "exception.type": exception_type_name(exception),
                "exception.message": str(exception),
                "exception.stacktrace": "".join(traceback.format_exception(exception)),
                "exception.escaped": str(escaped),
                **dict(attributes or {}),
            }
            _native.mark("exception", str(exception), **attrs)

    def __repr__(self) -> str:
        return f"ScopeSpan({self.scope!r})"


__all__ = ["ScopeSpan", "exception_type_name", "span_context_of"]
