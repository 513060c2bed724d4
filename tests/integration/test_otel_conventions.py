"""OpenTelemetry conventions: `OTEL_PYTHON_CONTEXT=cirron_otel` in every import order (also under
`opentelemetry-instrument`), and the private OpenTelemetry attributes cirron_otel relies on.

Import orders are only meaningful in fresh interpreters: every case runs in a subprocess that
checks, with the real SDK, that Cirron scopes and OpenTelemetry spans nest both ways.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cirron_otel import _otel_private
from tests.support.helpers import run_script, spans_and_marks

ROOT = Path(__file__).resolve().parents[2]

# Appended to every script: both nestings with the real SDK, reported as one JSON line.
NESTING = """
import json as _json
import opentelemetry.context as _otel_ctx
from opentelemetry.sdk.trace import TracerProvider as _TP
from cirron_otel import _otel_private
from cirron_otel._otel_context import CirronRuntimeContext as _CRC

_tracer = _TP().get_tracer("conventions")
with _tracer.start_as_current_span("otel-outer") as _outer, ci.scope("cirron-mid") as _mid:
    with _tracer.start_as_current_span("otel-inner") as _inner, ci.scope("cirron-deep") as _deep:
        pass
_oc, _ic = _outer.get_span_context(), _inner.get_span_context()
ci.shutdown()
print(_json.dumps({
    "runtime": type(_otel_private.runtime_context()).__name__,
    "runtime_is_cirron": isinstance(_otel_private.runtime_context(), _CRC),
    "scope_under_otel": _mid.parent_id == f"{_oc.span_id:016x}{_oc.trace_id >> 64:016x}",
    "scope_trace_is_otel": _mid.trace_id == f"{_oc.trace_id:032x}",
    "otel_under_scope": _inner.parent is not None and _inner.parent.span_id == _mid.span_id_int,
    "deep_under_otel": _deep.parent_id == f"{_ic.span_id:016x}{_ic.trace_id >> 64:016x}",
    "finders": [getattr(f, "fullname", "") for f in __import__("sys").meta_path],  # _on_import's
}))
"""

CONTEXT_VARS, CONTEXT_IDS = ["cirron_otel", None], ["OTEL_PYTHON_CONTEXT", "profile_installs"]

ORDERS = {
    # the API imported (and its runtime loaded) before cirron_otel is
    "opentelemetry_first": """
        import opentelemetry.trace
        import cirron_otel as ci
        ci.profile(output="spool", install_signal_handlers=False)
    """,
    # profile() before anything imported OpenTelemetry: the runtime is loaded on its import
    "cirron_otel_first": """
        import cirron_otel as ci
        ci.profile(output="spool", install_signal_handlers=False)
        import sys
        assert not any(m.startswith("opentelemetry") for m in sys.modules), "imported too early"
        import opentelemetry.trace
    """,
    # cirron_otel imported first, OpenTelemetry before profile()
    "interleaved": """
        import cirron_otel as ci
        import opentelemetry.trace
        ci.profile(output="spool", install_signal_handlers=False)
    """,
    # the runtime loaded by OpenTelemetry itself importing cirron_otel's package first thing
    "runtime_loads_package": """
        import opentelemetry.context
        import cirron_otel as ci
        ci.profile(output="spool", install_signal_handlers=False)
    """,
}


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr
    # OpenTelemetry logs and falls back to its default runtime when loading ours fails
    assert "Failed to load context" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _assert_nested_both_ways(result: dict[str, object]) -> None:
    assert result["runtime_is_cirron"], result
    assert result["scope_under_otel"] and result["scope_trace_is_otel"], result
    assert result["otel_under_scope"], result
    assert result["deep_under_otel"], result
    assert "opentelemetry.context" not in result["finders"], "the one-shot import hook must remove itself"


@pytest.mark.parametrize("context_var", CONTEXT_VARS, ids=CONTEXT_IDS)
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_context_in_every_import_order(order: str, context_var: str | None, tmp_path: Path) -> None:
    env = {"CIRRON_OUTPUT_DIR": str(tmp_path / "out")}
    if context_var:
        env["OTEL_PYTHON_CONTEXT"] = context_var
    proc = run_script(textwrap.dedent(ORDERS[order]) + NESTING, env=env, timeout=120)
    _assert_nested_both_ways(_result(proc))
    spans = {s["name"]: s for s in spans_and_marks(tmp_path / "out")[0]}
    assert spans["cirron-deep"]["trace_id"] == spans["cirron-mid"]["trace_id"]


def test_context_selected_without_profile(tmp_path: Path) -> None:
    """OTEL_PYTHON_CONTEXT alone (no profile()): OpenTelemetry spans still see open scopes."""
    code = """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        import cirron_otel as ci
        from cirron_otel import _otel_private
        from cirron_otel._otel_context import CirronRuntimeContext
        assert isinstance(_otel_private.runtime_context(), CirronRuntimeContext)
        tracer = TracerProvider().get_tracer("t")
        with ci.scope("outer") as outer, tracer.start_as_current_span("inner") as inner:
            pass
        assert inner.parent.span_id == outer.span_id_int
        print("{}")
    """
    proc = run_script(code, env={"OTEL_PYTHON_CONTEXT": "cirron_otel"}, timeout=120)
    _result(proc)


def _instrument() -> str:
    found = shutil.which("opentelemetry-instrument", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.skip("opentelemetry-instrument is not installed (opentelemetry-instrumentation, a test extra)")
    return found


@pytest.mark.real_backend  # needs the opentelemetry-instrument entry point: a skip fails CI
@pytest.mark.parametrize("context_var", CONTEXT_VARS, ids=CONTEXT_IDS)
def test_context_under_opentelemetry_instrument(context_var: str | None, tmp_path: Path) -> None:
    """The distro's auto-instrumentation imports and configures OpenTelemetry before the app."""
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent("""
        import sys
        assert "opentelemetry.context" in sys.modules, "auto-instrumentation did not run first"
        import cirron_otel as ci
        ci.profile(output="spool", install_signal_handlers=False)
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        assert isinstance(trace.get_tracer_provider(), TracerProvider), "the distro set no SDK provider"
    """)
        + NESTING
    )
    env = {
        **os.environ,
        "CIRRON_OUTPUT_DIR": str(tmp_path / "out"),
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    env.pop("OTEL_PYTHON_CONTEXT", None)
    if context_var:
        env["OTEL_PYTHON_CONTEXT"] = context_var
    proc = subprocess.run(
        [_instrument(), sys.executable, str(app)], capture_output=True, text=True, timeout=120, env=env
    )
    _assert_nested_both_ways(_result(proc))


# -- private OpenTelemetry attributes ---------------------------------------------------------


def test_private_opentelemetry_attributes_still_exist_upstream() -> None:
    """Fails, naming the attribute and the installed version, when OpenTelemetry changes one."""
    _otel_private.check()


def test_upstream_change_names_the_attribute_and_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import version

    import opentelemetry.context as otel_context

    class ProviderWithoutIt:
        pass

    with pytest.raises(_otel_private.UpstreamChanged) as info:
        _otel_private.span_processor(ProviderWithoutIt())
    message = str(info.value)
    assert "TracerProvider._active_span_processor" in message
    assert f"opentelemetry-sdk {version('opentelemetry-sdk')}" in message

    monkeypatch.delattr(otel_context, "_RUNTIME_CONTEXT")
    api = version("opentelemetry-api")
    expected = f"opentelemetry.context._RUNTIME_CONTEXT, which opentelemetry-api {api}"
    with pytest.raises(_otel_private.UpstreamChanged, match=re.escape(expected)):
        _otel_private.runtime_context()


def test_profile_survives_an_upstream_change(tmp_path: Path) -> None:
    """profile() warns and keeps the spool when a private attribute is gone (both of them)."""
    code = """
        import warnings
        warnings.simplefilter("always")
        import opentelemetry.context
        from opentelemetry.sdk.trace import TracerProvider
        del opentelemetry.context._RUNTIME_CONTEXT
        provider = TracerProvider(shutdown_on_exit=False)
        del provider._active_span_processor
        import cirron_otel as ci
        with warnings.catch_warnings(record=True) as caught:
            prof = ci.profile(output="spool", tracer_provider=provider, install_signal_handlers=False)
        with ci.scope("kept"):
            pass
        ci.shutdown()
        text = " | ".join(str(w.message) for w in caught)
        assert "_RUNTIME_CONTEXT" in text and "_active_span_processor" in text, text
        assert prof.health()["otel_context"] is False
        print("{}")
    """
    _result(run_script(code, env={"CIRRON_OUTPUT_DIR": str(tmp_path / "out")}, timeout=120))
    assert [s["name"] for s in spans_and_marks(tmp_path / "out")[0]].count("kept") == 1


def test_private_attributes_only_in_otel_private() -> None:
    """Any other module reaching into OpenTelemetry's privates bypasses the check above
    (exporters/otlp*.py are covered by their own transport tests)."""
    names = re.compile(r"_RUNTIME_CONTEXT|_active_span_processor|\b_RuntimeContext\b")
    offenders = [
        str(path.relative_to(ROOT))
        for path in [*(ROOT / "src" / "cirron_otel").glob("*.py"), *(ROOT / "exporters").glob("*.py")]
        if path.name != "_otel_private.py"
        and not path.name.startswith("otlp")
        and names.search(path.read_text())
    ]
    assert offenders == []
