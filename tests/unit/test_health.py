"""health() has one shape: enabled, disabled or stopped, the same keys, as `Health` describes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cirron_otel as ci
from cirron_otel._health import DrainerHealth, Health, OtelHealth

# Sub-dicts whose keys are part of the shape (`sinks` and `platform_context` vary by design:
# one entry per sink; no platform context while disabled).
_NESTED = {"otel": OtelHealth, "drainer": DrainerHealth}


def _shape(health: dict[str, Any]) -> dict[str, frozenset[str]]:
    return {"": frozenset(health), **{key: frozenset(health.get(key, ())) for key in _NESTED}}


def test_disabled_enabled_and_stopped_health_have_the_same_keys(out: Path) -> None:
    ci.profile(enabled=False)
    disabled = ci.health()
    ci.shutdown()
    ci.profile(output_dir=str(out), install_signal_handlers=False)
    ci.mark("m", 1)
    ci.flush()
    enabled = ci.health()
    ci.shutdown()
    stopped = ci.health()

    assert disabled["enabled"] is False and enabled["enabled"] is True and stopped["enabled"] is False
    described = {"": Health.__required_keys__, **{k: td.__required_keys__ for k, td in _NESTED.items()}}
    assert _shape(disabled) == _shape(enabled) == _shape(stopped) == described


def test_the_readme_keys_are_in_the_disabled_shape_too() -> None:
    ci.profile(enabled=False)
    health = ci.health()
    assert health["marks_recorded"] >= 0 and health["spans_recorded"] >= 0
    assert health["records_collected"] >= 0
