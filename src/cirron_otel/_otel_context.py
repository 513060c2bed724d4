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

This module imports nothing from OpenTelemetry at its top, for two reasons:

- `OTEL_PYTHON_CONTEXT` makes OpenTelemetry load `CirronRuntimeContext` while
  `opentelemetry.context` (and usually `opentelemetry.trace`, which imported it) is still
  half-initialised; the trace API and `ScopeSpan` are bound on first use instead.
- A program that does not use OpenTelemetry must not pay for importing it (tens of ms). When
  `profile()` runs before `opentelemetry.context` was imported, `install()` puts a one-shot
  finder on `sys.meta_path` that installs the runtime right after that module has executed
  (before anything can attach a context through it) and then removes itself. Until then
  the finder costs one Python call per import of a new module; the scope and mark hot paths
  are unchanged (the native side consults the runtime's ContextVar only once a context has
  been attached).
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Callable, Sequence

from . import _native
from ._on_import import cancel, on_import

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up cost)
if TYPE_CHECKING:
    from typing import Any, Protocol

    from opentelemetry.context.context import Context

    from ._on_import import _InstallOnImport

    class _Runtime(Protocol):
        """What OpenTelemetry's API calls on a runtime context (its base class is private)."""

        def attach(self, context: Context) -> object: ...
        def get_current(self) -> Context: ...
        def detach(self, token: object) -> None: ...


_MASK64 = (1 << 64) - 1
_OTEL_CONTEXT = "opentelemetry.context"

# Bound on first use (see the module docstring).
_get_current_span: Callable[[Any], Any] | None = None
_set_span_in_context: Callable[[Any, Any], Any] | None = None
_scope_span: Callable[[_native.Scope], Any] | None = None
_context_class: Callable[[], Any] | None = None


def _bind_trace() -> None:
    global _get_current_span, _set_span_in_context, _scope_span
    from opentelemetry import trace

    from ._otel_span import ScopeSpan

    _get_current_span, _set_span_in_context = trace.get_current_span, trace.set_span_in_context
    _scope_span = ScopeSpan


def _empty_context() -> Context:
    global _context_class
    if _context_class is None:
        # always fully imported before any runtime context is loaded or installed
        from opentelemetry.context.context import Context

        _context_class = Context
    return _context_class()


def _anchor_value(context: Context) -> tuple[Any, ...]:
    if _get_current_span is None:
        _bind_trace()
    assert _get_current_span is not None
    anchor = _native.current_scope()
    sc = _get_current_span(context).get_span_context()
    if not sc.is_valid:
        return (context, anchor, 0, 0, 0, 0)
    return (context, anchor, sc.trace_id >> 64, sc.trace_id & _MASK64, sc.span_id, int(sc.trace_flags))


class CirronRuntimeContext:
    """OpenTelemetry's runtime context, aware of Cirron scopes (see the module docstring).

    It implements the interface of OpenTelemetry's runtime contexts (`attach`,
    `get_current`, `detach`) without inheriting their private base class, which importing
    would also import `opentelemetry.context` (see the module docstring).
    """

    def __init__(self, previous: _Runtime | None = None) -> None:
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
            context = self._previous.get_current() if self._previous is not None else _empty_context()
            anchor = None
        else:
            context, anchor = value[0], value[1]
        scope = _native.current_scope()
        if scope is None or scope is anchor:
            return context
        if _scope_span is None:
            _bind_trace()
        assert _set_span_in_context is not None and _scope_span is not None
        return _set_span_in_context(_scope_span(scope), context)

    def detach(self, token: object) -> None:
        if isinstance(token, contextvars.Token) and token.var is self._var:
            self._var.reset(token)
        elif self._previous is not None:
            self._previous.detach(token)


# -- installing it ------------------------------------------------------------------------

_lock = threading.Lock()
_wanted = False  # a profiler asked for the context: the finder installs it when it fires
_finder: _InstallOnImport | None = None  # on_import's, until it fires


def _remove_finder() -> None:
    global _finder
    cancel(_finder)
    _finder = None


def _on_otel_context_imported() -> None:
    with _lock:
        _remove_finder()
        if not _wanted:
            return
        try:
            _install_now()
        except Exception as exc:  # never break the application's import
            from ._warn import warn_once

            warn_once(
                "otel-context",
                f"cirron_otel: scopes will not join OpenTelemetry's context: {type(exc).__name__}: {exc}",
            )
            _native.configure(otel_context=False)


def _install_now() -> None:
    from . import _otel_private

    current = _otel_private.runtime_context()
    if not isinstance(current, CirronRuntimeContext):
        _otel_private.set_runtime_context(CirronRuntimeContext(previous=current))
        if current.get_current():  # contexts attached before: scopes must consult them
            _native.configure(otel_attached=True)
    _native.configure(otel_context=True)


def install() -> bool:
    """Make OpenTelemetry's context Cirron-aware in this process; idempotent.

    Now if `opentelemetry.context` has been imported, else right after it is. False when
    OpenTelemetry is not installed at all.
    """
    global _wanted, _finder
    with _lock:
        _wanted = True
        module = sys.modules.get(_OTEL_CONTEXT)
        if module is not None:
            if not hasattr(module, "get_current"):
                # Imported from inside that module's own start: it is loading this runtime
                # for OTEL_PYTHON_CONTEXT=cirron_otel (e.g. a child process started by
                # importing us); the runtime will be ours.
                _native.configure(otel_context=True)
                return True
            _remove_finder()
            _install_now()
            return True
        if _finder is None:
            # No check that OpenTelemetry is installed (it is a dependency; looking for it costs
            # a sys.path scan at start-up): a hook for a module never imported never fires.
            _finder = on_import(_OTEL_CONTEXT, _on_otel_context_imported)
        return True


def uninstall() -> None:
    """Stop consulting OpenTelemetry's context when opening scopes (the runtime stays)."""
    global _wanted
    with _lock:
        _wanted = False
        _remove_finder()
    _native.configure(otel_context=False)


def __getattr__(name: str) -> Any:
    # ScopeSpan and its helpers moved to _otel_span (they import opentelemetry.trace)
    if name in ("ScopeSpan", "exception_type_name", "span_context_of"):
        from . import _otel_span

        return getattr(_otel_span, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__: Sequence[str] = ["CirronRuntimeContext", "install", "uninstall"]
