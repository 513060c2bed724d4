"""profile(), the Profiler it returns, and the module-level health/flush/shutdown/trace.

The profiler owns the process-wide pieces: the session root span, the drainer thread, the
sinks, and the hooks (atexit, SIGTERM/SIGINT, fork). Everything here is cold path: the hot
path (mark, scopes, epochs) is entirely in `_native`.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

from . import _native
from ._warn import reset_in_forked_child as _reset_warnings
from ._warn import warn_once

if TYPE_CHECKING:
    from ._config import Settings

_SHUTDOWN_TIMEOUT = 10.0
_SIGNAL_FLUSH_TIMEOUT = 5.0

_lock = threading.RLock()
_active: Profiler | None = None
_last: Profiler | None = None  # kept after shutdown so trace()/health() still answer
_hooks: list[str] = []


class Profiler:
    """One profiling session: the `cirron.session` root span, a drainer, and its sinks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running = False
        self.restarts = 0
        self.sinks: list[Any] = []
        self.drainer: Any = None
        self.trace_store: Any = None
        self.session: _native.Scope | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        if not s.enabled:
            _native.configure(recording=False)
            self.running = True
            return
        _native.configure(
            ring_capacity=s.ring_capacity,
            capture_cpu_time=s.capture_cpu_time,
            rank=s.rank,
            recording=True,
            trace_per_child=s.trace_per == "child",
        )
        self.otel_context = s.otel_context and _install_otel_context()
        _native.configure(otel_context=self.otel_context)
        self.sinks = self._make_sinks()
        self.session = _native.session_begin(dict(s.session_attrs))
        self._start_drainer()
        self.running = True

    def _make_sinks(self) -> list[Any]:
        from .exporters.spool import SpoolSink
        from .exporters.spool_dir import set_default_file_mode

        s = self.settings
        set_default_file_mode(s.file_mode)  # the OTLP outbox's SpoolDirectory follows it too
        sinks: list[Any] = []
        if "spool" in s.outputs:
            sinks.append(
                SpoolSink(
                    s.output_dir,
                    max_bytes=s.spool_max_bytes,
                    max_records_per_file=s.max_records_per_file,
                    retry_records=s.spool_retry_records,
                    file_mode=s.file_mode,
                )
            )
        provider = _sdk_tracer_provider(s.tracer_provider)
        if provider is not None:
            # The application's provider: Cirron spans go where its spans go.
            from .exporters.provider import TracerProviderSink

            self._configure_otlp_limits()
            sinks.append(TracerProviderSink(provider, session_trace=_session_trace))
        if "otlp" in s.outputs and (provider is None or s.otlp_endpoint):
            try:
                sinks.append(self._make_otlp_sink())
            except Exception as exc:  # a broken OTLP setup must not stop profiling
                warn_once("otlp-setup", f"cirron_otel: OTLP export disabled: {type(exc).__name__}: {exc}")
        return sinks

    def _configure_otlp_limits(self) -> int:
        from opentelemetry.sdk.trace import SpanLimits

        limits = SpanLimits()  # OTEL_SPAN_*_LIMIT and OTEL_ATTRIBUTE_* from the environment
        _native.configure(
            otlp=True,
            span_attr_limit=_limit(limits.max_span_attributes),
            event_attr_limit=_limit(limits.max_event_attributes),
            value_len_limit=-1 if limits.max_attribute_length is None else limits.max_attribute_length,
        )
        return _limit(limits.max_events)

    def _make_otlp_sink(self) -> Any:
        from ._config import otlp_transport_config
        from .exporters.otlp import OtlpSink, build_resource, make_transport

        s = self.settings
        transport = make_transport(otlp_transport_config(s.otlp_protocol, s.otlp_endpoint))
        event_limit = self._configure_otlp_limits()
        self.resource_attrs, resource = build_resource(s.service_name, s.rank)
        return OtlpSink(
            transport,
            resource=resource,
            session_trace=_session_trace,
            event_limit=event_limit,
            outbox_dir=s.output_dir if "spool" in s.outputs else None,
            outbox_max_bytes=s.otlp_outbox_max_bytes,
            memory_queue_requests=s.otlp_queue_requests,
            max_request_bytes=s.otlp_max_request_bytes,
        )

    def _start_drainer(self) -> None:
        from ._drainer import Drainer, TraceStore

        if self.trace_store is None:
            self.trace_store = TraceStore(self.settings.trace_buffer_records)
        self.drainer = Drainer(
            self.sinks,
            flush_interval=self.settings.flush_interval,
            max_records=self.settings.max_records_per_file,
            trace_store=self.trace_store,
        )
        self.drainer.start()
        # Producers may now wait briefly for room instead of dropping (see _config).
        _native.configure(full_wait=self.settings.ring_full_wait)

    def _ensure_drainer(self) -> None:
        if self.drainer is not None and not self.drainer.is_alive() and self.running:
            self.restarts += 1
            self._start_drainer()

    def flush(self, timeout: float = _SHUTDOWN_TIMEOUT) -> bool:
        """Write everything recorded so far to every sink. Never raises."""
        try:
            if not self.running or self.drainer is None:
                return True
            self._ensure_drainer()
            if self.drainer.on_own_thread():
                return bool(self.drainer.flush(timeout))  # False at once (and warns): see there
            deadline = time.monotonic() + timeout
            done = bool(self.drainer.flush(timeout))
            for sink in self.sinks:
                done = sink.wait_idle(max(0.0, deadline - time.monotonic())) and done
            # True only when every sink holds nothing back (a failing disk or collector keeps
            # records pending)
            return done and all(sink.stats.pending == 0 for sink in self.sinks)
        except Exception as exc:
            warn_once("flush", f"cirron_otel: flush failed: {type(exc).__name__}: {exc}")
            return False

    def shutdown(self, timeout: float = _SHUTDOWN_TIMEOUT) -> None:
        """Close the session root, drain, stop the drainer and the sinks. Never raises."""
        if not self.running:
            return
        self.running = False
        try:
            if self.drainer is None:  # enabled=False
                _native.configure(recording=True)
                return
            _native.configure(full_wait=0.0)
            self.drainer.flush(timeout)
            _native.session_end()
            self.drainer.stop(timeout)
            for sink in self.sinks:
                try:
                    sink.shutdown(timeout)
                except Exception as exc:
                    sink.stats.error("shutdown failed", exc)
        except Exception as exc:
            warn_once("shutdown", f"cirron_otel: shutdown failed: {type(exc).__name__}: {exc}")

    def _after_fork_in_child(self) -> None:
        """The child gets its own session (a child of the parent's), drainer and sinks."""
        parent_session = self.session
        self.trace_store = None
        self.restarts = 0
        if self.drainer is None:
            return
        _native.session_end()  # the parent's root: not recorded here (it is the parent's)
        self.sinks = self._make_sinks()
        self.session = _native.session_begin(dict(self.settings.session_attrs), parent_session)
        self._start_drainer()

    # -- health ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        native = _safe(_native.stats, {})
        spool = next((x for x in self.sinks if getattr(x, "name", "") == "spool"), None)
        sinks = {x.name: _safe(x.stats.as_dict, {}) for x in self.sinks}
        s = self.settings
        return {
            "enabled": s.enabled and self.running,
            "native": True,
            "scope_drop_count": native.get("scope_depth_drops", 0),
            "mark_drop_count": native.get("marks_dropped", 0),
            "span_drop_count": native.get("spans_dropped", 0),
            "spool_drop_count": spool.drop_count if spool else 0,
            "spool_dir": spool.spool_dir if spool else None,
            "spool_bytes": _safe(spool.disk_bytes, 0) if spool else 0,
            "flush_mode": self._flush_mode(),
            "flush_restart_count": self.restarts,
            "transport": "otlp" if "otlp" in sinks else ("tracer_provider" if sinks.get("tracer_provider")
                                                          is not None else None),
            "installed_hooks": list(_hooks),
            "platform_context": _platform_context(s.rank),
            "otel_context": bool(getattr(self, "otel_context", False)),
            "records_recorded": native.get("marks_recorded", 0) + native.get("spans_recorded", 0),
            "marks_recorded": native.get("marks_recorded", 0),
            "spans_recorded": native.get("spans_recorded", 0),
            "records_pending": native.get("pending_slots", 0),
            "records_collected": native.get("marks_collected", 0) + native.get("spans_collected", 0),
            "records_written": sinks["spool"]["exported"] if spool else 0,
            "sinks": sinks,
            "drainer": {
                "alive": bool(self.drainer is not None and self.drainer.is_alive()),
                "cycle_errors": getattr(self.drainer, "cycle_errors", 0),
                "exports": getattr(self.drainer, "exports", 0),
                "wakeups": native.get("wakeups", 0),
                "threads_with_rings": native.get("rings_live", 0),
                "rings_freed": native.get("rings_freed", 0),
            },
        }

    def _flush_mode(self) -> str:
        if not self.settings.enabled:
            return "disabled"
        if self.running and self.drainer is not None and self.drainer.is_alive():
            return "background"
        return "stopped"


def _limit(value: int | None) -> int:
    return (1 << 31) - 1 if value is None else int(value)


def _sdk_tracer_provider(choice: Any) -> Any:
    """The SDK TracerProvider Cirron spans should join, if any (see Settings.tracer_provider)."""
    if choice is None:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    provider = trace.get_tracer_provider() if choice == "global" else choice
    return provider if isinstance(provider, TracerProvider) else None


def _session_trace() -> tuple[int, int]:
    session = _native.session()
    return (session.trace_id_hi, session.trace_id_lo) if session is not None else (0, 0)


def _install_otel_context() -> bool:
    try:
        from ._otel_context import install
    except ImportError:  # OpenTelemetry is not installed: Cirron scopes only
        return False
    return install()


def _safe(fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except Exception:
        return default


def _platform_context(rank: int) -> dict[str, Any]:
    import platform

    return {
        "pid": os.getpid(),
        "rank": rank,
        "host": platform.node(),
        "python": platform.python_version(),
        "platform": sys.platform,
    }


def _disabled_health() -> dict[str, Any]:
    stats = _safe(_native.stats, {})
    return {
        "enabled": False,
        "native": True,
        "scope_drop_count": stats.get("scope_depth_drops", 0),
        "mark_drop_count": stats.get("marks_dropped", 0),
        "span_drop_count": stats.get("spans_dropped", 0),
        "spool_drop_count": 0,
        "spool_dir": None,
        "spool_bytes": 0,
        "flush_mode": "stopped",
        "flush_restart_count": 0,
        "transport": None,
        "installed_hooks": list(_hooks),
        "platform_context": {},
        "records_recorded": stats.get("marks_recorded", 0) + stats.get("spans_recorded", 0),
        "records_pending": stats.get("pending_slots", 0),
        "records_written": 0,
        "sinks": {},
    }


# -- hooks ------------------------------------------------------------------------------


def _install_hooks(settings: Settings) -> None:
    if "atexit" not in _hooks:
        atexit.register(_at_exit)
        _hooks.append("atexit")
    if "fork" not in _hooks and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooks.append("fork")
    if settings.install_signal_handlers and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            name = f"signal:{signal.Signals(sig).name}"
            if name in _hooks:
                continue
            try:
                signal.signal(sig, _chain_handler(sig, signal.getsignal(sig)))
            except (ValueError, OSError):
                continue
            _hooks.append(name)


def _chain_handler(sig: int, previous: Any) -> Callable[[int, FrameType | None], Any]:
    def handler(signum: int, frame: FrameType | None) -> Any:
        if callable(previous):
            flush(timeout=_SIGNAL_FLUSH_TIMEOUT)
            return previous(signum, frame)
        if previous == signal.SIG_IGN:
            flush(timeout=_SIGNAL_FLUSH_TIMEOUT)
            return None
        # Default action (terminate): finish the session, then die by the same signal so
        # the exit status is what it would have been without us.
        shutdown(timeout=_SIGNAL_FLUSH_TIMEOUT)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return None

    handler.cirron_previous = previous  # type: ignore[attr-defined]
    return handler


def _at_exit() -> None:
    shutdown()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # the parent's lock may have been held by another thread
    try:
        _native.after_fork_child()
        _reset_warnings()
        if _active is not None and _active.running:
            _active._after_fork_in_child()
            _register_multiprocessing_finalizer()
    except Exception as exc:
        warn_once("fork", f"cirron_otel: could not restart after fork: {type(exc).__name__}: {exc}")


def _register_multiprocessing_finalizer() -> None:
    # multiprocessing children leave through os._exit(), which skips atexit, and their
    # bootstrap clears the finalizers registered so far; its after-fork callbacks run after
    # that, so register the finalizer from one of those.
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None and _active is not None:
        mp_util.register_after_fork(
            _active, lambda _prof: mp_util.Finalize(None, shutdown, exitpriority=100)
        )


# -- module-level API -------------------------------------------------------------------


def profile(**kwargs: Any) -> Profiler:
    """Start profiling (idempotent: a running profiler is returned as it is).

    Keyword arguments: output_dir, output, flush_interval, ring_capacity, spool_max_bytes,
    enabled, capture_cpu_time, ring_full_wait, trace_buffer_records, spool_retry_records,
    file_mode, install_signal_handlers, session_attrs. See README for each.
    """
    global _active, _last
    with _lock:
        if _active is not None and _active.running:
            return _active
        from ._config import resolve

        settings = resolve(**kwargs)
        prof = Profiler(settings)
        prof.start()
        _active = _last = prof
        if settings.enabled:
            _install_hooks(settings)
        return prof


def flush(timeout: float = _SHUTDOWN_TIMEOUT) -> bool:
    """Synchronously write everything recorded so far. Never raises; False on timeout."""
    prof = _active
    return prof.flush(timeout) if prof is not None else True


def shutdown(timeout: float = _SHUTDOWN_TIMEOUT) -> None:
    """Close the session root, flush, and stop. Idempotent; never raises."""
    global _active
    with _lock:
        prof = _active
        _active = None
    if prof is not None:
        prof.shutdown(timeout)


def health() -> dict[str, Any]:
    """Counters and state of the active (or last) profiler. Never raises."""
    try:
        prof = _active or _last
        if prof is None or not prof.settings.enabled:
            return _disabled_health()
        return prof.health()
    except Exception as exc:
        return {"enabled": False, "error": f"{type(exc).__name__}: {exc}"}


def trace(
    format: Literal["tree", "dict", "json"] = "tree",
    name: str | None = None,
    last: int | None = None,
) -> Any:
    """The live session's closed spans with their marks, as a text tree, dicts or JSON."""
    from . import _trace

    prof = _active or _last
    if prof is not None and prof.running:
        prof.flush()
    batches = prof.trace_store.snapshot() if prof is not None and prof.trace_store else []
    session = _native.session() if prof is not None and prof.running else None
    return _trace.render(batches, session, format=format, name=name, last=last)
