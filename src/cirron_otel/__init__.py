"""cirron-otel: the Cirron instrumentation API on a native per-thread ring buffer.

    import cirron_otel as ci
    ci.profile()
    for epoch in ci.epochs(range(3)):
        with ci.scope("forward"):
            ci.mark("loss", 0.5)

`mark`, `scope`, `epochs` and `batches` are native (see `_native.c`); the rest is the thin
Python layer in `_profiler.py`.
"""

from __future__ import annotations

from . import _native
from ._native import Batch, Scope, batches, epochs, mark, scope
from ._profiler import Profiler, flush, health, profile, shutdown, trace
from ._version import __version__
from ._warn import CirronWarning

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up cost)
if TYPE_CHECKING:
    from typing import Any


def _decorate(func: Any, name: str, index: int | None, attrs: dict[str, Any]) -> Any:
    from ._decorate import decorate  # imports inspect: only when a scope decorates something

    return decorate(func, name, index, attrs)


_native.configure(warning_category=CirronWarning, decorate=_decorate)


def current_scope() -> Scope | None:
    """The innermost open scope of the calling thread or task (not the session root)."""
    return _native.current_scope()


__all__ = [
    "Batch",
    "CirronWarning",
    "Profiler",
    "Scope",
    "__version__",
    "batches",
    "current_scope",
    "epochs",
    "flush",
    "health",
    "mark",
    "profile",
    "scope",
    "shutdown",
    "trace",
]
