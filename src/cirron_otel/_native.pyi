"""Type stub for the native producer module (C units `record.c` … `module.c`, header `native.h`)."""

from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

MAX_DEPTH: int
STR_VALUE_CAP: int
# the attribute keys (and the exception event's name) of the OpenTelemetry mapping (mapping.h)
KEY_INDEX: str
KEY_SPAN_ID: str
KEY_RANK: str
KEY_CPU_NS: str
KEY_GPU_NS: str
KEY_SESSION_ID: str
KEY_SUMMARY_PREFIX: str
KEY_THREAD_ID: str
KEY_THREAD_NAME: str
KEY_CODE_FUNCTION: str
KEY_CODE_FILE: str
KEY_CODE_LINE: str
KEY_MARK_VALUE: str
KEY_MARK_KIND: str
KEY_MARK_ID: str
KEY_LINK: str
KEY_SCOPE: str
EVENT_EXCEPTION: str
KEY_EXCEPTION_TYPE: str
KEY_EXCEPTION_MESSAGE: str
KEY_EXCEPTION_STACKTRACE: str
EVENT_SNAPSHOT: str
KEY_SNAPSHOT_PREFIX: str
scope_var: ContextVar[Scope | None]
# (context, anchor scope, trace_hi, trace_lo, span_id, trace_flags), set by the
# OpenTelemetry runtime context of cirron_otel._otel_context
otel_var: ContextVar[tuple[Any, Scope | None, int, int, int, int]]

class Scope:
    """One span: a context manager, or a decorator that opens a fresh scope per call."""

    @property
    def id(self) -> str | None: ...
    @property
    def parent_id(self) -> str | None: ...
    @property
    def trace_id(self) -> str | None: ...
    @property
    def name(self) -> str: ...
    @property
    def index(self) -> int | None: ...
    @property
    def attrs(self) -> dict[str, Any]:
        """Mutable until the scope closes; captured then (later changes are not recorded)."""
    @property
    def state(self) -> Literal["new", "open", "closed", "dropped"]: ...
    def _as_root(self) -> None:
        """Before it opens: a root in the spool, a trace of its own in OpenTelemetry."""
    def _set_error_status(self, description: str, /) -> None:
        """OpenTelemetry's set_status(ERROR, description) on the open scope (else a no-op)."""
    @property
    def span_id_int(self) -> int: ...
    @property
    def trace_id_hi(self) -> int: ...
    @property
    def trace_id_lo(self) -> int: ...
    @property
    def depth(self) -> int: ...
    @property
    def sampled(self) -> bool: ...
    @property
    def start_ns(self) -> int | None: ...
    @property
    def end_ns(self) -> int | None: ...
    # cirron-sdk's scope handle fields
    @property
    def pid(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def thread_id(self) -> int | None: ...
    @property
    def cpu_ns(self) -> int | None:
        """The opening thread's CPU time while open, once closed; None unless capture_cpu_time."""
    @property
    def gpu_ns(self) -> None: ...
    @property
    def memory_peak_bytes(self) -> None: ...
    @property
    def marks(self) -> list[str]:
        """Ids of the marks recorded on this scope so far (asks the drainer to claim first)."""
    def __enter__(self) -> Scope: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]: ...
    @overload
    def __call__(self, func: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]: ...
    @overload
    def __call__(self, func: _F) -> _F: ...

class ScopeIterator(Iterator[_T]):
    def __next__(self) -> _T: ...
    def close(self) -> None: ...

class Batch:
    """Records claimed from the rings; holds no Python references."""

    @property
    def mark_count(self) -> int: ...
    @property
    def span_count(self) -> int: ...
    def __len__(self) -> int: ...
    def error_info(self) -> dict[str, tuple[str, str, str]]: ...
    def span_mark_ids(self, scope: Scope, /) -> list[str] | None: ...

class OtlpState:
    """Marks of still-open spans, kept between otlp_encode() calls."""

    def __init__(
        self,
        event_limit: int = 128,
        metrics: bool = False,
        traces: bool = True,
        metric_attrs: Sequence[str] | None = None,
    ) -> None: ...
    @property
    def open_spans(self) -> int: ...
    @property
    def root_marks(self) -> int: ...
    @property
    def unsampled_spans(self) -> int: ...
    @property
    def events_dropped(self) -> int: ...
    @property
    def metric_points_ready(self) -> int: ...
    @property
    def metric_points_dropped(self) -> int: ...

def mark(
    name: str, value: float | int | str | bool, *, kind: Literal["point", "summary"] = "point", **attrs: Any
) -> None: ...
def scope(name: str, index: int | None = None, **attrs: Any) -> Scope: ...
def code_scope(code: int, name: str, index: int | None = None, /, **attrs: Any) -> Scope: ...
def code_location(function: str, file: str | None, line: int | None, /) -> int: ...
def epochs(iterable: Iterable[_T]) -> ScopeIterator[_T]: ...
def batches(iterable: Iterable[_T]) -> ScopeIterator[_T]: ...
def scoped_iter(iterable: Iterable[_T], name: str) -> ScopeIterator[_T]: ...
def current_scope() -> Scope | None: ...
def session_begin(attrs: dict[str, Any] | None = None, parent: Scope | None = None) -> Scope: ...
def session_end() -> None: ...
def session() -> Scope | None: ...
def set_sampler(sample_all: bool, bound: int, /) -> None: ...
def configure(
    *,
    ring_capacity: int = ...,
    capture_cpu_time: bool = ...,
    rank: int = ...,
    recording: bool = ...,
    full_wait: float = ...,
    warning_category: type[Warning] = ...,
    decorate: Callable[[Callable[..., Any], str, int | None, dict[str, Any]], Any] = ...,
    otel_context: bool = ...,
    trace_per_child: bool = ...,
    otlp: bool = ...,
    span_attr_limit: int = ...,
    event_attr_limit: int = ...,
    value_len_limit: int = ...,
    link_limit: int = ...,
    link_attr_limit: int = ...,
) -> None: ...
def drain(max_slots: int = 100000) -> Batch | None: ...
def free_orphans() -> int: ...
def open_span_mark_ids(scope: Scope, /) -> list[str] | None: ...
def encode_spool(
    batches: Sequence[Batch],
    batch_id: str,
    created_ns: int,
    sdk_version: str,
    with_trace_id: bool = True,
    snapshots: bytes = b"",
) -> bytes:
    """`snapshots`: the file's snapshot records, JSON objects joined by commas, written as they are."""

def write_spool(
    fd: int,
    batches: Sequence[Batch],
    batch_id: str,
    created_ns: int,
    sdk_version: str,
    with_trace_id: bool = True,
    snapshots: bytes = b"",
) -> int: ...
def format_float(x: float) -> str: ...
def otlp_encode(
    state: OtlpState,
    batches: Sequence[Batch],
    resource: bytes,
    scope_name: str,
    scope_version: str,
    session_trace: tuple[int, int] = (0, 0),
    max_request_bytes: int = 1048576,
) -> list[tuple[bytes, int]]: ...
def otlp_add_event(
    state: OtlpState, span_hi: int, span_lo: int, ts_ns: int, name: str, attrs: dict[str, Any]
) -> None:
    """An event on a span not yet encoded (its spool id as two 64-bit halves), kept with its
    marks' events under the same limit."""

def otlp_metrics_encode(
    state: OtlpState,
    resource: bytes,
    scope_name: str,
    scope_version: str,
    prefix: str,
    start_ns: int,
    session: tuple[int, int] = (0, 0),
    max_request_bytes: int = 1048576,
) -> list[tuple[bytes, int]]: ...
def wait(timeout: float) -> bool: ...
def wake() -> None: ...
def watch_signal(signum: int, /) -> bool: ...
def signals_received(signum: int, /) -> int: ...
def die_by_signal(signum: int, /) -> None: ...
def progress() -> None: ...
def pending() -> int: ...
def stats() -> dict[str, int | float]: ...
def name_of(name_id: int) -> str: ...
def after_fork_child() -> None: ...
def random_u64() -> int: ...
def clock_ns() -> int: ...
def clock_info(recalibrate: bool = False) -> dict[str, Any]: ...
def _clock_shift(ns: int) -> None: ...
