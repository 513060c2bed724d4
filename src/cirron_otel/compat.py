"""cirron-sdk 0.3.0's public surface beyond the native hot path: `Cirron` and `get_default`,
`watch`, `wrap`, the SDK's `profile()` arguments resolved into ours, the session span's
attributes as the SDK writes them, and the names that are not instrumentation (each raises
`CirronNotProvided` saying what to use instead).

Imported by `cirron_otel/__init__.py`, so it imports nothing beyond the standard library's
basics at module level (`import cirron_otel` stays cheap).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref

from .errors import CirronNotProvided

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (profile()'s start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any

# -- the SDK's profiling state (what framework hooks and snapshot capture read) ------------------

_state_lock = threading.Lock()
_profiling: dict[str, Any] = {
    "snapshots": "stats",
    "sample_rate": 0.01,
    "flush_interval": 1.0,
    "frameworks": None,
}
_detected: list[str] = []


def profiling_config() -> dict[str, Any]:
    """The resolved profiling section of the last profile() call (snapshots, sample_rate, ...)."""
    with _state_lock:
        return dict(_profiling)


def snapshots_on() -> bool:
    """Whether the resolved snapshots mode captures anything (read on every optimizer step by
    the PyTorch hooks: one dict lookup, no lock, no copy)."""
    return _profiling.get("snapshots") in ("stats", "sampled", "full")


def sdk_profile_kwargs(
    cirron: Cirron | None,
    *,
    config: Any,
    frameworks: Any,
    snapshots: Any,
    sample_rate: Any,
    flush_interval: Any,
    path: Any,
    output: Any,
    ours: dict[str, Any],
) -> dict[str, Any]:
    """Our `resolve()` keyword arguments for an SDK-style `profile(...)` call; records the SDK's
    profiling section (validated: ValueError / CirronYamlError at the call, as the SDK)."""
    from ._config import sdk_profiling

    ci = cirron if cirron is not None else get_default()
    resolved = sdk_profiling(
        ci._config,
        config=config,
        frameworks=frameworks,
        snapshots=snapshots,
        sample_rate=sample_rate,
        flush_interval=flush_interval,
        path=path,
    )
    # Surface the effective values on the instance, as the SDK does (its hooks read them there).
    ci.snapshots, ci.sample_rate = resolved["snapshots"], resolved["sample_rate"]
    ci.flush_interval = resolved["flush_interval"]
    with _state_lock:
        _profiling.update(resolved)
    kwargs = dict(ours)
    kwargs.setdefault("flush_interval", resolved["flush_interval"])
    if output is None:
        output = ci.output
    if output is not None:
        kwargs.setdefault("output", output)
    if cirron is not None or ci._explicit.get("output_dir") or ci._env_output_dir:
        kwargs.setdefault("output_dir", ci.output_dir)
    if "spool_max_bytes" not in kwargs and ci.spool_max_bytes != ci._default_spool_max_bytes:
        kwargs["spool_max_bytes"] = ci.spool_max_bytes
    if ci.trace_buffer_max_spans is not None:
        kwargs.setdefault("trace_buffer_records", int(ci.trace_buffer_max_spans))
    if ci.api_key:  # the SDK would also send to the Cirron platform: say so once, do not fail
        from ._warn import warn_once

        warn_once("platform-ingest", f"cirron_otel: CIRRON_API_KEY is set but {NOT_PROVIDED['ingest']}")
    return kwargs


def session_attrs(frameworks: list[str] | None) -> tuple[dict[str, Any], list[str]]:
    """The session span's attributes as cirron-sdk writes them: pid, rank, cirron.run_id (and
    the other CIRRON_* platform ids that are set), framework, device [, cuda_count,
    mixed_precision]; and the frameworks detected."""
    from importlib.util import find_spec

    from ._config import sdk_platform_context, sdk_rank

    attrs: dict[str, Any] = {"pid": os.getpid(), "rank": sdk_rank()}
    for key, value in sdk_platform_context().items():
        attrs[f"cirron.{key}"] = value
    if frameworks is None:
        frameworks = []
        for name in ("torch", "tensorflow", "transformers"):  # the SDK's list, by find_spec (no import)
            try:
                if find_spec(name) is not None:
                    frameworks.append(name)
            except (ValueError, ModuleNotFoundError):
                continue
    if frameworks:
        attrs["framework"] = ",".join(frameworks)
    _device_attrs(attrs)
    with _state_lock:
        _detected[:] = frameworks
    return attrs, list(frameworks)


def _device_attrs(attrs: dict[str, Any]) -> None:
    # The SDK imports torch here. We probe it only when the program has imported it already
    # (a profiled script's start-up must not pay seconds for torch it may not use); a program
    # that imports torch after profile() gets device="cpu" even on a GPU host.
    torch = sys.modules.get("torch")
    if torch is None:
        attrs["device"] = "cpu"
        return
    try:
        cuda = bool(torch.cuda.is_available())
    except Exception:
        cuda = False
    attrs["device"] = "cuda" if cuda else "cpu"
    if cuda:
        with contextlib.suppress(Exception):
            attrs["cuda_count"] = int(torch.cuda.device_count())
    try:
        attrs["mixed_precision"] = bool(torch.is_autocast_enabled())
    except Exception:
        return


# -- Cirron and get_default ---------------------------------------------------------------------


class Cirron:
    """cirron-sdk's `Cirron`: the settings behind the module-level functions. Arguments >
    CIRRON_* variables > defaults, as in the SDK; the platform ones (api_key, api_endpoint,
    ingest_path, load_*) are kept as attributes but unused (there is no platform ingest here)."""

    def __init__(
        self,
        api_key: str | None = None,
        api_endpoint: str | None = None,
        workspace_id: str | None = None,
        output_dir: str | None = None,
        snapshots: str | None = None,
        sample_rate: float | None = None,
        flush_interval: float | None = None,
        spool_max_bytes: int | None = None,
        ingest_path: str | None = None,
        load_warn_bytes: int | None = None,
        load_max_bytes: int | None = None,
        output: str | list[str] | None = None,
        trace_buffer_max_spans: int | None = None,
    ) -> None:
        from ._config import SDK_DEFAULTS, sdk_instance_config

        explicit = {
            "api_key": api_key,
            "api_endpoint": api_endpoint,
            "workspace_id": workspace_id,
            "output_dir": output_dir,
            "snapshots": snapshots,
            "sample_rate": sample_rate,
            "flush_interval": flush_interval,
            "spool_max_bytes": spool_max_bytes,
            "ingest_path": ingest_path,
            "load_warn_bytes": load_warn_bytes,
            "load_max_bytes": load_max_bytes,
        }
        self._explicit = {k: v for k, v in explicit.items() if v is not None}
        self._config = sdk_instance_config(self._explicit)
        self._env_output_dir = self._config["output_dir"] != SDK_DEFAULTS["output_dir"]
        self._default_spool_max_bytes = SDK_DEFAULTS["spool_max_bytes"]
        self.api_key: str | None = self._config["api_key"]
        self.api_endpoint: str = self._config["api_endpoint"]
        self.workspace_id: str | None = self._config["workspace_id"]
        self.output_dir: str = self._config["output_dir"]
        self.snapshots: str = self._config["snapshots"]
        self.sample_rate: float = self._config["sample_rate"]
        self.flush_interval: float = self._config["flush_interval"]
        self.spool_max_bytes: int = self._config["spool_max_bytes"]
        self.ingest_path: str = self._config["ingest_path"]
        self.load_warn_bytes: int = self._config["load_warn_bytes"]
        self.load_max_bytes: int = self._config["load_max_bytes"]
        self.output = output
        self.trace_buffer_max_spans = trace_buffer_max_spans

    def profile(
        self,
        config: dict[str, Any] | None = None,
        *,
        frameworks: list[str] | None = None,
        snapshots: str | None = None,
        sample_rate: float | None = None,
        flush_interval: float | None = None,
        enabled: bool = True,
        path: str | None = None,
        output: str | list[str] | None = None,
    ) -> Any:
        from ._profiler import _profile

        return _profile(
            self,
            config=config,
            frameworks=frameworks,
            snapshots=snapshots,
            sample_rate=sample_rate,
            flush_interval=flush_interval,
            enabled=enabled,
            path=path,
            output=output,
            ours={},
        )

    def trace(self, format: str = "tree", name: str | None = None, last: int | None = None) -> Any:
        from ._profiler import trace

        return trace(format=format, name=name, last=last)  # type: ignore[arg-type]

    def scope(self, name: str, index: int | None = None, **attrs: Any) -> Any:
        from ._native import scope

        return scope(name, index, **attrs)

    def mark(self, name: str, value: float | int | str | bool, **attrs: Any) -> None:
        from ._native import mark

        mark(name, value, **attrs)

    def epochs(self, iterable: Iterable[Any]) -> Iterator[Any]:
        from ._native import epochs

        return epochs(iterable)

    def batches(self, iterable: Iterable[Any]) -> Iterator[Any]:
        from ._native import batches

        return batches(iterable)

    def inference(
        self, fn: Callable[..., Any] | None = None, *, config: dict[str, Any] | None = None
    ) -> Callable[..., Any]:
        from ._inference import inference

        return inference(fn, config=config)

    def wrap(self, estimator: Any) -> Any:
        return wrap(estimator)

    def env(self, key: str, default: Any = None) -> Any:
        return env(key, default)

    def secret(self, name: str) -> str:
        return secret(name)

    def load(self, *args: Any, **kwargs: Any) -> Any:
        return load(*args, **kwargs)

    def deps(self, *required: str) -> dict[str, str | None]:
        return deps(*required)


_default: Cirron | None = None
_default_lock = threading.Lock()


def get_default() -> Cirron:
    """The process-wide default `Cirron`, made on first use (as in cirron-sdk)."""
    global _default
    instance = _default
    if instance is not None:
        return instance
    with _default_lock:
        if _default is None:
            _default = Cirron()
        return _default


# -- watch --------------------------------------------------------------------------------------

_watched: Callable[[], Any] | None = None


def watch(model: Any | None) -> Any | None:
    """Register `model` for snapshot capture (held weakly); None clears. Returns `model`."""
    global _watched
    if model is None:
        _watched = None
        return None
    try:
        _watched = weakref.ref(model)
    except TypeError:  # no weak references to it (C types, object()): held strongly, as the SDK
        _watched = lambda m=model: m  # noqa: E731
    return model


def watched_model() -> Any | None:
    return _watched() if _watched is not None else None


# -- wrap ---------------------------------------------------------------------------------------

_WRAPPED_ATTR = "_cirron_wrapped"
_METHODS = frozenset({"fit", "predict", "transform", "fit_transform", "predict_proba", "score"})


class _WrappedEstimator:
    """cirron-sdk's `ci.wrap` proxy: fit / predict / transform / fit_transform / predict_proba /
    score open a scope of that name (attribute estimator=<class name>); everything else passes
    through to the estimator."""

    __slots__ = ("__weakref__", "_estimator")

    def __init__(self, estimator: Any) -> None:
        object.__setattr__(self, "_estimator", estimator)

    def __getattr__(self, name: str) -> Any:
        est = object.__getattribute__(self, "_estimator")
        attr = getattr(est, name)
        if name in _METHODS and callable(attr):
            return _scoped_method(est, name, attr)
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).__slots__:
            object.__setattr__(self, name, value)
        else:
            setattr(object.__getattribute__(self, "_estimator"), name, value)

    def __delattr__(self, name: str) -> None:
        if name in type(self).__slots__:
            object.__delattr__(self, name)
        else:
            delattr(object.__getattribute__(self, "_estimator"), name)

    def __repr__(self) -> str:
        return f"WrappedEstimator({object.__getattribute__(self, '_estimator')!r})"


def _scoped_method(estimator: Any, method_name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    from ._native import scope

    cls = type(estimator).__name__

    def scoped(*args: Any, **kwargs: Any) -> Any:
        with scope(method_name, estimator=cls):  # the estimator's exceptions propagate
            return method(*args, **kwargs)

    scoped.__name__ = method_name
    scoped.__qualname__ = f"{cls}.{method_name}"
    return scoped


def wrap(estimator: Any) -> Any:
    """Instrument an estimator (sklearn-style; Pipeline / FeatureUnion steps too). Idempotent."""
    if isinstance(estimator, _WrappedEstimator):
        return estimator
    existing = getattr(estimator, _WRAPPED_ATTR, None)
    if isinstance(existing, _WrappedEstimator):
        return existing
    for container in ("steps", "transformer_list"):  # duck-typed: no sklearn import
        items = getattr(estimator, container, None)
        if isinstance(items, list):
            for i, item in enumerate(items):
                if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                    items[i] = (item[0], wrap(item[1]))
    proxy = _WrappedEstimator(estimator)
    with contextlib.suppress(AttributeError, TypeError):
        object.__setattr__(estimator, _WRAPPED_ATTR, proxy)
    return proxy


# -- what cirron-sdk does that is not instrumentation ---------------------------------------------

NOT_PROVIDED: dict[str, str] = {
    "load": "data loading (ci.load) is not part of cirron-otel; read data with pandas / polars / "
    "your framework's loaders (or keep cirron-sdk installed and use cirron.load)",
    "map": "ci.map (a ci.load helper) is not part of cirron-otel; apply the function to your data directly",
    "secret": "secrets (ci.secret) are not part of cirron-otel; read os.environ or your secret manager",
    "env": "ci.env (.env loading) is not part of cirron-otel; use os.environ, or python-dotenv's "
    "load_dotenv() then os.environ",
    "deps": "ci.deps (optional-extra checks) is not part of cirron-otel; use importlib.util.find_spec",
    "find_cirron_yaml": "cirron.yaml handling beyond its `profiling:` section is not part of "
    "cirron-otel; profile(path=...) reads that section",
    "load_cirron_yaml": "cirron.yaml handling beyond its `profiling:` section is not part of "
    "cirron-otel; profile(path=...) reads that section",
    "CirronYaml": "the cirron.yaml pydantic models are not part of cirron-otel",
    "ProfilingConfig": "the cirron.yaml pydantic models are not part of cirron-otel; pass a dict "
    "as profile(config=...)",
    "ServingConfig": "the cirron.yaml pydantic models are not part of cirron-otel",
    "ingest": "the Cirron platform's HTTP ingest is not part of cirron-otel; send to an "
    "OpenTelemetry collector (profile(output='otlp') or OTEL_EXPORTER_OTLP_ENDPOINT), "
    "or upload the spool",
}


def _not_provided(name: str) -> Callable[..., Any]:
    reason = NOT_PROVIDED[name]

    def stub(*args: Any, **kwargs: Any) -> Any:
        raise CirronNotProvided(f"cirron_otel.{name}: {reason}")

    stub.__name__ = stub.__qualname__ = name
    stub.__doc__ = f"Not provided by cirron-otel (raises CirronNotProvided): {reason}."
    return stub


load = _not_provided("load")
map = _not_provided("map")
secret = _not_provided("secret")
env = _not_provided("env")
deps = _not_provided("deps")
find_cirron_yaml = _not_provided("find_cirron_yaml")
load_cirron_yaml = _not_provided("load_cirron_yaml")
CirronYaml = _not_provided("CirronYaml")
ProfilingConfig = _not_provided("ProfilingConfig")
ServingConfig = _not_provided("ServingConfig")


# -- internal errors swallowed by the compatibility layer (health()["swallowed_errors"]) ---------

_swallowed: dict[str, int] = {}


def swallowed(where: str, exc: BaseException) -> None:
    """Count an internal failure under `where` (never raised: telemetry never breaks the program)."""
    with _state_lock:
        _swallowed[where] = _swallowed.get(where, 0) + 1


def swallowed_counts() -> dict[str, int]:
    with _state_lock:
        return dict(_swallowed)
