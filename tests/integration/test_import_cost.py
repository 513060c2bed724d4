"""Start-up cost: OpenTelemetry is imported only when something needs it.

A program that does not use OpenTelemetry must not pay for importing it (tens of ms, most of
what `profile()` used to cost). Checked by what is in `sys.modules`, in fresh interpreters,
not by timing; the measured start-up time is in the README (scripts: see the report).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.helpers import run_script, spans_and_marks

OTEL_MODULES = "sorted(m for m in sys.modules if m == 'opentelemetry' or m.startswith('opentelemetry.'))"


def _last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_spool_only_profile_imports_no_opentelemetry(tmp_path: Path) -> None:
    code = f"""
        import json, sys
        before = set(sys.modules)
        import cirron_otel as ci
        after_import = {OTEL_MODULES}
        ci.profile(output="spool", install_signal_handlers=False)
        with ci.scope("step"):
            ci.mark("loss", 0.5)
        ci.flush()
        after_profile = {OTEL_MODULES}
        ci.shutdown()
        print(json.dumps({{"after_import": after_import, "after_profile": after_profile,
                          "after_shutdown": {OTEL_MODULES},
                          "modules_added": len(set(sys.modules) - before)}}))
    """
    result = _last_json(run_script(code, env={"CIRRON_OUTPUT_DIR": str(tmp_path / "out")}))
    assert result["after_import"] == [] and result["after_profile"] == [] and result["after_shutdown"] == []
    print(f"modules imported by `import cirron_otel; ci.profile(output='spool')`: {result['modules_added']}")
    assert [s["name"] for s in spans_and_marks(tmp_path / "out")[0]].count("step") == 1


def test_default_profile_without_an_endpoint_imports_no_opentelemetry(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["CIRRON_OUTPUT_DIR"] = str(tmp_path / "out")
    code = f"import sys, json, cirron_otel as ci; ci.profile(); print(json.dumps({{'m': {OTEL_MODULES}}}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert _last_json(proc)["m"] == []


def test_program_using_only_the_api_does_not_get_the_sdk(tmp_path: Path) -> None:
    """The global provider can only be an SDK one once the SDK is imported: not imported for it."""
    code = """
        import json, sys
        from opentelemetry import trace
        import cirron_otel as ci
        ci.profile(output="spool", install_signal_handlers=False)
        print(json.dumps({"sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk"))}))
    """
    assert _last_json(run_script(code, env={"CIRRON_OUTPUT_DIR": str(tmp_path / "out")}))["sdk"] == []


def test_opentelemetry_imported_later_joins_and_the_hook_leaves_no_trace(tmp_path: Path) -> None:
    code = """
        import json, sys
        import cirron_otel as ci
        ci.profile(output="spool", install_signal_handlers=False)
        hooked = [getattr(f, "fullname", "") for f in sys.meta_path]  # what _on_import waits for
        import opentelemetry.context as otel_context
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        tracer = TracerProvider().get_tracer("later")
        with ci.scope("outer") as outer, tracer.start_as_current_span("inner") as inner:
            inner_parent = inner.parent.span_id if inner.parent else None
            current = trace.get_current_span().get_span_context().span_id
        with tracer.start_as_current_span("otel") as otel, ci.scope("scope") as scope:
            pass
        oc = otel.get_span_context()
        print(json.dumps({
            "hooked": hooked,
            "after": [getattr(f, "fullname", "") for f in sys.meta_path],
            "loader_is_real": type(otel_context.__loader__).__name__ == "SourceFileLoader"
                              and otel_context.__spec__.loader is otel_context.__loader__,
            "otel_under_scope": inner_parent == outer.span_id_int,
            "current_is_inner": current == inner.get_span_context().span_id,
            "scope_under_otel": scope.parent_id == f"{oc.span_id:016x}{oc.trace_id >> 64:016x}",
        }))
    """
    result = _last_json(run_script(code, env={"CIRRON_OUTPUT_DIR": str(tmp_path / "out")}))
    assert "opentelemetry.context" in result["hooked"]
    assert "opentelemetry.context" not in result["after"]
    assert result["loader_is_real"]
    assert result["otel_under_scope"] and result["current_is_inner"] and result["scope_under_otel"]


def test_otel_context_false_installs_nothing(tmp_path: Path) -> None:
    code = """
        import json, sys
        import cirron_otel as ci
        ci.profile(output="spool", install_signal_handlers=False, otel_context=False)
        hooked = [getattr(f, "fullname", "") for f in sys.meta_path]  # what _on_import waits for
        import opentelemetry.context as otel_context
        from opentelemetry.sdk.trace import TracerProvider
        from cirron_otel import _otel_private
        tracer = TracerProvider().get_tracer("t")
        with tracer.start_as_current_span("otel") as otel, ci.scope("scope") as scope:
            pass
        print(json.dumps({"hooked": hooked, "runtime": type(_otel_private.runtime_context()).__name__,
                          "scope_trace": scope.trace_id,
                          "otel_trace": f"{otel.get_span_context().trace_id:032x}"}))
    """
    result = _last_json(run_script(code, env={"CIRRON_OUTPUT_DIR": str(tmp_path / "out")}))
    assert "opentelemetry.context" not in result["hooked"]
    assert result["runtime"] == "ContextVarsRuntimeContext"
    assert result["scope_trace"] != result["otel_trace"]


# What `import cirron_otel; ci.profile(output="spool")` and writing the spool must not import:
# each costs milliseconds of every profiled program's start-up (at most 5 ms in all),
# and only OTLP, health(), a spool file split after ENOSPC or a decorated scope needs one.
HEAVY_MODULES = (
    "dataclasses",
    "uuid",
    "platform",
    "json",
    "inspect",
    "socket",
    "ssl",
    "asyncio",
    "opentelemetry",
    "google.protobuf",
    "grpc",
)
# `typing` too, for `import cirron_otel` alone; profile() still imports it through _otel_context
# (its `_Runtime` Protocol class): see test_spool_only_profile_does_not_import_typing.
HEAVY_AT_IMPORT = (*HEAVY_MODULES, "typing")


def _heavy_imports(tmp_path: Path) -> dict[str, object]:
    """Which of HEAVY_* a fresh interpreter imports at each step (the script imports nothing
    itself: its result is printed as a repr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = f"""
import sys
before = set(sys.modules)  # site and the venv's own imports: not ours

def added(names):
    return sorted(m for m in names if m in sys.modules and m not in before)

import cirron_otel as ci
after_import = added({HEAVY_AT_IMPORT!r})
ci.profile(output="spool", output_dir={str(tmp_path / "out")!r}, install_signal_handlers=False)
with ci.scope("step"):
    ci.mark("loss", 0.5)
flushed = ci.flush()
after_profile = added({HEAVY_MODULES!r})
typing_after_profile = added(("typing",))
ci.shutdown()
print(repr(dict(after_import=after_import, after_profile=after_profile, flushed=flushed,
                typing_after_profile=typing_after_profile, after_shutdown=added({HEAVY_MODULES!r}))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    return result


def test_spool_only_profile_imports_nothing_heavy(tmp_path: Path) -> None:
    """Pinned without a clock: dataclasses (~7 ms), uuid + platform (~2 ms), json, typing..."""
    result = _heavy_imports(tmp_path)
    assert result["flushed"] is True
    assert result["after_import"] == [], "imported by `import cirron_otel`"
    assert result["after_profile"] == [], "imported by profile(output='spool') and a spool write"
    assert result["after_shutdown"] == [], "imported by shutdown()"
    spans, _marks = spans_and_marks(tmp_path / "out")
    assert [s["name"] for s in spans].count("step") == 1


def test_spool_only_profile_does_not_import_typing(tmp_path: Path) -> None:
    assert _heavy_imports(tmp_path)["typing_after_profile"] == []


def test_batch_ids_are_uuid4_without_importing_uuid() -> None:
    """`new_batch_id()` replaces `uuid.uuid4().hex` (importing uuid imports platform)."""
    import uuid

    from cirron_otel.exporters.spool_dir import new_batch_id, new_file_name

    ids = [new_batch_id() for _ in range(2000)] + [new_file_name()[1] for _ in range(100)]
    assert len(set(ids)) == len(ids)
    for batch_id in ids:
        assert len(batch_id) == 32 and batch_id == batch_id.lower() and int(batch_id, 16) >= 0
        parsed = uuid.UUID(hex=batch_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and parsed.hex == batch_id
    # the 122 random bits are all used: digit 12 is the version, digit 16 holds the variant
    for pos in range(32):
        seen = {batch_id[pos] for batch_id in ids}
        if pos == 12:
            assert seen == {"4"}
        elif pos == 16:
            assert seen == set("89ab")
        else:
            assert len(seen) == 16, (pos, seen)
