"""`@ci.scope("name")` on functions: every call runs inside a fresh scope.

The function's code location (`code.function.name`, `code.file.path`, `code.line.number`,
OpenTelemetry's semantic conventions) is worked out once, here, when the function is
decorated, and registered natively (`_native.code_location`); each call's scope names it by
id, and only the OTLP encoder turns it into attributes: the spool is unchanged.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

from . import _native

# (function, file, line) -> native id: a function decorated many times (closures, a
# decorator applied in a loop) registers its location once
_codes: dict[tuple[str, str | None, int | None], int] = {}


def code_location(func: Callable[..., Any]) -> tuple[str, str | None, int | None]:
    """`code.function.name` (`module.qualname`), `code.file.path` (absolute) and
    `code.line.number` (the `def` line, or the first decorator's) of `func`."""
    target = inspect.unwrap(func)
    if isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    call = inspect.getattr_static(type(target), "__call__", None)
    if not hasattr(target, "__code__") and not isinstance(target, type) and hasattr(call, "__code__"):
        target = call  # a callable object: its class's __call__
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if not isinstance(qualname, str):
        qualname = type(target).__qualname__
    module = getattr(target, "__module__", None)
    name = f"{module}.{qualname}" if isinstance(module, str) and module else qualname
    code = getattr(target, "__code__", None)
    if code is None:
        return name, None, None
    path = code.co_filename
    if path and not path.startswith("<") and not os.path.isabs(path):
        path = os.path.abspath(path)
    return name, path or None, code.co_firstlineno


def code_id(func: Callable[..., Any]) -> int:
    """The native id of `func`'s code location (0: none)."""
    try:
        where = code_location(func)
    except Exception:
        return 0
    found = _codes.get(where)
    if found is None:
        found = _codes[where] = _native.code_location(*where)
    return found


def decorate(func: Callable[..., Any], name: str, index: int | None, attrs: dict[str, Any]) -> Any:
    """Wrap `func` so each call (or each await, for coroutine functions) is one scope."""
    scope = _native.code_scope
    code = code_id(func)
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            with scope(code, name, index, **attrs):
                return await func(*args, **kwargs)

        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with scope(code, name, index, **attrs):
            return func(*args, **kwargs)

    return wrapper
