"""Cirron scopes inside OpenTelemetry's context, both ways, per thread and per asyncio task.

OpenTelemetry finds the current span through its runtime context (`opentelemetry.context`).
`CirronRuntimeContext` replaces the default one (a ContextVar of `Context` dicts) with one
that also knows the innermost Cirron scope:

- when OpenTelemetry attaches a context, the Cirron scope innermost at that moment is kept
  with it (the "anchor"), together with the ids of the context's span, so the native
  `scope()` can tell, without calling back into Python, whether the newest span of this
  thread or task is an OpenTelemetry span (then a new scope becomes its child) or a scope;
- `get_current()` returns the attached context, with the innermost Cirron scope as the
  current span when that scope was opened after the attach. So `trace.get_current_span()`,
  every tracer's parent lookup and `propagate.inject()` see the scope.

It is installed by `profile()` (`otel_context=True`, the default), and can be selected
before OpenTelemetry is imported with `OTEL_PYTHON_CONTEXT=cirron_otel`.
"""

from __future__ import annotations

import contextvars
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context.context import Context, _RuntimeContext
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.util import types

from . import _native

_MASK64 = (1 << 64) - 1
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

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
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


def _anchor_value(context: Context) -> tuple[Any, ...]:
    anchor = _native.current_scope()
    span = trace.get_current_span(context)
    sc = span.get_span_context()
    if not sc.is_valid:
        return (context, anchor, 0, 0, 0, 0)
    return (context, anchor, sc.trace_id >> 64, sc.trace_id & _MASK64, sc.span_id, int(sc.trace_flags))


class CirronRuntimeContext(_RuntimeContext):
    """OpenTelemetry's runtime context, aware of Cirron scopes (see the module docstring)."""

    def __init__(self, previous: _RuntimeContext | None = None) -> None:
        # A runtime installed after OpenTelemetry was already in use keeps answering for
        # contexts attached before (tasks and threads that were running then).
        self._previous = previous
        self._var = _native.otel_var
        self._attached = False

    def attach(self, context: Context) -> object:
        if not self._attached:  # until now, scopes had no OpenTelemetry context to consult
            self._attached = True
            _native.configure(otel_attached=True)
        return self._var.set(_anchor_value(context))

    def get_current(self) -> Context:
        value = self._var.get(None)
        if value is None:
            context = self._previous.get_current() if self._previous is not None else Context()
            anchor = None
        else:
            context, anchor = value[0], value[1]
        scope = _native.current_scope()
        if scope is None or scope is anchor:
            return context
        return trace.set_span_in_context(ScopeSpan(scope), context)

    def detach(self, token: object) -> None:
        if isinstance(token, contextvars.Token) and token.var is self._var:
            self._var.reset(token)
        elif self._previous is not None:
            self._previous.detach(token)


def install() -> bool:
    """Make OpenTelemetry's context Cirron-aware in this process; idempotent."""
    import opentelemetry.context as otel_context

    current = otel_context._RUNTIME_CONTEXT
    if not isinstance(current, CirronRuntimeContext):
        otel_context._RUNTIME_CONTEXT = CirronRuntimeContext(previous=current)
        if current.get_current():  # contexts attached before: scopes must consult them
            _native.configure(otel_attached=True)
    _native.configure(otel_context=True)
    return True


def uninstall() -> None:
    """Stop consulting OpenTelemetry's context when opening scopes (the runtime stays)."""
    _native.configure(otel_context=False)


__all__: Sequence[str] = ["CirronRuntimeContext", "ScopeSpan", "install", "span_context_of"]
