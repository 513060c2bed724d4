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


# cirron-sdk 0.3.0's other public names. Plain module attributes, not a module `__getattr__`:
# CPython specializes `ci.mark` / `ci.scope` lookups only on a module without one (measured:
# ~13 ns of every mark). compat itself is cheap to import; the inference module is not (inspect,
# uuid), so `inference` forwards to it on first use.
from .compat import (  # noqa: E402 - after configure(): compat reads nothing at import
    Cirron,
    CirronYaml,
    ProfilingConfig,
    ServingConfig,
    deps,
    env,
    find_cirron_yaml,
    get_default,
    load,
    load_cirron_yaml,
    map,
    secret,
    watch,
    wrap,
)


def inference(*args: Any, **kwargs: Any) -> Any:
    """cirron-sdk's `@ci.inference` (with or without arguments): see `_inference.inference`."""
    from ._inference import inference as real

    return real(*args, **kwargs)


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
