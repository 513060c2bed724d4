"""Background threads that never take the program's signals.

The kernel hands a process-directed signal (kill, Pool.terminate()'s SIGTERM, Ctrl-C) to any
thread that does not block it, and CPython runs the Python handler only on the main thread,
when it next executes bytecode. If one of our threads takes the signal while the main thread
sleeps in a wait that only EINTR ends (a multiprocessing lock: `sem_wait`), the handler never
runs and the program hangs where it would have ended (seen: Pool workers living on after
`terminate()`, about one run in 300 under load). So every thread this library starts blocks
the asynchronous signals, and they go to the program's own threads, as without us.

The mask is inherited at creation, so threads our threads start (gRPC's) block them too.
Signals the kernel sends to the thread that caused them (faults, SIGPIPE, SIGXFSZ) stay
unblocked: blocking those is undefined or would leave them pending forever.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_THREAD_DIRECTED = {
    *("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS", "SIGABRT"),  # faults, abort()
    *("SIGPIPE", "SIGXFSZ"),  # a write to a closed pipe / past the file size limit
}
_UNBLOCKABLE = {"SIGKILL", "SIGSTOP"}
ASYNC_SIGNALS = frozenset(
    s for s in signal.valid_signals() if getattr(s, "name", "") not in _THREAD_DIRECTED | _UNBLOCKABLE
)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block ASYNC_SIGNALS in the calling thread for the block: threads started inside it
    inherit the mask; a signal arriving meanwhile stays pending and is delivered at the end."""
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, ASYNC_SIGNALS)
    except (OSError, ValueError, AttributeError):  # no pthread_sigmask on this platform
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class BackgroundThread(threading.Thread):
    """A daemon thread that starts with ASYNC_SIGNALS blocked (see the module docstring).
    Sinks that start threads of their own should use it (also exported by `cirron_otel.sink`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("daemon", True)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def start(self) -> None:
        with signals_blocked():
            super().start()
