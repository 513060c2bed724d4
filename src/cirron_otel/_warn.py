"""The package's warning category and its warn-once helper."""

from __future__ import annotations

import contextlib
import threading
import warnings


class CirronWarning(UserWarning):
    """Telemetry could not do its job (a full ring, an unwritable spool...). Never raised."""


_lock = threading.Lock()
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn the first time `key` is seen in this process; never raises, even under -W error."""
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    with contextlib.suppress(Exception):
        warnings.warn(message, CirronWarning, stacklevel=3)


def reset() -> None:
    """Forget what was warned about (for tests)."""
    with _lock:
        _warned.clear()


def reset_in_forked_child() -> None:
    """After fork(): another thread of the parent may have held the lock; make a new one."""
    global _lock
    _lock = threading.Lock()
    _warned.clear()
