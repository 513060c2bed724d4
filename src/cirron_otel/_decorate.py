"""`@ci.scope("name")` on functions: every call runs inside a fresh scope."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from . import _native


def decorate(func: Callable[..., Any], name: str, index: int | None, attrs: dict[str, Any]) -> Any:
    """Wrap `func` so each call (or each await, for coroutine functions) is one scope."""
    scope = _native.scope
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            with scope(name, index, **attrs):
                return await func(*args, **kwargs)

        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with scope(name, index, **attrs):
            return func(*args, **kwargs)

    return wrapper
