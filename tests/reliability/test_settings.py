"""Defect 7: non-finite and out-of-range settings are refused at the call, naming the option.

Before the fix `ring_full_wait=inf` dropped marks at once, `flush_interval=inf` killed the
spool worker silently and `nan` disabled periodic writes: each number here must raise a
ValueError (wrong types a TypeError) from `profile()` itself, and leave nothing running.
"""

from __future__ import annotations

import math
import os

import pytest

import cirron_otel as ci
from cirron_otel import _config

INF, NAN = math.inf, math.nan

# (option, bad values, a good value): every numeric option of profile().
NUMERIC_OPTIONS: list[tuple[str, list[object], object]] = [
    ("flush_interval", [INF, -INF, NAN, 0, 0.0, -1, 3600.5, 1e300], 0.5),
    ("ring_full_wait", [INF, -INF, NAN, -0.001, 3601, 1e300], 0),
    ("ring_capacity", [0, 63, -64, (1 << 26) + 1, 1 << 62], 64),
    ("spool_max_bytes", [0, -1, (1 << 60) + 1], 1),
    ("trace_buffer_records", [0, -5, (1 << 40) + 1], 1),
    ("spool_retry_records", [0, -5, (1 << 40) + 1], 1),
    ("shutdown_timeout", [INF, NAN, 0, -1, 3601], 3600),
    ("otlp_outbox_max_bytes", [0, -1, (1 << 60) + 1], 1),
    ("otlp_max_request_bytes", [0, 65535, (1 << 31) + 1], 65536),
    ("otlp_queue_requests", [0, -1, (1 << 20) + 1], 1),
]


def _cases() -> list[tuple[str, object]]:
    return [(name, bad) for name, bads, _ in NUMERIC_OPTIONS for bad in bads]


@pytest.mark.parametrize(("option", "bad"), _cases(), ids=lambda v: repr(v))
def test_bad_number_raises_value_error_naming_the_option(option, bad, out):
    with pytest.raises(ValueError, match=rf"^cirron_otel\.profile\(\): {option} must be") as info:
        ci.profile(output_dir=str(out), install_signal_handlers=False, **{option: bad})
    if isinstance(bad, float) and not math.isfinite(bad):
        assert "finite" in str(info.value)
    assert ci.health()["enabled"] is False  # nothing was started
    assert not out.exists()


@pytest.mark.parametrize(("option", "good"), [(n, g) for n, _, g in NUMERIC_OPTIONS])
def test_bounds_themselves_are_accepted(option, good):
    settings = _config.resolve(**{option: good}, env={})
    assert getattr(settings, option) == good


@pytest.mark.parametrize(
    "option",
    [
        "ring_capacity",
        "spool_max_bytes",
        "trace_buffer_records",
        "spool_retry_records",
        "otlp_outbox_max_bytes",
        "otlp_max_request_bytes",
        "otlp_queue_requests",
    ],
)
@pytest.mark.parametrize("bad", [64.0, "64", True, None])
def test_integer_options_refuse_other_types(option, bad):
    with pytest.raises(TypeError, match=rf"{option} must be an int, not {type(bad).__name__}"):
        _config.resolve(**{option: bad}, env={})


@pytest.mark.parametrize("option", ["flush_interval", "ring_full_wait", "shutdown_timeout"])
@pytest.mark.parametrize("bad", ["1", True, None, [1]])
def test_second_options_refuse_other_types(option, bad):
    with pytest.raises(TypeError, match=rf"{option} must be a number"):
        _config.resolve(**{option: bad}, env={})


@pytest.mark.parametrize("key", ["RANK", "LOCAL_RANK"])
@pytest.mark.parametrize("raw", ["nan", "inf", "-1", "1.5", "abc", str(1 << 31), "1e3"])
def test_bad_rank_environment_variable_names_the_variable(key, raw):
    with pytest.raises(ValueError, match=rf"environment variable {key} must be"):
        _config.resolve(env={key: raw})


def test_rank_environment_precedence_and_blank_values():
    assert _config.resolve(env={"RANK": "3", "LOCAL_RANK": "nan"}).rank == 3
    assert _config.resolve(env={"RANK": " ", "LOCAL_RANK": " 7 "}).rank == 7
    assert _config.resolve(env={}).rank == 0


def test_bad_environment_reaches_profile_as_value_error(out, monkeypatch):
    monkeypatch.setenv("RANK", "inf")
    with pytest.raises(ValueError, match="environment variable RANK"):
        ci.profile(output_dir=str(out), install_signal_handlers=False)
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("CIRRON_FILE_MODE", "world")
    with pytest.raises(ValueError, match="environment variable CIRRON_FILE_MODE"):
        ci.profile(output_dir=str(out), install_signal_handlers=False)
    assert ci.health()["enabled"] is False


def test_file_mode_option_values():
    assert _config.resolve(env={}).file_mode == "user"
    assert _config.resolve(env={"CIRRON_FILE_MODE": "group"}).file_mode == "group"
    assert _config.resolve(file_mode="user", env={"CIRRON_FILE_MODE": "group"}).file_mode == "user"
    with pytest.raises(ValueError, match=r"file_mode must be one of \('user', 'group'\)"):
        _config.resolve(file_mode="0644", env={})


def test_largest_finite_settings_still_record_and_flush(out):
    # The top of each range is a working configuration, not a silent "never".
    ci.profile(output_dir=str(out), install_signal_handlers=False, flush_interval=3600, ring_full_wait=3600)
    ci.mark("x", 1)
    assert ci.flush(timeout=10)
    ci.shutdown()
    assert os.listdir(out / "spool")


@pytest.mark.parametrize("raw", ["inf", "nan", "0", "-5", "1e300", "3600001", "soon"])
def test_bad_otlp_timeout_environment_variable_names_the_variable(raw):
    env = {"OTEL_EXPORTER_OTLP_TIMEOUT": raw}
    with pytest.raises(ValueError, match=r"^OTEL_EXPORTER_OTLP_TIMEOUT must be a number of milliseconds"):
        _config.otlp_transport_config("grpc", None, env)
    top = _config.otlp_transport_config("grpc", None, {"OTEL_EXPORTER_OTLP_TIMEOUT": "3600000"})
    assert top.timeout == 3600


@pytest.mark.parametrize("key", _config.OTEL_LIMIT_VARIABLES)
@pytest.mark.parametrize("raw", ["inf", "nan", "-1", "1e3", "²", str(1 << 31)])
def test_bad_span_limit_variable_is_refused_when_exporting_otlp(key, raw):
    env = {key: raw, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4317"}
    with pytest.raises(ValueError, match=rf"environment variable {key} must be an integer"):
        _config.resolve(env=env)
    # Without OTLP export nothing reads it: the spool alone still starts.
    assert _config.resolve(output="spool", env=env).outputs == frozenset({"spool"})
    assert _config.resolve(env={**env, key: "0"}).outputs == frozenset({"spool", "otlp"})


def test_bad_span_limit_reaches_profile_as_value_error(out, monkeypatch):
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "inf")
    with pytest.raises(ValueError, match="OTEL_SPAN_EVENT_COUNT_LIMIT"):
        ci.profile(output_dir=str(out), output="spool,otlp", install_signal_handlers=False)
    assert ci.health()["enabled"] is False
