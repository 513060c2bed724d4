"""cirron-otel: the Cirron instrumentation API on a native per-thread ring buffer.

    import cirron_otel as ci
    ci.profile()
    for epoch in ci.epochs(range(3)):
        with ci.scope("forward"):
            ci.mark("loss", 0.5)

`mark`, `scope`, `epochs` and `batches` are native (see `scope.c`); the rest is the thin
Python layer in `_profiler.py`.
"""

from __future__ import annotations

from . import _native
from ._native import Batch, Scope, batches, epochs, mark, scope
from ._profiler import Profiler, flush, health, profile, shutdown, trace
from ._version import __version__
from ._warn import CirronWarning
from .errors import (
    CirronDatasetNotFound,
    CirronDataSizeError,
    CirronDependencyError,
    CirronError,
    CirronNotProvided,
    CirronPlatformRequired,
    CirronSecretNotFound,
    CirronYamlError,
)

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


# cirron-sdk 0.3.0's other public names (cirron_otel.compat, cirron_otel.inference), imported on
# first use so `import cirron_otel` stays cheap.
_COMPAT = frozenset(
    {
        "Cirron",
        "get_default",
        "watch",
        "wrap",
        "load",
        "map",
        "secret",
        "env",
        "deps",
        "find_cirron_yaml",
        "load_cirron_yaml",
        "CirronYaml",
        "ProfilingConfig",
        "ServingConfig",
    }
)


def __getattr__(name: str) -> Any:
    if name in _COMPAT:
        from . import compat

        value = getattr(compat, name)
    elif name == "inference":
        # the decorator, not the submodule: bound here so `cirron_otel.inference` stays the function
        from ._inference import inference as value
    else:
        raise AttributeError(f"module 'cirron_otel' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "Batch",
    "Cirron",
    "CirronDataSizeError",
    "CirronDatasetNotFound",
    "CirronDependencyError",
    "CirronError",
    "CirronNotProvided",
    "CirronPlatformRequired",
    "CirronSecretNotFound",
    "CirronWarning",
    "CirronYaml",
    "CirronYamlError",
    "Profiler",
    "ProfilingConfig",
    "Scope",
    "ServingConfig",
    "__version__",
    "batches",
    "current_scope",
    "deps",
    "env",
    "epochs",
    "find_cirron_yaml",
    "flush",
    "get_default",
    "health",
    "inference",
    "load",
    "load_cirron_yaml",
    "map",
    "mark",
    "profile",
    "scope",
    "secret",
    "shutdown",
    "trace",
    "watch",
    "wrap",
]
