"""The only place cirron_otel touches private attributes of OpenTelemetry.

Two things have no public API upstream:

- replacing the runtime context after `opentelemetry.context` was imported: the API reads
  it from the module global `opentelemetry.context._RUNTIME_CONTEXT` (the public way,
  `OTEL_PYTHON_CONTEXT`, only works before that import);
- handing finished spans to an SDK `TracerProvider`'s span processors: spans created through
  the public tracer API would get ids from the app's id generator, not the scope's own ids
  that OpenTelemetry spans already use as parents, so `TracerProvider._active_span_processor`
  is used.

Each accessor raises `UpstreamChanged` naming the attribute and the installed version when
the attribute is gone; `tests/integration/test_otel_conventions.py` checks them all against the installed
OpenTelemetry, so an upstream change fails loudly there first.
"""

from __future__ import annotations

import sys
from typing import Any

RUNTIME_CONTEXT = "opentelemetry.context._RUNTIME_CONTEXT"
ACTIVE_SPAN_PROCESSOR = "opentelemetry.sdk.trace.TracerProvider._active_span_processor"


class UpstreamChanged(RuntimeError):
    """An OpenTelemetry private attribute cirron_otel relies on is missing."""


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def _changed(attribute: str, distribution: str) -> UpstreamChanged:
    return UpstreamChanged(
        f"cirron_otel relies on {attribute}, which {distribution} {_version(distribution)} does not "
        "have (OpenTelemetry changed it upstream); cirron_otel/_otel_private.py needs updating"
    )


def runtime_context() -> Any:
    """OpenTelemetry's current runtime context object (imports `opentelemetry.context`)."""
    import opentelemetry.context as otel_context

    try:
        return otel_context._RUNTIME_CONTEXT
    except AttributeError:
        raise _changed(RUNTIME_CONTEXT, "opentelemetry-api") from None


def set_runtime_context(runtime: Any) -> None:
    """Make `runtime` the one every `opentelemetry.context` function uses from now on."""
    runtime_context()  # the global must exist, or assigning it would change nothing
    sys.modules["opentelemetry.context"]._RUNTIME_CONTEXT = runtime


def span_processor(provider: Any) -> Any:
    """The span processor an SDK `TracerProvider` hands every ended span to (`on_end`)."""
    try:
        return provider._active_span_processor
    except AttributeError:
        raise _changed(ACTIVE_SPAN_PROCESSOR, "opentelemetry-sdk") from None


def check() -> None:
    """Raise `UpstreamChanged` if any attribute above is missing in the installed OpenTelemetry."""
    from opentelemetry.sdk.trace import TracerProvider

    runtime_context()
    provider = TracerProvider()
    try:
        processor = span_processor(provider)
        if not callable(getattr(processor, "on_end", None)):
            raise _changed(f"{ACTIVE_SPAN_PROCESSOR}.on_end", "opentelemetry-sdk")
    finally:
        provider.shutdown()
