"""profile(), the Profiler it returns, and the module-level health/flush/shutdown/trace.

The profiler owns the process-wide pieces: the session root span, the drainer thread, the
sinks, and the hooks (atexit, SIGTERM/SIGINT, fork). Everything here is cold path: the hot
path (mark, scopes, epochs) is entirely in `_native`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time

from . import _native
from ._warn import reset_in_forked_child as _reset_warnings
from ._warn import warn_once

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import Any, Literal

    from ._config import Settings
    from ._drainer import Drainer, TraceStore
    from ._health import Health
    from .sink import Sink

_SHUTDOWN_TIMEOUT = 10.0
_SIGNAL_FLUSH_TIMEOUT = 5.0

_lock = threading.RLock()
_active: Profiler | None = None
_last: Profiler | None = None  # kept after shutdown so trace()/health() still answer
_hooks: list[str] = []

# Signals and shutdown. Python runs signal handlers on the main thread between bytecodes, so
# a second SIGTERM lands inside our own flush/shutdown (in its waits). While the main thread
# is in one (_busy > 0) signals are held, not acted on: the third since the flush began ends
# the process at once by that signal (the way out), others are acted on once it is done.
_busy = 0
_held: list[int] = []
_signals_seen = 0  # since the current busy period began, counting the one that began it
_shutdown_owner: int | None = None  # thread ident running shutdown()
_shutdown_done = threading.Event()
_shutdown_done.set()


class Profiler:
    """One profiling session: the `cirron.session` root span, a drainer, and its sinks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running = False
        self.restarts = 0
        self.sinks: list[Sink] = []
        self.drainer: Drainer | None = None
        self.trace_store: TraceStore | None = None
        self.session: _native.Scope | None = None
        self.framework_hooks: list[Any] = []  # installed framework hooks (_hooks_common)
        self.framework_finders: dict[str, Any] = {}  # _on_import's, for frameworks not imported yet
        self.hook_context: Any = None  # the hooks' epoch / step hand-over (_hooks_common)

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
        from ._config import sampler_bound

        _native.set_sampler(*sampler_bound(s.sampler, s.sampler_ratio))
        from ._threads import signals_blocked

        with signals_blocked():  # threads the sinks' libraries start (gRPC, OTel) inherit it
            self.sinks = self._make_sinks()
            self.session = _native.session_begin(_session_attrs(s.session_attrs))
            self._start_drainer()
        self.running = True

    def _make_sinks(self) -> list[Sink]:
        # Sinks come from the registry (cirron_otel.sink): the profiler chooses which ones,
        # the consumer side (exporters/) builds them.
        from .sink import make_sink, setup_sinks

        s = self.settings
        setup_sinks(s)  # the OTLP outbox's SpoolDirectory follows the file mode too
        sinks: list[Sink] = []
        if "spool" in s.outputs:
            sinks.append(make_sink("spool", s))
        if "log" in s.outputs or "stdout" in s.outputs:  # cirron-sdk's one line per closed span
            from ._line_sinks import LogSink, StdoutSink

            sinks.extend(
                sink() for name, sink in (("log", LogSink), ("stdout", StdoutSink)) if name in s.outputs
            )
        # OTEL_SDK_DISABLED: no OpenTelemetry export of any kind, not even through the app's
        # provider (the SDK's own provider then exports nothing either).
        provider = (
            None if s.otel_sdk_disabled else _sdk_tracer_provider(s.tracer_provider, s.env_tracer_provider)
        )
        if provider is not None:
            # The application's provider: Cirron spans go where its spans go.
            self._configure_otlp_limits()
            sinks.append(make_sink("tracer_provider", s, provider=provider, session_trace=_session_trace))
        if "otlp" in s.outputs and (provider is None or s.otlp_endpoint):
            try:
                sinks.append(
                    make_sink(
                        "otlp", s, session_trace=_session_trace, otlp_limits=self._configure_otlp_limits
                    )
                )
            except Exception as exc:  # a broken OTLP setup must not stop profiling
                warn_once("otlp-setup", f"cirron_otel: OTLP export disabled: {type(exc).__name__}: {exc}")
        if s.metrics:  # marks as metrics (README): a sink of its own, so traces never wait on it
            try:
                sinks.append(
                    make_sink("otlp_metrics", s, session_trace=_session_trace, health=self._metrics_health)
                )
            except Exception as exc:
                warn_once(
                    "metrics-setup", f"cirron_otel: metrics export disabled: {type(exc).__name__}: {exc}"
                )
        if provider is None:  # with the app's provider, its own exporters are the ones configured
            for name in s.span_exporters:
                try:
                    sinks.append(
                        make_sink(
                            "span_exporter",
                            s,
                            name=name,
                            session_trace=_session_trace,
                            otlp_limits=self._configure_otlp_limits,
                        )
                    )
                except Exception as exc:
                    warn_once(
                        f"exporter:{name}",
                        f"cirron_otel: OTEL_TRACES_EXPORTER: exporter {name!r} "
                        f"not used: {type(exc).__name__}: {exc}",
                    )
        return sinks

    def _configure_otlp_limits(self) -> int:
        from opentelemetry.sdk.trace import SpanLimits

        limits = SpanLimits()  # OTEL_SPAN_*_LIMIT and OTEL_ATTRIBUTE_* from the environment
        _native.configure(
            otlp=True,
            span_attr_limit=_limit(limits.max_span_attributes),
            event_attr_limit=_limit(limits.max_event_attributes),
            value_len_limit=-1 if limits.max_attribute_length is None else limits.max_attribute_length,
            link_limit=_limit(limits.max_links),
            link_attr_limit=_limit(limits.max_link_attributes),
        )
        return _limit(limits.max_events)

    def _start_drainer(self) -> None:
        from ._drainer import Drainer, TraceStore

        if self.trace_store is None:
            self.trace_store = TraceStore(self.settings.trace_buffer_records)
        self.drainer = Drainer(
            self.sinks,
            flush_interval=self.settings.flush_interval,
            max_records=self.settings.max_records_per_file,
            trace_store=self.trace_store,
            on_tick=_check_signals,
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

    def shutdown(self, timeout: float = _SHUTDOWN_TIMEOUT, *, exiting: bool = False) -> None:
        """Close the session root, drain, stop the drainer and the sinks. Never raises.

        Takes at most `timeout` in all (one deadline for every stage). `exiting` (the exit
        hook, a terminating signal, a multiprocessing child's finalizer): threads still
        running (daemon threads) stop recording first, so what they recorded up to now is
        written and a flat-out producer can neither overwrite it nor keep the drain going.
        """
        if not self.running:
            return
        self.running = False
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        try:
            if self.drainer is None:  # enabled=False
                _native.configure(recording=True)
                return
            # first, while recording is on: the hooks' open step and epoch spans are written,
            # and the training code finds torch's own functions again
            _uninstall_framework_hooks(self)
            _native.configure(full_wait=0.0)
            if exiting:
                _native.configure(recording=False)
            self.drainer.flush(left())
            if exiting:  # closing the session writes its record: recording must be on for it
                _native.configure(recording=True)
            _native.session_end()
            if exiting:
                _native.configure(recording=False)
            _native.set_sampler(True, 0)  # traces started from now on: the default again
            self.drainer.stop(left())
            for sink in self.sinks:
                try:
                    if exiting:
                        sink.at_exit()
                    sink.shutdown(left())
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
        _export_to_children(self)  # this child's own children link to this child's session

    # -- health ---------------------------------------------------------------------------

    def _metrics_health(self) -> tuple[int, dict[str, tuple[int, int]], float, int]:
        """What the health metrics report, called by the metrics sink at each export:
        (records recorded, sink -> (written, dropped), the fullest ring's fill, outbox bytes)."""
        native = _native.stats()
        return (
            int(native["marks_recorded"] + native["spans_recorded"]),
            {s.name: (s.stats.exported, s.stats.dropped) for s in self.sinks},
            float(native["ring_fill_max"]),
            sum(s.outbox_bytes() for s in self.sinks),
        )

    def health(self) -> Health:
        from ._health import build

        return build(self, _hooks)

    # -- cirron-sdk 0.3.0's Profiler handle ----------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self.settings.enabled)

    @property
    def cirron(self) -> Any:
        from .compat import get_default

        return get_default()

    @property
    def installed_hooks(self) -> list[str]:
        return [h.name for h in self.framework_hooks]

    @property
    def hook_handles(self) -> list[Any]:
        return list(self.framework_hooks)

    @property
    def platform_context(self) -> dict[str, str]:
        from ._config import sdk_platform_context

        return sdk_platform_context() if self.settings.enabled else {}

    def trace(
        self,
        format: Literal["tree", "dict", "json", "df"] = "tree",
        name: str | None = None,
        last: int | None = None,
    ) -> Any:
        return trace(format=format, name=name, last=last)


def _limit(value: int | None) -> int:
    return (1 << 31) - 1 if value is None else int(value)


def _sdk_tracer_provider(choice: Any, env_provider: bool = False) -> Any:
    """The SDK TracerProvider Cirron spans should join, if any (see Settings.tracer_provider)."""
    if choice is None:
        return None
    if choice == "global" and "opentelemetry.sdk.trace" not in sys.modules and not env_provider:
        # No SDK provider can be the global one before the SDK is imported (the variable has
        # the API make one on first use): do not import OpenTelemetry for nothing.
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    provider = trace.get_tracer_provider() if choice == "global" else choice
    if not isinstance(provider, TracerProvider):
        return None
    from ._otel_private import UpstreamChanged, span_processor

    try:
        span_processor(provider)
    except UpstreamChanged as exc:  # the spool and OTLP still work; say why this one does not
        warn_once("tracer-provider", f"cirron_otel: spans not sent through the TracerProvider: {exc}")
        return None
    return provider


def _session_trace() -> tuple[int, int]:
    session = _native.session()
    return (session.trace_id_hi, session.trace_id_lo) if session is not None else (0, 0)


def _install_otel_context() -> bool:
    # Imports no OpenTelemetry: installs now if the program has imported it, else on its import.
    from ._otel_context import install

    try:
        return install()
    except Exception as exc:  # e.g. OpenTelemetry changed a private attribute: scopes only
        warn_once(
            "otel-context",
            f"cirron_otel: scopes will not join OpenTelemetry's context: {type(exc).__name__}: {exc}",
        )
        return False


def _safe(fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except Exception:
        return default


# -- hooks ------------------------------------------------------------------------------


def _install_framework_hooks(prof: Profiler, detected: list[str]) -> None:
    """cirron-sdk's framework hooks (`_hooks_common.FRAMEWORKS`), in its install order.

    `frameworks` given (profile's, config's, cirron.yaml's): those, now, importing the framework
    as the SDK does. Not given: the SDK's `detected` ones (found installed, by find_spec), each
    when the program imports the module the hooks patch (torch, transformers.trainer, keras):
    now if it has, else right after it does (`_on_import`). A framework is never imported just
    to look (the SDK imports every one it finds installed at profile())."""
    from . import compat
    from ._hooks_common import FRAMEWORKS, HookContext, priority

    explicit = compat.profiling_config()["frameworks"] is not None
    prof.hook_context = HookContext()
    for name in sorted(dict.fromkeys(detected), key=priority):
        if name not in FRAMEWORKS:
            hint = " (cirron-sdk's Keras hooks are named 'tensorflow')" if name == "keras" else ""
            warn_once(
                f"framework:{name}",
                f"cirron_otel: unknown framework {name!r}, no hooks installed{hint} "
                f"(known: {', '.join(sorted(FRAMEWORKS))})",
            )
            continue
        trigger = FRAMEWORKS[name][1]
        if explicit or sys.modules.get(trigger) is not None:
            _add_framework_hooks(prof, name)
        elif trigger not in sys.modules:  # (present as None: its import is blocked)
            from ._on_import import on_import

            def imported(name: str = name) -> None:
                _on_framework_imported(prof, name)

            prof.framework_finders[name] = on_import(trigger, imported)


def _add_framework_hooks(prof: Profiler, name: str) -> None:
    """Install `name`'s hooks (never raises: a failure is counted as `<name>.install`)."""
    from importlib import import_module

    from ._hooks_common import FRAMEWORKS, priority

    try:
        module = import_module(f".{FRAMEWORKS[name][0]}", __package__)
        hooks = module.install(prof.hook_context)
    except Exception as exc:  # never stops profile(), never breaks the program's import
        from .compat import swallowed

        swallowed(f"{name}.install", exc)
        return
    if hooks is not None:
        prof.framework_hooks.append(hooks)
        prof.framework_hooks.sort(key=lambda h: priority(h.name))  # the SDK's order


def _on_framework_imported(prof: Profiler, name: str) -> None:
    """The program imported `name`'s module after profile(): install its hooks now."""
    prof.framework_finders.pop(name, None)
    if not prof.running or any(h.name == name for h in prof.framework_hooks):
        return
    _add_framework_hooks(prof, name)


def _uninstall_framework_hooks(prof: Profiler) -> None:
    from ._on_import import cancel

    finders, prof.framework_finders = prof.framework_finders, {}
    for finder in finders.values():
        cancel(finder)
    hooks, prof.framework_hooks = prof.framework_hooks, []
    for h in reversed(hooks):  # the SDK's order: torch first, the callbacks' frameworks after
        try:
            h.uninstall()
        except Exception as exc:
            from .compat import swallowed

            swallowed(f"{h.name}.uninstall", exc)


def _install_hooks(settings: Settings) -> None:
    if "atexit" not in _hooks:
        _hooks.append("atexit")  # registered at import (see the end of this module)
    if "fork" not in _hooks and hasattr(os, "register_at_fork"):
        os.register_at_fork(
            before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
        )
        _hooks.append("fork")
    if settings.install_signal_handlers and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            name = f"signal:{signal.Signals(sig).name}"
            if name in _hooks:
                continue
            previous = signal.getsignal(sig)
            try:
                signal.signal(sig, _chain_handler(sig, previous))
            except (ValueError, OSError):
                continue
            _hooks.append(name)
            with contextlib.suppress(OSError, ValueError, AttributeError):
                if _native.watch_signal(sig):
                    _handled[sig] = _native.signals_received(sig)
                    _watched[sig] = previous


def _chain_handler(sig: int, previous: Any) -> Callable[[int, FrameType | None], Any]:
    def handler(signum: int, frame: FrameType | None) -> Any:
        global _busy, _signals_seen
        if signum in _watched:  # seen by the main thread: the drainer's watch stands down
            _handled[signum] = _native.signals_received(signum)
        if _busy:  # inside our own flush or shutdown: hold it (or, the third, die)
            if previous != signal.SIG_IGN:  # ignored before us: stays ignored, never fatal
                _hold(signum)
            return None
        _busy += 1
        _held.clear()
        _signals_seen = 1
        try:
            if callable(previous) or previous == signal.SIG_IGN:
                flush(timeout=_signal_timeout())
            else:
                _shutdown(_signal_timeout(), exiting=True)
        finally:
            _busy -= 1
            # the same signal again is coalesced into this one, as the kernel does
            later = [s for s in dict.fromkeys(_held) if s != signum]
            _held.clear()
            _signals_seen = 0
        if previous == signal.SIG_IGN:
            _replay(later)
            return None
        if callable(previous):
            result = previous(signum, frame)
            _replay(later)
            return result
        # Default action (terminate): the session is finished; die by the same signal so the
        # exit status is what it would have been without us.
        _die(signum)
        return None

    handler.cirron_previous = previous  # type: ignore[attr-defined]
    return handler


def _hold(signum: int) -> None:
    global _signals_seen
    _signals_seen += 1
    if _signals_seen >= 3:  # the way out for someone who really means it
        _die(signum)
    _held.append(signum)


def _replay(signals: list[int]) -> None:
    # Act on signals held during a flush or shutdown, now that it is done: their handler
    # (ours, then the application's or the default action) runs before raise_signal returns.
    for signum in signals:
        signal.raise_signal(signum)


def _die(signum: int) -> None:
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


# The watch over signals the main thread does not get to (see watch_signal in module.c):
# a signal whose default action is to end the process (the handler before ours was SIG_DFL),
# counted by the C handler but not seen by our Python handler for _SIGNAL_GRACE, is acted on
# by a thread of ours: shut down (everything recorded is written), then die by that signal,
# as the process would have without us. An application's own handler, or SIG_IGN, is left to
# the main thread: only it may run them.
_SIGNAL_GRACE = 0.25
_watched: dict[int, Any] = {}  # signal -> the handler before ours
_handled: dict[int, int] = {}  # signal -> the C count when our Python handler last ran
_unhandled_since: dict[int, float] = {}
_ending_by_signal = False


def _check_signals() -> None:
    """Called by the drainer every tick (cheap: one C load per watched signal)."""
    global _ending_by_signal
    for sig, previous in _watched.items():
        if previous not in (signal.SIG_DFL, None) or _ending_by_signal:
            continue
        if _native.signals_received(sig) <= _handled.get(sig, 0):
            _unhandled_since.pop(sig, None)
            continue
        now = time.monotonic()
        if now - _unhandled_since.setdefault(sig, now) >= _SIGNAL_GRACE:
            from ._threads import BackgroundThread

            _ending_by_signal = True
            BackgroundThread(target=_end_by_signal, args=(sig,), name="cirron-otel-signal").start()


def _end_by_signal(sig: int) -> None:
    _shutdown(_signal_timeout(), exiting=True)
    _native.die_by_signal(sig)
    time.sleep(1.0)  # every thread blocks it (the main thread too): end the process anyway
    os._exit(128 + sig)


def _signal_timeout() -> float:
    prof = _active
    limit = prof.settings.shutdown_timeout if prof is not None else _SHUTDOWN_TIMEOUT
    return min(_SIGNAL_FLUSH_TIMEOUT, limit)


def _at_exit() -> None:
    """The exit hook (atexit, and multiprocessing children's finalizer)."""
    prof = _active
    _shutdown(prof.settings.shutdown_timeout if prof is not None else _SHUTDOWN_TIMEOUT, exiting=True)


# A Python-level signal handler loses a signal that reaches a forked child before the
# interpreter has re-initialised (CPython clears the child's pending-signal flags, bpo-9535),
# and Pool.terminate() sends SIGTERM to workers that may have just been forked: the worker
# would then live on and terminate() wait for it forever. So the forking thread blocks the
# signals we handle across fork(): one that arrives meanwhile stays pending in the kernel,
# and is delivered when the child's after-fork hook (ours runs last) restores the mask.
_FORK_BLOCKED = frozenset({signal.SIGTERM, signal.SIGINT})
_mask_before_fork: set[signal.Signals] | None = None


def _block_signals_for_fork() -> None:
    global _mask_before_fork
    if _mask_before_fork is None:  # a fork from inside another fork's hooks: keep the first
        try:
            _mask_before_fork = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        except (OSError, ValueError):
            _mask_before_fork = None


def _restore_signals_after_fork() -> None:
    global _mask_before_fork
    mask, _mask_before_fork = _mask_before_fork, None
    if mask is not None:
        with contextlib.suppress(OSError, ValueError):
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _before_fork() -> None:
    _block_signals_for_fork()
    prof = _active
    for sink in prof.sinks if prof is not None else ():
        try:
            sink.before_fork()
        except Exception as exc:  # a fork hook must never fail the user's fork
            sink.stats.error("before fork", exc)


def _after_fork_in_parent() -> None:
    prof = _active
    try:
        for sink in prof.sinks if prof is not None else ():
            try:
                sink.after_fork_in_parent()
            except Exception as exc:
                sink.stats.error("after fork", exc)
    finally:
        _restore_signals_after_fork()


def _after_fork_in_child() -> None:
    global _lock, _shutdown_done, _shutdown_owner, _ending_by_signal
    _lock = threading.RLock()  # the parent's lock may have been held by another thread
    _ending_by_signal = False  # the parent's thread ending it is not in the child
    _unhandled_since.clear()
    if _shutdown_owner != threading.get_ident():  # a shutdown on a thread the child lacks
        _shutdown_owner = None
        _shutdown_done = threading.Event()
        _shutdown_done.set()
    try:
        _native.after_fork_child()
        _reset_warnings()
        if _active is not None and _active.running:
            _active._after_fork_in_child()
            _register_multiprocessing_finalizer()
    except Exception as exc:
        warn_once("fork", f"cirron_otel: could not restart after fork: {type(exc).__name__}: {exc}")
    finally:
        # last: a SIGTERM held since the fork now finds the child's session and drainer ready
        _restore_signals_after_fork()


def _register_multiprocessing_finalizer() -> None:
    # multiprocessing children leave through os._exit(), which skips atexit, and their
    # bootstrap clears the finalizers registered so far; its after-fork callbacks run after
    # that, so register the finalizer from one of those.
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None and _active is not None:
        mp_util.register_after_fork(_active, lambda _prof: mp_util.Finalize(None, _at_exit, exitpriority=100))


# -- children started by spawn / forkserver (or any program the profiled one starts) ----------


def _session_attrs(attrs: Any) -> dict[str, Any]:
    """The session's attributes, plus the link to the parent process's session, if any."""
    from ._config import inherited_parent

    out = dict(attrs)
    parent = inherited_parent()
    if parent is not None and parent[1] != os.getpid():
        out.setdefault("cirron.parent_session_id", parent[0])
        out.setdefault("cirron.parent_pid", parent[1])
    return out


def _export_to_children(prof: Profiler) -> None:
    from ._config import export_to_children

    if prof.session is not None and prof.session.id is not None:
        export_to_children(os.path.abspath(prof.settings.output_dir), prof.session.id, os.getpid())


def _start_inherited() -> None:
    """Profile this multiprocessing child into its profiled parent's output directory."""
    if _active is not None and _active.running:
        return  # a fork child: already restarted by the fork hook
    try:
        profile()  # output_dir from CIRRON_OUTPUT_DIR, the parent link from the environment
        mp_util = sys.modules.get("multiprocessing.util")
        if mp_util is not None:  # the child leaves through os._exit(): atexit does not run
            mp_util.Finalize(None, _at_exit, exitpriority=100)
    except Exception as exc:
        warn_once("child", f"cirron_otel: could not profile this child process: {type(exc).__name__}: {exc}")


def _start_if_multiprocessing_child() -> None:
    from ._config import inherited_parent

    parent = inherited_parent()
    if parent is None or parent[1] == os.getpid():
        return
    mp_process = sys.modules.get("multiprocessing.process")
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_process is None or mp_util is None:
        return  # not a multiprocessing child: such a program profiles itself with ci.profile()
    inheriting = getattr(mp_process.current_process(), "_inheriting", False)
    if inheriting and _in_forkserver():
        # the forkserver preloading the main module: not in the server itself, but in each
        # child it forks (their bootstrap runs the after-fork callbacks; spawn's does not)
        mp_util.register_after_fork(_start_inherited, lambda _fn: _start_inherited())
    elif inheriting or mp_process.parent_process() is not None:
        # a spawn child importing the main module, or a running child importing us later
        _start_inherited()


def _in_forkserver() -> bool:
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is None:
        return False
    frame: FrameType | None = sys._getframe()
    while frame is not None:  # are we imported from the server's main()?
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


# -- module-level API -------------------------------------------------------------------


def profile(
    config: dict[str, Any] | None = None,
    frameworks: list[str] | None = None,
    snapshots: Literal["stats", "sampled", "full"] | None = None,
    sample_rate: float | None = None,
    flush_interval: float | None = None,
    enabled: bool = True,
    path: str | None = None,
    output: str | list[str] | None = None,
    **kwargs: Any,
) -> Profiler:
    """Start profiling (idempotent: a running profiler is returned as it is).

    cirron-sdk 0.3.0's arguments, in its order (config, frameworks, snapshots, sample_rate,
    flush_interval, enabled, path, output: see README, compatibility), then ours by keyword:
    output_dir, ring_capacity, spool_max_bytes, capture_cpu_time, ring_full_wait,
    trace_buffer_records, spool_retry_records, file_mode, install_signal_handlers,
    session_attrs, ... See README for each.
    """
    return _profile(
        None,
        config=config,
        frameworks=frameworks,
        snapshots=snapshots,
        sample_rate=sample_rate,
        flush_interval=flush_interval,
        enabled=enabled,
        path=path,
        output=output,
        ours=kwargs,
    )


def _profile(
    cirron: Any,
    *,
    config: Any,
    frameworks: Any,
    snapshots: Any,
    sample_rate: Any,
    flush_interval: Any,
    enabled: bool,
    path: Any,
    output: Any,
    ours: dict[str, Any],
) -> Profiler:
    global _active, _last
    with _lock:
        if _active is not None and _active.running:
            return _active
        from . import compat
        from ._config import resolve

        kwargs = dict(ours, enabled=enabled)
        detected: list[str] = []  # the frameworks whose hooks apply (compat.session_attrs)
        if flush_interval is not None:
            kwargs["flush_interval"] = flush_interval
        if enabled:  # the SDK resolves nothing for a disabled profiler either
            kwargs = compat.sdk_profile_kwargs(
                cirron,
                config=config,
                frameworks=frameworks,
                snapshots=snapshots,
                sample_rate=sample_rate,
                flush_interval=flush_interval,
                path=path,
                output=output,
                ours=kwargs,
            )
            # the session span's attributes as the SDK writes them; the caller's session_attrs win
            attrs, detected = compat.session_attrs(compat.profiling_config()["frameworks"])
            kwargs["session_attrs"] = {**attrs, **(kwargs.get("session_attrs") or {})}
        elif output is not None:
            kwargs["output"] = output
        settings = resolve(**kwargs)
        prof = Profiler(settings)
        prof.start()
        _active = _last = prof
        if settings.enabled:
            _install_hooks(settings)
            _install_framework_hooks(prof, detected)
            _export_to_children(prof)
            if any(getattr(x, "name", "") == "tracer_provider" for x in prof.sinks):
                _flush_before_the_provider_exits()
        return prof


_provider_exit_hook = False


def _flush_before_the_provider_exits() -> None:
    """An SDK TracerProvider shuts down at exit through its own atexit handler. One created
    after `cirron_otel` was imported (e.g. by `opentelemetry-instrument`, whose exporter
    entry points may import us first) would shut down before our exit hook, and every Cirron
    span not yet handed to it would be lost. A handler registered now, after the provider,
    runs before its shutdown: it hands the provider what was recorded so far."""
    global _provider_exit_hook
    if not _provider_exit_hook:
        _provider_exit_hook = True
        atexit.register(_flush_into_provider)


def _flush_into_provider() -> None:
    prof = _active
    if prof is not None and prof.running:
        prof.flush(min(prof.settings.shutdown_timeout, _SIGNAL_FLUSH_TIMEOUT))


def flush(timeout: float = _SHUTDOWN_TIMEOUT) -> bool:
    """Synchronously write everything recorded so far. Never raises; False on timeout."""
    prof = _active
    return prof.flush(timeout) if prof is not None else True


def shutdown(timeout: float = _SHUTDOWN_TIMEOUT) -> None:
    """Close the session root, flush, and stop. Idempotent; never raises."""
    _shutdown(timeout)


def _shutdown(timeout: float, *, exiting: bool = False) -> None:
    global _active, _busy, _signals_seen, _shutdown_owner
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:  # a signal arriving meanwhile is held until this is done (see _chain_handler)
        if _busy == 0:
            _held.clear()
            _signals_seen = 0
        _busy += 1
    try:
        me = threading.get_ident()
        with _lock:
            prof, _active = _active, None
            owner = _shutdown_owner
            if prof is not None:
                _shutdown_owner = me
                _shutdown_done.clear()
        if prof is None:
            if owner is not None and owner != me:
                # another thread is shutting down: a signal's exit must wait for it, not cut it
                _shutdown_done.wait(timeout)
            return
        try:
            prof.shutdown(timeout, exiting=exiting)
        finally:
            _restore_children_env()
            _shutdown_owner = None
            _shutdown_done.set()
    finally:
        if on_main:
            _busy -= 1
            if _busy == 0 and _held:
                later = list(dict.fromkeys(_held))
                _held.clear()
                _signals_seen = 0
                _replay(later)


def _restore_children_env() -> None:
    from ._config import restore_children_env

    _safe(restore_children_env, None)  # a broken environment must not stop a shutdown


def spool_path() -> str | None:
    """The spool directory the active (or last) profiler of this process writes, if any (the
    cirron_spool exporter leaves Cirron's own spans to it, so they are not written twice)."""
    prof = _active or _last
    spool = next((x for x in prof.sinks if getattr(x, "name", "") == "spool"), None) if prof else None
    return getattr(spool, "spool_dir", None)


def health() -> Health | dict[str, Any]:
    """Counters and state of the active (or last) profiler. Never raises."""
    try:
        from ._health import build

        prof = _active or _last
        return build(prof if prof is not None and prof.settings.enabled else None, _hooks)
    except Exception as exc:
        return {"enabled": False, "error": f"{type(exc).__name__}: {exc}"}


def trace(
    format: Literal["tree", "dict", "json", "df"] = "tree",
    name: str | None = None,
    last: int | None = None,
) -> Any:
    """The session's closed spans with their marks, as cirron-sdk 0.3.0 returns them (see _trace)."""
    from . import _trace

    prof = _active or _last
    if prof is not None and prof.running:
        prof.flush()
    batches = prof.trace_store.snapshot() if prof is not None and prof.trace_store else []
    session = _native.session() if prof is not None and prof.running else None
    return _trace.render(batches, session, format=format, name=name, last=last)


# The exit hook is registered at import, not in profile(): atexit runs handlers last-in
# first-out, so every exit handler the application registers after importing cirron_otel
# (including before profile()) runs before ours and its marks are written.
atexit.register(_at_exit)
try:
    _start_if_multiprocessing_child()
except Exception as _exc:  # importing cirron_otel must never fail because of this
    warn_once("child", f"cirron_otel: could not profile this child process: {type(_exc).__name__}: {_exc}")
