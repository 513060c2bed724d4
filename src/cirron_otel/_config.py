"""Every setting cirron-otel reads, and every environment variable it honours, in one place.

`profile(**kwargs)` passes its keyword arguments here; anything not given falls back to the
environment, then to the defaults below. Nothing else in the package reads `os.environ`.
"""

from __future__ import annotations

import os
from types import MappingProxyType

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

DEFAULT_OUTPUT_DIR = "./.cirron"
DEFAULT_RING_CAPACITY = 65536
DEFAULT_SPOOL_MAX_BYTES = 1_000_000_000
MAX_RECORDS_PER_FILE = 100_000
VALID_OUTPUTS = frozenset({"spool", "otlp", "log", "stdout", "none"})  # the last three: cirron-sdk's
VALID_PROTOCOLS = ("grpc", "http/protobuf")
VALID_TRACE_PER = ("child", "session")
FILE_MODES = ("user", "group")
# The OpenTelemetry Collector's gRPC receiver refuses messages over 4 MiB by default; stay under
# it with room for gRPC framing and the resource/scope a split request repeats.
DEFAULT_OTLP_MAX_REQUEST_BYTES = 4 * 1024 * 1024 - 64 * 1024
DEFAULT_OTLP_QUEUE_REQUESTS = 256
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
DEFAULT_SAMPLER = "parentbased_always_on"


class _Frozen:
    """A read-only record made with keyword arguments, what `@dataclass(frozen=True)` gave
    here without importing `dataclasses` (~7 ms of every profiled program's start-up).

    The fields are the subclass's annotated names, in order; a field given a value in the
    class body defaults to it, the others must be passed.
    """

    def __init__(self, **values: Any) -> None:
        fields = type(self).__annotations__
        for name, value in values.items():
            if name not in fields:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            object.__setattr__(self, name, value)
        missing = [name for name in fields if not hasattr(self, name)]
        if missing:
            raise TypeError(f"{type(self).__name__}() missing keyword arguments: {', '.join(missing)}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only: cannot assign to {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only: cannot delete {name!r}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in type(self).__annotations__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in type(self).__annotations__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Frozen)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())


DEFAULT_METRICS_PREFIX = "cirron.mark."
ENV_METRICS_PREFIX = "CIRRON_METRICS_PREFIX"


class Settings(_Frozen):
    """Resolved configuration of one profiler."""

    output_dir: str = DEFAULT_OUTPUT_DIR
    outputs: frozenset[str] = frozenset({"spool"})
    flush_interval: float = 1.0
    ring_capacity: int = DEFAULT_RING_CAPACITY
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    enabled: bool = True
    capture_cpu_time: bool = False
    rank: int = 0
    # A producer whose ring is full waits (GIL released) while the drainer and the spool
    # keep making progress, and drops the oldest record once they have made none for this
    # many seconds. Only while the drainer runs; 0 drops at once.
    ring_full_wait: float = 1.0
    max_records_per_file: int = MAX_RECORDS_PER_FILE
    # ci.trace() keeps the most recent records of the live session in memory, up to this.
    trace_buffer_records: int = 200_000
    # Records the spool could not write yet (disk failing) are kept for retry up to this.
    spool_retry_records: int = 2_000_000
    # "user": spool and outbox files 0600, their directories 0700 (they hold exception
    # messages, attributes, whole requests); "group": 0640 / 0750.
    file_mode: str = "user"
    install_signal_handlers: bool = True
    # The exit hook's shutdown takes at most this long in all (a signal's: min(5 s, this)).
    shutdown_timeout: float = 10.0
    session_attrs: Mapping[str, Any] = MappingProxyType({})  # resolve() passes a new dict
    # OpenTelemetry
    otlp_endpoint: str | None = None  # None: the exporter reads OTEL_EXPORTER_OTLP_* itself
    otlp_protocol: str = "grpc"
    service_name: str | None = None
    trace_per: str = "child"
    otel_context: bool = True
    otlp_outbox_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    # No OTLP request is larger: bigger ones are split between spans, and a span too big on
    # its own has its largest attribute values truncated.
    otlp_max_request_bytes: int = DEFAULT_OTLP_MAX_REQUEST_BYTES
    # Requests waiting in memory (no outbox, or the outbox could not be written).
    otlp_queue_requests: int = DEFAULT_OTLP_QUEUE_REQUESTS
    # An SDK TracerProvider whose span processors receive Cirron spans; "global": the
    # globally set one when it is an SDK provider; None: never.
    tracer_provider: Any = "global"
    # OTEL_PYTHON_TRACER_PROVIDER is set: the API makes the global provider on first use.
    env_tracer_provider: bool = False
    # OTEL_SDK_DISABLED=true: no OpenTelemetry export of any kind (the spool still works).
    otel_sdk_disabled: bool = False
    # OTEL_TRACES_SAMPLER / _ARG, applied to the traces Cirron starts (see traces_sampler()).
    sampler: str = DEFAULT_SAMPLER
    sampler_ratio: float = 1.0
    # OTEL_TRACES_EXPORTER names other than otlp / cirron_spool / none: SpanExporters loaded
    # from the opentelemetry_traces_exporter entry points (console, ...), fed Cirron spans.
    span_exporters: tuple[str, ...] = ()
    # Numeric marks as OTLP metric points (README, "Marks as metrics"): on with OTLP unless
    # profile(metrics=False) or OTEL_METRICS_EXPORTER=none; their names are prefix + mark name.
    metrics: bool = False
    metrics_prefix: str = DEFAULT_METRICS_PREFIX
    metrics_protocol: str = "grpc"  # OTEL_EXPORTER_OTLP_METRICS_PROTOCOL may differ from the traces'
    # Mark attrs that become point attributes, so labels (each value a series: never a step).
    metric_attrs: tuple[str, ...] = ()


# Ranks come from launchers (torchrun, mpirun, SLURM wrappers): an unparsable value is a
# misconfiguration worth stopping for, not something to replace silently by rank 0.
MAX_RANK = (1 << 31) - 1


def _rank_from_env(env: Mapping[str, str]) -> int:
    for key in ("RANK", "LOCAL_RANK"):
        raw = env.get(key)
        if raw is None or raw.strip() == "":
            continue
        try:
            rank = int(raw.strip())
        except ValueError:
            raise ValueError(
                f"cirron_otel.profile(): environment variable {key} must be an integer "
                f"in [0, {MAX_RANK}], got {raw!r}"
            ) from None
        if not 0 <= rank <= MAX_RANK:
            raise ValueError(
                f"cirron_otel.profile(): environment variable {key} must be in [0, {MAX_RANK}], got {raw!r}"
            )
        return rank
    return 0


_INF = float("inf")


def _finite(value: float) -> bool:
    """`math.isfinite` without importing math (start-up cost): False for inf, -inf and nan
    (every comparison with nan is false)."""
    return -_INF < value < _INF


# Numeric options of profile() and their accepted ranges: (low, high, low is inclusive).
# Non-finite values are refused everywhere: inf and nan compare in ways that silently turn a
# wait into "drop at once" or a flush period into "never" (issue 7).
MAX_SECONDS = 3600.0
RANGES: dict[str, tuple[int | float, int | float, bool]] = {
    "flush_interval": (0.0, MAX_SECONDS, False),
    "shutdown_timeout": (0.0, MAX_SECONDS, False),
    "ring_full_wait": (0.0, MAX_SECONDS, True),
    "ring_capacity": (64, 1 << 26, True),
    "spool_max_bytes": (0, 1 << 60, False),
    "trace_buffer_records": (0, 1 << 40, False),
    "spool_retry_records": (0, 1 << 40, False),
    "otlp_outbox_max_bytes": (0, 1 << 60, False),
    "otlp_max_request_bytes": (64 * 1024, 1 << 31, True),
    "otlp_queue_requests": (0, 1 << 20, False),
}


def _number(name: str, value: object, *, integer: bool = False) -> None:
    """Check `value` against RANGES[name]: a TypeError / ValueError naming the option."""
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else int | float)
    if wrong_type:
        kind = "an int" if integer else "a number"
        raise TypeError(f"cirron_otel.profile(): {name} must be {kind}, not {type(value).__name__}")
    low, high, low_inclusive = RANGES[name]
    if isinstance(value, float) and not _finite(value):
        raise ValueError(f"cirron_otel.profile(): {name} must be a finite number, got {value!r}")
    assert isinstance(value, int | float)
    if value > high or value < low or (value == low and not low_inclusive):
        bracket = "[" if low_inclusive else "("
        raise ValueError(
            f"cirron_otel.profile(): {name} must be in {bracket}{low!r}, {high!r}], got {value!r}"
        )


# Span limits the OpenTelemetry SDK reads for OTLP export; checked here, so a bad value is
# a ValueError from profile() naming the variable instead of OTLP export turned off.
OTEL_LIMIT_VARIABLES = (
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT",
)
MAX_OTEL_LIMIT = (1 << 31) - 1


def _check_otel_limits(env: Mapping[str, str]) -> None:
    for key in OTEL_LIMIT_VARIABLES:
        raw = env.get(key)
        if raw is None or raw.strip() == "":
            continue
        text = raw.strip()
        if not (text.isascii() and text.isdigit() and int(text) <= MAX_OTEL_LIMIT):
            raise ValueError(
                f"cirron_otel.profile(): environment variable {key} must be an integer "
                f"in [0, {MAX_OTEL_LIMIT}], got {raw!r}"
            )


def _file_mode(value: Any, env: Mapping[str, str]) -> str:
    if value is None:
        raw = env.get("CIRRON_FILE_MODE")
        if raw is None or raw.strip() == "":
            return "user"
        value, name = raw.strip(), "environment variable CIRRON_FILE_MODE"
    else:
        name = "file_mode"
    if value not in FILE_MODES:
        raise ValueError(f"cirron_otel.profile(): {name} must be one of {FILE_MODES}, got {value!r}")
    return str(value)


def default_output_dir(env: Mapping[str, str] | None = None) -> str:
    """`$CIRRON_OUTPUT_DIR`, else `./.cirron` (profile() and the cirron_spool exporter alike)."""
    return (os.environ if env is None else env).get("CIRRON_OUTPUT_DIR") or DEFAULT_OUTPUT_DIR


def _otlp_configured(env: Mapping[str, str]) -> bool:
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _outputs(output: str | list[str] | tuple[str, ...] | set[str] | None, otlp: bool) -> frozenset[str]:
    if output is None:  # the default: the spool always, OTLP when an endpoint is configured
        return frozenset({"spool", "otlp"} if otlp else {"spool"})
    names = [output] if isinstance(output, str) else list(output)
    parts: set[str] = set()
    for item in names:
        if not isinstance(item, str):
            raise TypeError(f"cirron_otel.profile(): output entries must be str, not {type(item).__name__}")
        parts.update(p.strip() for p in item.split(",") if p.strip())
    unknown = parts - VALID_OUTPUTS
    if "none" in parts and not unknown:  # cirron-sdk: "none" anywhere means no sink at all
        return frozenset()
    if unknown or not parts:
        raise ValueError(
            f"cirron_otel.profile(): unknown output {sorted(unknown) or output!r}; "
            f"choose from {sorted(VALID_OUTPUTS)}"
        )
    return frozenset(parts)


# -- the OpenTelemetry SDK's own variables (OTEL_SDK_DISABLED, OTEL_TRACES_SAMPLER[_ARG],
#    OTEL_TRACES_EXPORTER), read as the SDK environment specification says ----------------------
# A value the specification does not allow is warned about once, naming the variable, and
# ignored (as if unset), as the SDK does: telemetry configuration never stops the program.


def _env_warn(variable: str, message: str) -> None:
    from ._warn import warn_once

    warn_once(f"env:{variable}", f"cirron_otel: {variable}: {message}")


def _env_value(env: Mapping[str, str], variable: str) -> str | None:
    """The variable's value, stripped; None when unset or empty (the specification: empty = unset)."""
    raw = env.get(variable)
    if raw is None or raw.strip() == "":
        return None
    return raw.strip()


def sdk_disabled(env: Mapping[str, str]) -> bool:
    """OTEL_SDK_DISABLED: true (any case) disables OpenTelemetry; anything but true/false warns."""
    raw = _env_value(env, "OTEL_SDK_DISABLED")
    if raw is None:
        return False
    if raw.lower() not in ("true", "false"):
        _env_warn("OTEL_SDK_DISABLED", f"{raw!r} is neither true nor false; read as false")
    return raw.lower() == "true"


def traces_sampler(env: Mapping[str, str]) -> tuple[str, float]:
    """(sampler, ratio) from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG. An unknown sampler
    falls back to parentbased_always_on, an unusable ratio to 1.0, each with a warning."""
    name = (_env_value(env, "OTEL_TRACES_SAMPLER") or DEFAULT_SAMPLER).lower()
    if name not in SAMPLERS:
        _env_warn(
            "OTEL_TRACES_SAMPLER",
            f"unknown sampler {name!r} (Cirron applies {', '.join(SAMPLERS)}); using {DEFAULT_SAMPLER}",
        )
        name = DEFAULT_SAMPLER
    if not name.endswith("traceidratio"):
        return name, 1.0
    raw = _env_value(env, "OTEL_TRACES_SAMPLER_ARG")
    if raw is None:
        return name, 1.0
    try:
        ratio = float(raw)
    except ValueError:
        ratio = float("nan")
    if not 0.0 <= ratio <= 1.0:  # nan too
        _env_warn("OTEL_TRACES_SAMPLER_ARG", f"{raw!r} is not a probability in [0, 1]; using 1.0")
        return name, 1.0
    return name, ratio


TRACE_ID_LIMIT = (1 << 64) - 1


def sampler_bound(sampler: str, ratio: float) -> tuple[bool, int]:
    """(sample every trace, bound) for `_native.set_sampler`: a trace Cirron starts is sampled
    when every one is, or when its trace id's low 64 bits are below the bound, exactly as the
    SDK's TraceIdRatioBased decides."""
    if sampler.endswith("always_on"):
        return True, 0
    if sampler.endswith("always_off"):
        return False, 0
    bound = round(ratio * (TRACE_ID_LIMIT + 1))  # TraceIdRatioBased.get_bound_for_rate
    return bound > TRACE_ID_LIMIT, min(bound, TRACE_ID_LIMIT)


OTLP_EXPORTER_NAMES = {"otlp": None, "otlp_proto_grpc": "grpc", "otlp_proto_http": "http/protobuf"}
SPOOL_EXPORTER_NAME = "cirron_spool"


def traces_exporters(env: Mapping[str, str]) -> tuple[bool, str | None, tuple[str, ...]] | None:
    """OTEL_TRACES_EXPORTER as the SDK reads it: None when unset; else (otlp on, the protocol
    its name implies, the other exporters' entry point names). `none` alone selects nothing;
    `cirron_spool` is the spool, which profile() writes anyway."""
    raw = _env_value(env, "OTEL_TRACES_EXPORTER")
    if raw is None:
        return None
    otlp, protocol, others = False, None, []
    names = [part.strip() for part in raw.split(",") if part.strip()]
    for name in names:
        key = name.lower()
        if key in OTLP_EXPORTER_NAMES:
            otlp = True
            protocol = OTLP_EXPORTER_NAMES[key] or protocol
        elif key == "none":
            if len(names) > 1:
                _env_warn("OTEL_TRACES_EXPORTER", f"'none' in the list {raw!r} is ignored")
        elif key != SPOOL_EXPORTER_NAME and name not in others:
            others.append(name)
    return otlp, protocol, tuple(others)


def metrics_exporter(env: Mapping[str, str]) -> bool:
    """OTEL_METRICS_EXPORTER as the SDK reads it (default otlp): False for `none`. Names other
    than otlp are not ours to load (the marks' metrics go over OTLP only): warned about."""
    raw = _env_value(env, "OTEL_METRICS_EXPORTER")
    if raw is None:
        return True
    names = [part.strip().lower() for part in raw.split(",") if part.strip()]
    others = [n for n in names if n not in OTLP_EXPORTER_NAMES and n != "none"]
    if others:
        _env_warn(
            "OTEL_METRICS_EXPORTER",
            f"{', '.join(others)}: not supported (cirron_otel sends the marks' metrics over OTLP only)",
        )
    if "none" in names and len(names) > 1:
        _env_warn("OTEL_METRICS_EXPORTER", f"'none' in the list {raw!r} is ignored")
    return any(n in OTLP_EXPORTER_NAMES for n in names) or names == []


def metrics_default(env: Mapping[str, str], otlp_endpoint: str | None) -> bool:
    """Whether the marks' metrics are on when nobody said (`profile(metrics=None)`, replay
    without --metrics/--no-metrics): as OTEL_METRICS_EXPORTER says, but off when only the traces
    have an endpoint: the metrics' would be the default localhost:4317, which the user never named."""
    traces_only = bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) and not (
        otlp_endpoint
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )
    return metrics_exporter(env) and not traces_only


def resolve(
    *,
    output_dir: str | os.PathLike[str] | None = None,
    output: str | list[str] | tuple[str, ...] | set[str] | None = None,
    flush_interval: float = 1.0,
    ring_capacity: int = DEFAULT_RING_CAPACITY,
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
    enabled: bool = True,
    capture_cpu_time: bool = False,
    ring_full_wait: float = 1.0,
    trace_buffer_records: int = 200_000,
    spool_retry_records: int = 2_000_000,
    file_mode: str | None = None,
    install_signal_handlers: bool = True,
    shutdown_timeout: float = 10.0,
    session_attrs: Mapping[str, Any] | None = None,
    otlp_endpoint: str | None = None,
    otlp_protocol: str | None = None,
    service_name: str | None = None,
    trace_per: str = "child",
    otel_context: bool = True,
    tracer_provider: Any = "global",
    otlp_outbox_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
    otlp_max_request_bytes: int = DEFAULT_OTLP_MAX_REQUEST_BYTES,
    otlp_queue_requests: int = DEFAULT_OTLP_QUEUE_REQUESTS,
    metrics: bool | None = None,
    metrics_prefix: str | None = None,
    metric_attrs: list[str] | tuple[str, ...] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Validate `profile()` arguments and merge them with the environment."""
    env = os.environ if env is None else env
    if output_dir is None:
        output_dir = default_output_dir(env)
    _number("flush_interval", flush_interval)
    _number("shutdown_timeout", shutdown_timeout)
    _number("ring_full_wait", ring_full_wait)
    for name, value in (
        ("ring_capacity", ring_capacity),
        ("spool_max_bytes", spool_max_bytes),
        ("trace_buffer_records", trace_buffer_records),
        ("spool_retry_records", spool_retry_records),
        ("otlp_outbox_max_bytes", otlp_outbox_max_bytes),
        ("otlp_max_request_bytes", otlp_max_request_bytes),
        ("otlp_queue_requests", otlp_queue_requests),
    ):
        _number(name, value, integer=True)
    disabled = sdk_disabled(env)
    chosen = traces_exporters(env) if output is None and not disabled else None
    protocol = otlp_protocol_from(otlp_protocol or (chosen[1] if chosen else None), env)
    if protocol not in VALID_PROTOCOLS:
        raise ValueError(
            f"cirron_otel.profile(): otlp_protocol must be one of {VALID_PROTOCOLS}, got {protocol!r}"
        )
    if trace_per not in VALID_TRACE_PER:
        raise ValueError(
            f"cirron_otel.profile(): trace_per must be one of {VALID_TRACE_PER}, got {trace_per!r}"
        )
    for name, text in (("otlp_endpoint", otlp_endpoint), ("service_name", service_name)):
        if text is not None and not isinstance(text, str):
            raise TypeError(f"cirron_otel.profile(): {name} must be a str, not {type(text).__name__}")
    span_exporters: tuple[str, ...] = ()
    if output is None and disabled:  # OTEL_SDK_DISABLED: the spool only
        outputs = frozenset({"spool"})
    elif chosen is not None:  # OTEL_TRACES_EXPORTER: the spool, plus what it names
        outputs = frozenset({"spool", "otlp"} if chosen[0] else {"spool"})
        span_exporters = chosen[2]
    else:  # profile(output=...) wins; default: the spool, and OTLP when an endpoint is configured
        outputs = _outputs(output, bool(otlp_endpoint) or _otlp_configured(env))
        if disabled and "otlp" in outputs:
            _env_warn(
                "OTEL_SDK_DISABLED",
                "true: OTLP export is off, although profile(output=...) "
                "asks for it" + ("" if "spool" in outputs else "; nothing is written"),
            )
            outputs = outputs - {"otlp"}
    if "otlp" in outputs or span_exporters:
        _check_otel_limits(env)
    if metrics is not None and not isinstance(metrics, bool):
        raise TypeError(f"cirron_otel.profile(): metrics must be True, False or None, not {metrics!r}")
    if metrics and "otlp" not in outputs:
        raise ValueError(
            "cirron_otel.profile(metrics=True): the marks' metrics go over OTLP, which is off "
            "(set OTEL_EXPORTER_OTLP_ENDPOINT, or pass otlp_endpoint=... or output=[..., 'otlp'])"
        )
    default = metrics_default(env, otlp_endpoint)
    metrics_on = "otlp" in outputs and (metrics if metrics is not None else default)
    if metrics_prefix is None:
        metrics_prefix = env.get(ENV_METRICS_PREFIX) or DEFAULT_METRICS_PREFIX
    elif not isinstance(metrics_prefix, str):
        raise TypeError(
            f"cirron_otel.profile(): metrics_prefix must be a str, not {type(metrics_prefix).__name__}"
        )
    if metric_attrs is None:
        metric_attrs = ()
    elif isinstance(metric_attrs, str) or not all(isinstance(a, str) and a for a in metric_attrs):
        raise TypeError(
            f"cirron_otel.profile(): metric_attrs must be a list of attribute names, got {metric_attrs!r}"
        )
    metrics_protocol = otlp_protocol_from(otlp_protocol or (chosen[1] if chosen else None), env, "metrics")
    if metrics_on and metrics_protocol not in VALID_PROTOCOLS:
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL must be one of {VALID_PROTOCOLS}, got {metrics_protocol!r}"
        )
    sampler, ratio = traces_sampler(env)
    return Settings(
        output_dir=os.fspath(output_dir),
        outputs=outputs,
        flush_interval=float(flush_interval),
        ring_capacity=ring_capacity,
        spool_max_bytes=spool_max_bytes,
        enabled=bool(enabled),
        capture_cpu_time=bool(capture_cpu_time),
        rank=_rank_from_env(env),
        ring_full_wait=float(ring_full_wait),
        trace_buffer_records=trace_buffer_records,
        spool_retry_records=spool_retry_records,
        file_mode=_file_mode(file_mode, env),
        install_signal_handlers=bool(install_signal_handlers),
        shutdown_timeout=float(shutdown_timeout),
        session_attrs=dict(session_attrs or {}),
        otlp_endpoint=otlp_endpoint,
        otlp_protocol=protocol,
        service_name=service_name,
        trace_per=trace_per,
        otel_context=bool(otel_context),
        tracer_provider=tracer_provider,
        env_tracer_provider=_env_value(env, "OTEL_PYTHON_TRACER_PROVIDER") is not None,
        otlp_outbox_max_bytes=otlp_outbox_max_bytes,
        otlp_max_request_bytes=otlp_max_request_bytes,
        otlp_queue_requests=otlp_queue_requests,
        otel_sdk_disabled=disabled,
        sampler=sampler,
        sampler_ratio=ratio,
        span_exporters=span_exporters,
        metrics=metrics_on,
        metrics_prefix=metrics_prefix,
        metrics_protocol=metrics_protocol,
        metric_attrs=tuple(dict.fromkeys(metric_attrs)),
    )


# -- OTLP transport: the standard OTEL_EXPORTER_OTLP_* variables, as the specification reads them --

DEFAULT_OTLP_TIMEOUT_MS = 10_000
OTLP_COMPRESSIONS = ("gzip", "none")


class OtlpTransportConfig(_Frozen):
    """Where and how the OTLP sink sends, resolved from `profile()` and the environment."""

    protocol: str  # "grpc" | "http/protobuf"
    endpoint: str  # gRPC: the channel target "host:port"; HTTP: the full URL requests are POSTed to
    insecure: bool  # gRPC only: plaintext instead of TLS
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = DEFAULT_OTLP_TIMEOUT_MS / 1000  # seconds
    compression: str = "none"
    certificate: str | None = None  # CA bundle to verify the collector
    client_key: str | None = None  # mTLS
    client_certificate: str | None = None
    signal: str = "traces"  # or "metrics": which OTLP service the requests go to


SIGNALS = ("traces", "metrics")


def _otlp_var(env: Mapping[str, str], name: str, signal: str = "traces") -> tuple[str, str] | None:
    """(variable, value) of OTEL_EXPORTER_OTLP_<SIGNAL>_<name>, else OTEL_EXPORTER_OTLP_<name>:
    the signal-specific variable wins whole (values are not merged)."""
    for key in (f"OTEL_EXPORTER_OTLP_{signal.upper()}_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
        raw = env.get(key)
        if raw is not None and raw.strip() != "":
            return key, raw.strip()
    return None


def parse_otlp_headers(raw: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k2=v2` (W3C baggage style), keys and values URL-decoded; entries without `=`
    or with an empty key are skipped, as the specification allows."""
    from urllib.parse import unquote  # only with OTLP: not on every profiled program's start-up

    out: list[tuple[str, str]] = []
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        key = unquote(key).strip().lower()  # gRPC metadata keys must be lower case
        if sep and key:
            out.append((key, unquote(value).strip()))
    return tuple(out)


# What a header may hold on the wire: RFC 9110 token characters for an HTTP field name;
# gRPC metadata keys are lower-case letters, digits, '-', '_', '.', and the values of keys not
# ending in -bin (sent as the UTF-8 bytes of the value) printable ASCII.
_HTTP_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_GRPC_KEY = frozenset("-_.0123456789abcdefghijklmnopqrstuvwxyz")


def _checked_headers(
    variable: str, headers: tuple[tuple[str, str], ...], protocol: str
) -> tuple[tuple[str, str], ...]:
    """`headers` as they are; a ValueError naming `variable` for one no request could carry
    (every request would fail, so its spans would be lost, rather than one clear warning)."""
    grpc = protocol == "grpc"
    for key, value in headers:
        if not set(key) <= (_GRPC_KEY if grpc else _HTTP_TOKEN):
            kind = "gRPC metadata key (a-z, 0-9, '-', '_', '.')" if grpc else "HTTP header name"
            raise ValueError(f"{variable}: {key!r} is not a valid {kind}")
        if grpc and key.startswith("grpc-"):
            raise ValueError(f"{variable}: {key!r}: gRPC reserves the grpc- metadata keys for itself")
        if grpc and key.endswith("-bin"):
            continue
        if grpc and not all(" " <= c <= "~" for c in value):
            raise ValueError(f"{variable}: the value of {key!r} must be printable ASCII for gRPC metadata")
        if not grpc and (any(c in value for c in "\r\n\0") or any(ord(c) > 0xFF for c in value)):
            raise ValueError(f"{variable}: the value of {key!r} holds characters an HTTP header cannot carry")
    return headers


def otlp_protocol_from(
    chosen: str | None, env: Mapping[str, str] | None = None, signal: str = "traces"
) -> str:
    """The OTLP protocol: the one chosen in code, else OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL, else
    OTEL_EXPORTER_OTLP_PROTOCOL, else gRPC (unchecked: callers say which name was wrong)."""
    env = os.environ if env is None else env
    return (
        chosen
        or env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )


def _check_endpoint(source: str, url: str, target: str) -> None:
    """A ValueError naming `source` for an endpoint no request could reach: every request
    would fail (OTLP/HTTP: dropped at once; gRPC: retried until the outbox is full)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(target)
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"{source}: {url!r} is not a usable OTLP endpoint ({exc})") from None
    host = parts.hostname
    if not host or any(c.isspace() for c in host) or port == 0:
        raise ValueError(f"{source}: {url!r} is not a usable OTLP endpoint (host {host!r}, port {port})")


def otlp_transport_config(
    protocol: str, endpoint: str | None, env: Mapping[str, str] | None = None, signal: str = "traces"
) -> OtlpTransportConfig:
    """Resolve the transport of one signal (traces, metrics) exactly as the OTLP exporter
    specification says; ValueError naming the variable for a value it cannot use.

    `endpoint` (profile(otlp_endpoint=...)) is the traces' endpoint: for HTTP, a URL ending in
    /v1/traces gives the metrics the same URL ending in /v1/metrics."""
    env = os.environ if env is None else env
    path = f"/v1/{signal}"
    specific = _otlp_var(env, "ENDPOINT", signal) if endpoint is None else None
    if endpoint is not None:
        base = endpoint.rstrip("/")
        if base.endswith("/v1/traces"):
            url, from_generic = base[: -len("/v1/traces")] + path, False
        else:
            url, from_generic = endpoint, protocol == "http/protobuf"
    elif specific is not None:
        url, from_generic = specific[1], specific[0] == "OTEL_EXPORTER_OTLP_ENDPOINT"
    else:
        url = "http://localhost:4318" if protocol == "http/protobuf" else "http://localhost:4317"
        from_generic = True
    source = "the endpoint" if endpoint is not None else specific[0] if specific else "the default endpoint"
    if protocol == "http/protobuf":
        # A per-signal endpoint is used as is; the generic one (and the default) get /v1/<signal>.
        target, insecure = (url.rstrip("/") + path) if from_generic else url, False
        if target.partition("://")[0].lower() not in ("http", "https"):
            raise ValueError(
                f"{source}: an OTLP/HTTP endpoint must be a URL with http:// or https://, got {url!r}"
            )
        _check_endpoint(source, url, target)
    else:
        scheme, has_scheme, rest = url.partition("://")
        if has_scheme:
            if scheme.lower() not in ("http", "https"):
                raise ValueError(
                    f"{source}: an OTLP/gRPC endpoint must be host:port or a URL with http:// "
                    f"or https://, got {url!r}"
                )
            insecure = scheme.lower() == "http"
        else:
            rest = url
            flag = _otlp_var(env, "INSECURE", signal)
            insecure = flag is not None and flag[1].lower() == "true"
        target = rest.split("/", 1)[0]
        _check_endpoint(source, url, "//" + target)
    headers = _otlp_var(env, "HEADERS", signal)
    timeout_ms: float = DEFAULT_OTLP_TIMEOUT_MS
    raw_timeout = _otlp_var(env, "TIMEOUT", signal)
    if raw_timeout is not None:
        try:
            timeout_ms = float(raw_timeout[1])
        except ValueError:
            timeout_ms = float("nan")
        if not (_finite(timeout_ms) and 0 < timeout_ms <= MAX_SECONDS * 1000):
            raise ValueError(
                f"{raw_timeout[0]} must be a number of milliseconds in "
                f"(0, {MAX_SECONDS * 1000:.0f}], got {raw_timeout[1]!r}"
            )
    compression = _otlp_var(env, "COMPRESSION", signal)
    if compression is not None and compression[1].lower() not in OTLP_COMPRESSIONS:
        raise ValueError(f"{compression[0]} must be one of {OTLP_COMPRESSIONS}, got {compression[1]!r}")
    tls = not insecure if protocol == "grpc" else target.lower().startswith("https://")
    files = _tls_files(env, signal, check=tls)
    return OtlpTransportConfig(
        protocol=protocol,
        endpoint=target,
        insecure=insecure,
        headers=_checked_headers(headers[0], parse_otlp_headers(headers[1]), protocol) if headers else (),
        timeout=timeout_ms / 1000,
        compression=compression[1].lower() if compression else "none",
        certificate=files["CERTIFICATE"],
        client_key=files["CLIENT_KEY"],
        client_certificate=files["CLIENT_CERTIFICATE"],
        signal=signal,
    )


TLS_FILE_VARIABLES = ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE")


def _tls_files(env: Mapping[str, str], signal: str, check: bool) -> dict[str, str | None]:
    """The TLS files of one signal (variable suffix -> path). With `check` (the endpoint is
    TLS, so they are used), a file that cannot be used is a ValueError naming its variable
    here, at profile(), rather than a failure of every request later."""
    found = {name: _otlp_var(env, name, signal) for name in TLS_FILE_VARIABLES}
    if check and any(found.values()):
        _check_tls_files(found["CERTIFICATE"], found["CLIENT_KEY"], found["CLIENT_CERTIFICATE"], signal)
    return {name: var[1] if var else None for name, var in found.items()}


def _check_tls_files(
    ca: tuple[str, str] | None, key: tuple[str, str] | None, cert: tuple[str, str] | None, signal: str
) -> None:
    import ssl  # only with TLS files: not on every profiled program's start-up

    for var in (ca, key, cert):
        if var is not None:
            try:
                with open(var[1], "rb"):
                    pass
            except OSError as exc:
                raise ValueError(f"{var[0]}: cannot read {var[1]!r} ({exc.strerror or exc})") from None
    if (key is None) != (cert is None):
        given, missing = (key, "CLIENT_CERTIFICATE") if cert is None else (cert, "CLIENT_KEY")
        assert given is not None
        raise ValueError(
            f"{given[0]} is set but neither OTEL_EXPORTER_OTLP_{signal.upper()}_{missing} nor "
            f"OTEL_EXPORTER_OTLP_{missing}: mutual TLS needs both the client certificate and its key"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca[1])
        except ssl.SSLError as exc:
            raise ValueError(f"{ca[0]}: {ca[1]!r} holds no PEM certificate ({exc.reason or exc})") from None
    if key is not None and cert is not None:

        def no_password() -> bytes:
            # Never OpenSSL's terminal prompt: the OTLP variables carry no password.
            raise ValueError("the key is encrypted, and the OTLP exporters take no password for it")

        try:
            context.load_cert_chain(certfile=cert[1], keyfile=key[1], password=no_password)
        except (ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ValueError(
                f"{cert[0]} ({cert[1]!r}) and {key[0]} ({key[1]!r}) are not a PEM certificate "
                f"and its private key ({reason})"
            ) from None


# -- child processes: what a profiled program passes on to the programs it starts ------------
# profile() exports these; a child's profile() (and a multiprocessing spawn/forkserver child,
# which starts profiling by itself) writes into the same output directory, its session
# carrying the parent's session id and pid. shutdown() puts the previous values back.
ENV_OUTPUT_DIR = "CIRRON_OUTPUT_DIR"
ENV_PARENT_SESSION = "CIRRON_PARENT_SESSION"  # "<session span id>:<pid>"
_saved_env: dict[str, str | None] | None = None
_exported_env: dict[str, str] = {}


def inherited_parent(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(session id, pid) of the profiled process that started this one, if any."""
    raw = (os.environ if env is None else env).get(ENV_PARENT_SESSION, "")
    session_id, _, pid = raw.partition(":")
    if len(session_id) != 32 or not pid.isdigit():
        return None
    return session_id, int(pid)


def export_to_children(output_dir: str, session_id: str, pid: int) -> None:
    global _saved_env
    if _saved_env is None:
        _saved_env = {k: os.environ.get(k) for k in (ENV_OUTPUT_DIR, ENV_PARENT_SESSION)}
    _exported_env.update({ENV_OUTPUT_DIR: output_dir, ENV_PARENT_SESSION: f"{session_id}:{pid}"})
    os.environ.update(_exported_env)


def restore_children_env() -> None:
    global _saved_env
    saved, _saved_env = _saved_env, None
    for key, value in (saved or {}).items():
        if os.environ.get(key) != _exported_env.get(key):
            continue  # changed by someone else since: theirs now
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# -- cirron-sdk 0.3.0 compatibility: its profiling settings, as the SDK resolves them --------------
# explicit profile() arguments > profile(config=...) > cirron.yaml's `profiling:` section > the
# Cirron instance (its constructor > CIRRON_* variables > ~/.cirron/config.toml's [default]
# table > defaults).

SNAPSHOT_MODES = ("stats", "sampled", "full")
SDK_CONFIG_FILENAMES = ("cirron.yaml", "cirron.yml", "cirron.json")
SDK_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "api_key": None,
        "api_endpoint": "https://api.cirron.com",
        "workspace_id": None,
        "output_dir": "./.cirron/",
        "snapshots": "stats",
        "sample_rate": 0.01,
        "flush_interval": 1.0,
        "spool_max_bytes": DEFAULT_SPOOL_MAX_BYTES,
        "ingest_path": "/v1/ingest/spans",
        "load_warn_bytes": 1 << 30,
        "load_max_bytes": 10 << 30,
    }
)


# The SDK's coercions, for CIRRON_* strings and config.toml values alike: a value that does not
# coerce is ignored (the next layer down applies), never an error; booleans are not numbers.
def _sdk_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _sdk_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _sdk_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _sdk_snapshots(value: Any) -> str | None:
    return value if isinstance(value, str) and value in SNAPSHOT_MODES else None


_SDK_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "api_key": ("CIRRON_API_KEY", _sdk_str),
    "api_endpoint": ("CIRRON_API_ENDPOINT", _sdk_str),
    "workspace_id": ("CIRRON_WORKSPACE_ID", _sdk_str),
    "output_dir": ("CIRRON_OUTPUT_DIR", _sdk_str),
    "snapshots": ("CIRRON_SNAPSHOTS", _sdk_snapshots),
    "sample_rate": ("CIRRON_SAMPLE_RATE", _sdk_float),
    "flush_interval": ("CIRRON_FLUSH_INTERVAL", _sdk_float),
    "spool_max_bytes": ("CIRRON_SPOOL_MAX_BYTES", _sdk_int),
    "ingest_path": ("CIRRON_INGEST_PATH", _sdk_str),
    "load_warn_bytes": ("CIRRON_LOAD_WARN_BYTES", _sdk_int),
    "load_max_bytes": ("CIRRON_LOAD_MAX_BYTES", _sdk_int),
}
PLATFORM_CONTEXT_ENV = (
    ("run_id", "CIRRON_RUN_ID"),
    ("pipeline_id", "CIRRON_PIPELINE_ID"),
    ("deployment_id", "CIRRON_DEPLOYMENT_ID"),
    ("workspace_id", "CIRRON_WORKSPACE_ID"),
)


def sdk_home_config(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The [default] table of ~/.cirron/config.toml (or `path`), coerced as the SDK does.

    A missing file is {}. An unreadable or malformed one is {} too, as in the SDK (a user's home
    file must not stop their program), but says why once, where the SDK is silent."""
    if path is None:
        try:
            path = os.path.join(os.path.expanduser("~"), ".cirron", "config.toml")
        except (RuntimeError, OSError):
            return {}
    if not os.path.isfile(path):
        return {}
    import tomllib  # only when the file exists (start-up cost)

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f).get("default")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        from ._warn import warn_once

        warn_once("config.toml", f"cirron_otel: {os.fspath(path)} ignored: {type(exc).__name__}: {exc}")
        return {}
    if not isinstance(table, dict):
        return {}
    out: dict[str, Any] = {}
    for key, (_variable, coerce) in _SDK_FIELDS.items():
        if key in table and (value := coerce(table[key])) is not None:
            out[key] = value
    return out


def sdk_instance_config(
    explicit: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    home_config: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """A `Cirron(...)` instance's settings: its arguments > CIRRON_* variables >
    ~/.cirron/config.toml (or `home_config`) > defaults."""
    env = os.environ if env is None else env
    out = dict(SDK_DEFAULTS)
    out.update(sdk_home_config(home_config))
    for key, (variable, coerce) in _SDK_FIELDS.items():
        raw = env.get(variable)
        if raw and (value := coerce(raw)) is not None:
            out[key] = value
    out.update({k: v for k, v in explicit.items() if v is not None})
    return out


def sdk_platform_context(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The CIRRON_RUN_ID / _PIPELINE_ID / _DEPLOYMENT_ID / _WORKSPACE_ID values that are set."""
    env = os.environ if env is None else env
    return {key: env[variable] for key, variable in PLATFORM_CONTEXT_ENV if env.get(variable)}


def sdk_rank(env: Mapping[str, str] | None = None) -> int:
    """The rank as cirron-sdk writes it on the session span (unparsable: 0, as there)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("RANK") or env.get("LOCAL_RANK") or "0")
    except ValueError:
        return 0


def find_cirron_yaml(start: str | os.PathLike[str] | None = None) -> str | None:
    """The first cirron.yaml / .yml / .json walking up from `start` (default: the cwd)."""
    current = os.path.abspath(os.fspath(start) if start else os.getcwd())
    if os.path.isfile(current):
        current = os.path.dirname(current)
    while True:
        for filename in SDK_CONFIG_FILENAMES:
            candidate = os.path.join(current, filename)
            if os.path.isfile(candidate):
                return candidate
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def load_cirron_yaml_profiling(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """cirron.yaml's `profiling:` section ({} when there is no file or no section)."""
    from .errors import CirronYamlError

    if path is not None:
        found: str | None = os.path.abspath(os.fspath(path))
        if not os.path.isfile(found or ""):
            raise CirronYamlError(f"cirron config not found at {found}")
    else:
        found = find_cirron_yaml()
        if found is None:
            return {}
    assert found is not None
    try:
        with open(found, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise CirronYamlError(f"Could not read {found}: {exc}") from exc
    try:
        if found.endswith(".json"):
            import json

            data = json.loads(text)
        else:
            try:
                import yaml  # PyYAML, only when a cirron.yaml exists
            except ImportError as exc:
                raise CirronYamlError(
                    f"{found}: reading cirron.yaml needs PyYAML (pip install pyyaml); "
                    "or write the same content as cirron.json"
                ) from exc
            data = yaml.safe_load(text)
    except CirronYamlError:
        raise
    except Exception as exc:
        raise CirronYamlError(f"Malformed config at {found}: {exc}") from exc
    if data is None:
        raise CirronYamlError(f"{found} is empty")
    if not isinstance(data, dict):
        raise CirronYamlError(f"{found} must contain a mapping at the top level, got {type(data).__name__}")
    section = data.get("profiling")
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise CirronYamlError(f"{found}: 'profiling' must be a mapping, got {type(section).__name__}")
    return dict(section)


def sdk_profiling(
    instance: Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None,
    frameworks: Any,
    snapshots: Any,
    sample_rate: Any,
    flush_interval: Any,
    path: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """The SDK's profiling section resolved and validated (ValueError as its pydantic model's)."""
    resolved: dict[str, Any] = {
        "snapshots": instance["snapshots"],
        "sample_rate": instance["sample_rate"],
        "flush_interval": instance["flush_interval"],
        "frameworks": None,
    }
    resolved.update(load_cirron_yaml_profiling(path))
    if config is not None:
        from collections.abc import Mapping as _Mapping  # typing names are not imported at start-up

        if not isinstance(config, _Mapping):
            raise TypeError(f"cirron_otel.profile(): config must be a dict, not {type(config).__name__}")
        resolved.update(config)
    for key, value in (
        ("frameworks", frameworks),
        ("snapshots", snapshots),
        ("sample_rate", sample_rate),
        ("flush_interval", flush_interval),
    ):
        if value is not None:
            resolved[key] = value
    if resolved["snapshots"] not in SNAPSHOT_MODES:
        raise ValueError(
            f"cirron_otel.profile(): snapshots must be one of {SNAPSHOT_MODES}, got {resolved['snapshots']!r}"
        )
    rate = resolved["sample_rate"]
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"cirron_otel.profile(): sample_rate must be a number in [0, 1], got {rate!r}")
    _number("flush_interval", resolved["flush_interval"])  # > 0, as the SDK's model requires
    fw = resolved["frameworks"]
    if fw is not None and (isinstance(fw, str) or not all(isinstance(x, str) for x in fw)):
        raise ValueError(f"cirron_otel.profile(): frameworks must be a list of str, got {fw!r}")
    resolved["sample_rate"] = float(rate)
    resolved["flush_interval"] = float(resolved["flush_interval"])
    resolved["frameworks"] = None if fw is None else list(fw)
    return resolved
