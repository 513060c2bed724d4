"""What `health()` returns: one typed description (`Health`) and the one function that fills it.

Enabled or not, running or stopped, the answer has the same keys: a disabled or absent
profiler is simply one with no sinks, no drainer and no settings, so its values are the
neutral ones (zeros, None, empty) rather than missing. Imported by the first `health()`
call only (it imports `typing`, which a profiled program's start-up does not need).
"""

from __future__ import annotations

import os
import sys
from typing import Any, TypedDict

from . import _native

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ._profiler import Profiler


class OtelHealth(TypedDict):
    """What the OTEL_* variables made of OpenTelemetry export."""

    sdk_disabled: bool
    export: str  # "on", "off", or "disabled by OTEL_SDK_DISABLED"
    exporters: list[str]  # the names of the sinks other than the spool
    sampler: str
    sampler_ratio: float | None  # for the traceidratio samplers only
    unsampled_spans: int


class DrainerHealth(TypedDict):
    alive: bool
    cycle_errors: int
    exports: int
    wakeups: int
    threads_with_rings: int
    rings_freed: int


class Health(TypedDict):
    # cirron-sdk 0.3.0's keys, with its meanings
    enabled: bool
    scope_drop_count: int
    mark_drop_count: int
    spool_drop_count: int
    swallowed_error_count: int  # sum of swallowed_errors
    swallowed_errors: dict[str, int]  # internal failures counted (never raised), by where
    spool_dir: str | None
    spool_bytes: int
    flush_mode: str  # "normal" while the drainer runs, else "stopped" (the SDK's values)
    flush_restart_count: int
    transport: str | None  # the Cirron platform transport: "FileOnlyTransport" (never the platform)
    installed_hooks: list[str]  # framework hooks installed ("transformers", "tensorflow", "torch")
    platform_context: dict[str, str]  # the CIRRON_RUN_ID / _PIPELINE_ID / ... values set
    # cirron-otel's own
    native: bool
    span_drop_count: int
    drainer_state: str  # "background", "stopped" or "disabled"
    otel_transport: str | None  # "otlp", "tracer_provider" or None
    process_hooks: list[str]  # atexit, fork, signal:SIGTERM, ...
    process: dict[str, Any]  # pid, rank, host, python, platform; empty while disabled
    otel_context: bool
    otel: OtelHealth
    records_recorded: int
    marks_recorded: int
    spans_recorded: int
    records_pending: int
    records_collected: int
    records_written: int
    sinks: dict[str, dict[str, Any]]
    drainer: DrainerHealth


def build(prof: Profiler | None, hooks: list[str]) -> Health:
    """The health of `prof`; None (what `health()` passes while profiling is disabled or was
    never started) gives the same keys with neutral values."""
    native = _safe(_native.stats, {})
    sink_list = prof.sinks if prof is not None else []
    drainer = prof.drainer if prof is not None else None
    spool = next((x for x in sink_list if getattr(x, "name", "") == "spool"), None)
    sinks = {x.name: _safe(x.stats.as_dict, {}) for x in sink_list}
    enabled = prof is not None and prof.settings.enabled and prof.running
    swallowed = _swallowed(drainer)
    drainer_state = _flush_mode(prof)
    # Once stopped, the SDK answers with zeros and no spool_dir (it forgets the profiler); the
    # last run's counters and spool stay readable here (recorded = written + dropped holds
    # after shutdown too), the one difference in these keys.
    return Health(
        enabled=enabled,
        scope_drop_count=native.get("scope_depth_drops", 0),
        mark_drop_count=native.get("marks_dropped", 0),
        spool_drop_count=spool.drop_count if spool else 0,
        swallowed_error_count=sum(swallowed.values()),
        swallowed_errors=swallowed,
        spool_dir=spool.spool_dir if spool else None,
        spool_bytes=_safe(spool.disk_bytes, 0) if spool else 0,
        flush_mode="normal" if drainer_state == "background" else "stopped",
        flush_restart_count=prof.restarts if prof is not None else 0,
        transport="FileOnlyTransport" if enabled else None,
        installed_hooks=[h.name for h in prof.framework_hooks] if enabled and prof is not None else [],
        platform_context=_safe(_sdk_platform_context, {}) if enabled else {},
        native=True,
        span_drop_count=native.get("spans_dropped", 0),
        drainer_state=drainer_state,
        otel_transport="otlp"
        if "otlp" in sinks
        else ("tracer_provider" if sinks.get("tracer_provider") is not None else None),
        process_hooks=list(hooks),
        process=_platform_context(prof.settings.rank) if prof is not None else {},
        otel_context=bool(getattr(prof, "otel_context", False)),
        otel=_otel(prof),
        records_recorded=native.get("marks_recorded", 0) + native.get("spans_recorded", 0),
        marks_recorded=native.get("marks_recorded", 0),
        spans_recorded=native.get("spans_recorded", 0),
        records_pending=native.get("pending_slots", 0),
        records_collected=native.get("marks_collected", 0) + native.get("spans_collected", 0),
        records_written=sinks["spool"]["exported"] if spool else 0,
        sinks=sinks,
        drainer=DrainerHealth(
            alive=bool(drainer is not None and drainer.is_alive()),
            cycle_errors=getattr(drainer, "cycle_errors", 0),
            exports=getattr(drainer, "exports", 0),
            wakeups=native.get("wakeups", 0),
            threads_with_rings=native.get("rings_live", 0),
            rings_freed=native.get("rings_freed", 0),
        ),
    )


def _otel(prof: Profiler | None) -> OtelHealth:
    if prof is None:
        from ._config import DEFAULT_SAMPLER

        return OtelHealth(
            sdk_disabled=False,
            export="off",
            exporters=[],
            sampler=DEFAULT_SAMPLER,
            sampler_ratio=None,
            unsampled_spans=0,
        )
    s = prof.settings
    exporters = [x.name for x in prof.sinks if x.name != "spool"]
    return OtelHealth(
        sdk_disabled=s.otel_sdk_disabled,
        export="disabled by OTEL_SDK_DISABLED" if s.otel_sdk_disabled else ("on" if exporters else "off"),
        exporters=exporters,
        sampler=s.sampler,
        sampler_ratio=s.sampler_ratio if s.sampler.endswith("traceidratio") else None,
        # every OpenTelemetry sink encodes the same spans: each counts the same unsampled ones
        unsampled_spans=max(
            (getattr(getattr(x, "state", None), "unsampled_spans", 0) for x in prof.sinks), default=0
        ),
    )


def _swallowed(drainer: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    if "cirron_otel.compat" in sys.modules:  # only a program that used the SDK surface has any
        out.update(_safe(sys.modules["cirron_otel.compat"].swallowed_counts, {}))
    cycles = getattr(drainer, "cycle_errors", 0)
    if cycles:
        out["drainer.cycle"] = cycles
    return out


def _sdk_platform_context() -> dict[str, str]:
    from ._config import sdk_platform_context

    return sdk_platform_context()


def _flush_mode(prof: Profiler | None) -> str:
    if prof is not None and not prof.settings.enabled:
        return "disabled"  # only through Profiler.health(): health() passes no disabled profiler
    if prof is not None and prof.running and prof.drainer is not None and prof.drainer.is_alive():
        return "background"
    return "stopped"


def _platform_context(rank: int) -> dict[str, Any]:
    import platform

    return {
        "pid": os.getpid(),
        "rank": rank,
        "host": platform.node(),
        "python": platform.python_version(),
        "platform": sys.platform,
    }


def _safe(fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except Exception:
        return default
