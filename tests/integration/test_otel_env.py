"""The OpenTelemetry SDK's own environment variables: OTEL_SDK_DISABLED,
OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, OTEL_TRACES_EXPORTER, and the exit of a program
whose collector is unreachable.

Variables are set for real in fresh interpreters (`run_script`), spans are counted by the
in-process OTLP receivers and in the spool; the sampling decision is checked trace by trace
against the OpenTelemetry SDK's own `TraceIdRatioBased`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, TraceIdRatioBased

import cirron_otel as ci
from cirron_otel import _warn
from cirron_otel._config import resolve, sampler_bound, sdk_disabled, traces_exporters, traces_sampler
from tests.support.helpers import run_script, spans_and_marks
from tests.support.otlp import Receiver, clear_env, protocol
from tests.support.otlp_receivers import GrpcReceiver, HttpReceiver


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_env(monkeypatch)
    _warn.reset()  # each test sees the warnings it provokes (they are once per process)


pytestmark = pytest.mark.timeout(180)

EPOCHS = 60  # each epoch a trace of its own (trace_per="child"), with one nested span


# A workload in a fresh interpreter: the session, EPOCHS epochs with a nested step each; prints
# health() as JSON on its last line. {profile} is the profile() call's arguments.
WORKLOAD = """
    import json
    import cirron_otel as ci
    {before}
    ci.profile(flush_interval=0.05, install_signal_handlers=False{profile})
    for epoch in ci.epochs(range({epochs})):
        with ci.scope("step"):
            ci.mark("loss", 0.5)
    ci.shutdown()
    print(json.dumps(ci.health(), default=str))
"""


def run_workload(
    out: Path, env: dict[str, str], *, profile: str = "", before: str = "", epochs: int = EPOCHS
) -> tuple[dict[str, Any], str, str]:
    """(health, stdout before its last line, stderr) of the workload run with `env`."""
    code = WORKLOAD.format(
        profile=profile, before=textwrap.indent(textwrap.dedent(before), "    ").strip(), epochs=epochs
    )
    run = run_script(code, env={"CIRRON_OUTPUT_DIR": str(out), **env}, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    at = max(i for i, line in enumerate(lines) if line.startswith('{"enabled"'))  # health(), printed last
    return json.loads(lines[at]), "\n".join(lines[:at]), run.stderr


def otlp_env(receiver: Receiver, **more: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol(receiver),
        **more,
    }


def warnings_about(stderr: str, variable: str) -> int:
    """How many CirronWarnings name `variable` (the source line warnings also prints is not counted)."""
    return len(re.findall(rf"CirronWarning: cirron_otel: {variable}\b", stderr))


# -- parsing, as the SDK environment specification says ------------------------------------------


@pytest.mark.parametrize(
    ("value", "disabled", "warned"),
    [
        (None, False, False),
        ("", False, False),
        ("true", True, False),
        (" TRUE ", True, False),
        ("false", False, False),
        ("False", False, False),
        ("1", False, True),
        ("yes", False, True),
    ],
)
def test_sdk_disabled_reads_true_in_any_case_and_warns_about_anything_but_true_or_false(
    value: str | None, disabled: bool, warned: bool
):
    env = {} if value is None else {"OTEL_SDK_DISABLED": value}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sdk_disabled(env) is disabled
    assert [("OTEL_SDK_DISABLED" in str(w.message)) for w in caught] == ([True] if warned else [])


@pytest.mark.parametrize(
    ("sampler", "arg", "expected", "warned"),
    [
        (None, None, ("parentbased_always_on", 1.0), None),
        ("", "0.5", ("parentbased_always_on", 1.0), None),
        ("always_off", "0.5", ("always_off", 1.0), None),
        ("AlWays_On", None, ("always_on", 1.0), None),
        ("traceidratio", "0.25", ("traceidratio", 0.25), None),
        ("parentbased_traceidratio", " 0 ", ("parentbased_traceidratio", 0.0), None),
        ("traceidratio", None, ("traceidratio", 1.0), None),  # the specification's default
        ("traceidratio", "1.5", ("traceidratio", 1.0), "OTEL_TRACES_SAMPLER_ARG"),
        ("traceidratio", "-0.1", ("traceidratio", 1.0), "OTEL_TRACES_SAMPLER_ARG"),
        ("traceidratio", "nan", ("traceidratio", 1.0), "OTEL_TRACES_SAMPLER_ARG"),
        ("traceidratio", "half", ("traceidratio", 1.0), "OTEL_TRACES_SAMPLER_ARG"),
        ("jaeger_remote", None, ("parentbased_always_on", 1.0), "OTEL_TRACES_SAMPLER"),
        ("xray", "0.1", ("parentbased_always_on", 1.0), "OTEL_TRACES_SAMPLER"),
    ],
)
def test_sampler_variables_fall_back_to_the_default_with_a_warning_naming_the_variable(
    sampler: str | None, arg: str | None, expected: tuple[str, float], warned: str | None
):
    pairs = (("OTEL_TRACES_SAMPLER", sampler), ("OTEL_TRACES_SAMPLER_ARG", arg))
    env = {k: v for k, v in pairs if v is not None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert traces_sampler(env) == expected
    named = [re.match(r"cirron_otel: (\w+):", str(w.message)) for w in caught]
    assert [m.group(1) for m in named if m] == ([warned] if warned else [])


@pytest.mark.parametrize("rate", [0.0, 1e-9, 0.1, 0.25, 0.5, 0.999999, 1.0])
def test_the_ratio_bound_is_the_sdks(rate: float):
    sample_all, bound = sampler_bound("traceidratio", rate)
    sdk = TraceIdRatioBased(rate).bound
    assert (sample_all, bound) == ((True, (1 << 64) - 1) if sdk > (1 << 64) - 1 else (False, sdk))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("none", (False, None, ())),
        (" NONE ", (False, None, ())),
        ("otlp", (True, None, ())),
        ("otlp_proto_http", (True, "http/protobuf", ())),
        ("otlp_proto_grpc", (True, "grpc", ())),
        ("cirron_spool", (False, None, ())),
        ("console, otlp ,cirron_spool", (True, None, ("console",))),
        ("console,console,my_exporter", (False, None, ("console", "my_exporter"))),
    ],
)
def test_traces_exporter_lists(value: str | None, expected: Any):
    assert traces_exporters({} if value is None else {"OTEL_TRACES_EXPORTER": value}) == expected


@pytest.mark.parametrize(
    ("env", "output", "outputs", "exporters"),
    [
        ({}, None, {"spool"}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, None, {"spool", "otlp"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, None, {"spool", "otlp"}, ()),  # the default endpoint, as the SDK
        (
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"},
            None,
            {"spool"},
            (),
        ),
        (
            {"OTEL_TRACES_EXPORTER": "cirron_spool", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"},
            None,
            {"spool"},
            (),
        ),
        ({"OTEL_TRACES_EXPORTER": "console"}, None, {"spool"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "none"}, "spool,otlp", {"spool", "otlp"}, ()),  # profile(output=) wins
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, "spool", {"spool"}, ()),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp,console"}, None, {"spool"}, ()),
        ({"OTEL_SDK_DISABLED": "true"}, "spool,otlp", {"spool"}, ()),  # disabled wins, with a warning
    ],
)
def test_what_profile_exports(
    env: dict[str, str], output: str | None, outputs: set[str], exporters: tuple[str, ...]
):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = resolve(output=output, env=env)
    assert (settings.outputs, settings.span_exporters) == (outputs, exporters)
    disabled_but_asked = env.get("OTEL_SDK_DISABLED") == "true" and output is not None
    assert [str(w.message) for w in caught if "OTEL_SDK_DISABLED" in str(w.message)] == (
        ["cirron_otel: OTEL_SDK_DISABLED: true: OTLP export is off, although profile(output=...) asks for it"]
        if disabled_but_asked
        else []
    )


# -- OTEL_SDK_DISABLED -----------------------------------------------------------------------------

APP_PROVIDER = """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    import atexit
    atexit.register(lambda: print("app provider spans:", len(memory.get_finished_spans())))
"""


@pytest.mark.parametrize("how", ["default", "output=spool,otlp"])
def test_sdk_disabled_exports_nothing_and_the_spool_keeps_everything(
    out: Path, grpc_receiver: GrpcReceiver, how: str
):
    env = otlp_env(grpc_receiver, OTEL_SDK_DISABLED="true")
    profile = ", output='spool,otlp'" if how.startswith("output") else ""
    health, _, stderr = run_workload(out, env, profile=profile)
    assert grpc_receiver.span_count() == 0
    spans, marks = spans_and_marks(out)
    assert len(spans) == 2 * EPOCHS + 1 and len(marks) == EPOCHS
    assert health["otel"]["sdk_disabled"] is True
    assert health["otel"]["export"] == "disabled by OTEL_SDK_DISABLED" and health["otel"]["exporters"] == []
    assert set(health["sinks"]) == {"spool"} and health["otel_transport"] is None
    assert warnings_about(stderr, "OTEL_SDK_DISABLED") == (1 if how.startswith("output") else 0)


def test_sdk_disabled_false_exports(out: Path, grpc_receiver: GrpcReceiver):
    """The control: the same run with OTEL_SDK_DISABLED=false sends every span."""
    health, _, _ = run_workload(out, otlp_env(grpc_receiver, OTEL_SDK_DISABLED="false"))
    assert grpc_receiver.span_count() == 2 * EPOCHS + 1
    assert health["otel"]["sdk_disabled"] is False and health["otel"]["exporters"] == ["otlp", "otlp_metrics"]


def test_sdk_disabled_with_an_app_provider_the_app_gets_no_cirron_span(out: Path):
    _, stdout, _ = run_script_output(out, {"OTEL_SDK_DISABLED": "true"})
    assert "app provider spans: 0" in stdout
    _, stdout, _ = run_script_output(out, {})  # the control: enabled, the app's provider gets them
    assert f"app provider spans: {2 * EPOCHS + 1}" in stdout


def run_script_output(out: Path, env: dict[str, str]) -> tuple[int, str, str]:
    code = textwrap.dedent(APP_PROVIDER) + textwrap.dedent("""
        import cirron_otel as ci
        ci.profile(flush_interval=0.05, install_signal_handlers=False)
        for epoch in ci.epochs(range({epochs})):
            with ci.scope("step"):
                pass
    """).format(epochs=EPOCHS)
    run = run_script(code, env={"CIRRON_OUTPUT_DIR": str(out), **env}, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.returncode, run.stdout, run.stderr


# -- OTEL_TRACES_SAMPLER ---------------------------------------------------------------------------


def by_trace(spans: list[dict[str, Any]], key: str) -> dict[str, set[str]]:
    traces: dict[str, set[str]] = {}
    for span in spans:
        traces.setdefault(span["trace_id"], set()).add(span[key][:16])
    return traces


@pytest.mark.parametrize("trace_per", ["child", "session"])
@pytest.mark.parametrize(
    "sampler", ["always_off", "parentbased_always_off", "always_on", "parentbased_always_on"]
)
def test_always_on_and_off(out: Path, grpc_receiver: GrpcReceiver, sampler: str, trace_per: str):
    health, _, stderr = run_workload(
        out, otlp_env(grpc_receiver, OTEL_TRACES_SAMPLER=sampler), profile=f", trace_per={trace_per!r}"
    )
    spool, _ = spans_and_marks(out)
    assert len(spool) == 2 * EPOCHS + 1  # the spool always keeps everything
    on = sampler.endswith("always_on")
    assert grpc_receiver.span_count() == (len(spool) if on else 0)
    otlp = health["sinks"]["otlp"]
    assert (otlp["exported"], otlp["unsampled_spans"]) == ((len(spool), 0) if on else (0, len(spool)))
    otel = health["otel"]
    assert (otel["sampler"], otel["unsampled_spans"]) == (sampler, otlp["unsampled_spans"])
    assert "OTEL_TRACES_SAMPLER" not in stderr


@pytest.mark.parametrize("trace_per", ["child", "session"])
@pytest.mark.parametrize("sampler", ["traceidratio", "parentbased_traceidratio"])
def test_traceidratio_decides_each_trace_as_the_sdk_does_and_every_span_of_it_alike(
    out: Path, receiver_any: Receiver, sampler: str, trace_per: str
):
    rate = 0.3
    epochs = 150 if trace_per == "child" else 20
    env = otlp_env(receiver_any, OTEL_TRACES_SAMPLER=sampler, OTEL_TRACES_SAMPLER_ARG=str(rate))
    health, _, _ = run_workload(out, env, profile=f", trace_per={trace_per!r}", epochs=epochs)
    spool, _ = spans_and_marks(out)
    assert len(spool) == 2 * epochs + 1
    in_spool = by_trace(spool, "id")
    received = by_trace(receiver_any.spans(), "span_id")
    sdk = TraceIdRatioBased(rate)
    sampled = {t for t in in_spool if sdk.should_sample(None, int(t, 16), "x").decision.is_sampled()}
    assert set(received) == sampled  # the SDK's decision, trace by trace
    assert all(received[t] == in_spool[t] for t in sampled)  # every span of a sampled trace, none other
    if trace_per == "child":  # 151 traces: both outcomes occur (all one way: probability < 1e-20)
        assert 0 < len(sampled) < len(in_spool)
        # the session's own trace is sampled on its own too (the spans of the epochs are not in it)
        assert len(in_spool) == epochs + 1
    else:
        assert len(in_spool) == 1
    exported = sum(len(received[t]) for t in received)
    otlp = health["sinks"]["otlp"]
    assert (otlp["exported"], otlp["unsampled_spans"]) == (exported, len(spool) - exported)
    assert health["otel"]["sampler_ratio"] == rate


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver_any(request: pytest.FixtureRequest) -> Receiver:
    return request.getfixturevalue("grpc_receiver" if request.param == "grpc" else "http_receiver")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_TRACES_SAMPLER": "bogus"}, "OTEL_TRACES_SAMPLER"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
    ],
)
def test_an_invalid_sampler_warns_once_naming_the_variable_and_samples_everything(
    out: Path, grpc_receiver: GrpcReceiver, env: dict[str, str], variable: str
):
    twice = """
        ci.profile(flush_interval=0.05, install_signal_handlers=False)  # read again: not warned again
        ci.shutdown()
    """
    health, _, stderr = run_workload(out, otlp_env(grpc_receiver, **env), before=twice)
    assert warnings_about(stderr, variable) == 1, stderr
    assert grpc_receiver.span_count() == 2 * EPOCHS + 2  # both sessions, every epoch and step
    assert health["sinks"]["otlp"]["unsampled_spans"] == 0


def _start(out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, sampler: str) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    ci.profile(
        output_dir=str(out),
        otlp_endpoint=receiver.endpoint,
        flush_interval=0.05,
        install_signal_handlers=False,
        tracer_provider=None,
    )


@pytest.mark.parametrize(
    ("ours", "apps"),
    [("always_off", ALWAYS_ON), ("always_on", ALWAYS_OFF), ("parentbased_always_off", ALWAYS_ON)],
)
def test_under_an_apps_span_the_apps_sampler_wins(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch, ours: str, apps: Any
):
    _start(out, grpc_receiver, monkeypatch, ours)
    tracer = TracerProvider(sampler=apps).get_tracer("app")
    with tracer.start_as_current_span("request"), ci.scope("under_app"), ci.scope("deeper"):
        pass
    with ci.scope("cirron_root"), ci.scope("cirron_child"):
        pass
    ci.shutdown()
    names = {s["name"] for s in grpc_receiver.spans()}
    app_sampled = apps is ALWAYS_ON
    assert {"under_app", "deeper"} <= names if app_sampled else not names & {"under_app", "deeper"}
    ours_on = ours.endswith("always_on")
    assert (
        {"cirron_root", "cirron_child", "cirron.session"} <= names
        if ours_on
        else not names & {"cirron_root", "cirron_child", "cirron.session"}
    )
    in_spool = {s["name"] for s in spans_and_marks(out)[0]}
    assert in_spool >= {"under_app", "deeper", "cirron_root", "cirron_child"}  # the spool keeps all


@pytest.mark.parametrize("sampler", ["always_off", "always_on"])
def test_opentelemetry_sees_the_decision_of_a_trace_cirron_started(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch, sampler: str
):
    """The scope's span context, the traceparent it propagates and an app span started inside all
    carry the decision, as they would for an SDK root span."""
    _start(out, grpc_receiver, monkeypatch, sampler)
    memory = InMemorySpanExporter()
    provider = TracerProvider()  # the default sampler: parentbased_always_on
    provider.add_span_processor(SimpleSpanProcessor(memory))
    carrier: dict[str, str] = {}
    with ci.scope("root") as root:
        context = trace.get_current_span().get_span_context()
        propagate.inject(carrier)
        with provider.get_tracer("app").start_as_current_span("app_child"):
            pass
    ci.shutdown()
    on = sampler == "always_on"
    assert root.sampled is on and context.trace_flags.sampled is on
    assert carrier["traceparent"].endswith("-01" if on else "-00")
    assert len(memory.get_finished_spans()) == (1 if on else 0)
    assert ("root" in {s["name"] for s in grpc_receiver.spans()}) is on


@pytest.mark.parametrize("sampler", ["always_off", "always_on", "traceidratio"])
def test_a_forked_childs_session_shares_its_parents_decision(
    out: Path, grpc_receiver: GrpcReceiver, sampler: str
):
    code = """
        import os, cirron_otel as ci
        ci.profile(flush_interval=0.05, install_signal_handlers=False, trace_per="session")
        with ci.scope("parent_step"):
            pass
        pid = os.fork()
        if pid == 0:
            with ci.scope("child_step"):
                pass
            ci.shutdown()
            os._exit(0)
        os.waitpid(pid, 0)
    """
    for attempt in range(2 if sampler == "traceidratio" else 1):  # each run checked against the SDK
        out_n = out / str(attempt)
        env = otlp_env(
            grpc_receiver,
            OTEL_TRACES_SAMPLER=sampler,
            OTEL_TRACES_SAMPLER_ARG="0.5",
            CIRRON_OUTPUT_DIR=str(out_n),
        )
        grpc_receiver.clear()
        run = run_script(code, env=env, timeout=60)
        assert run.returncode == 0, run.stderr
        spool, _ = spans_and_marks(out_n)
        assert {s["name"] for s in spool} == {"parent_step", "child_step", "cirron.session"}
        assert len({s["trace_id"] for s in spool}) == 1  # the fork child's session is in the parent's trace
        rate = {"always_off": 0.0, "always_on": 1.0}.get(sampler, 0.5)
        sampled = TraceIdRatioBased(rate).should_sample(None, int(spool[0]["trace_id"], 16), "x").decision
        assert grpc_receiver.span_count() == (len(spool) if sampled.is_sampled() else 0)


# -- OTEL_TRACES_EXPORTER ----------------------------------------------------------------------------


def test_exporter_none_sends_nothing_and_the_spool_keeps_everything(out: Path, grpc_receiver: GrpcReceiver):
    health, _, _ = run_workload(out, otlp_env(grpc_receiver, OTEL_TRACES_EXPORTER="none"))
    assert grpc_receiver.span_count() == 0
    assert len(spans_and_marks(out)[0]) == 2 * EPOCHS + 1
    assert health["otel"]["export"] == "off" and set(health["sinks"]) == {"spool"}


def test_exporter_otlp_proto_http_picks_the_protocol(out: Path, http_receiver: HttpReceiver):
    """No protocol variable: `otlp` would be gRPC; the exporter's name says HTTP."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.endpoint, "OTEL_TRACES_EXPORTER": "otlp_proto_http"}
    run_workload(out, env)
    assert http_receiver.span_count() == 2 * EPOCHS + 1


def test_exporter_cirron_spool_alone_is_the_spool_once(out: Path, grpc_receiver: GrpcReceiver):
    health, _, _ = run_workload(out, otlp_env(grpc_receiver, OTEL_TRACES_EXPORTER="cirron_spool"))
    assert grpc_receiver.span_count() == 0
    spool, _ = spans_and_marks(out)
    assert len(spool) == 2 * EPOCHS + 1 and max(Counter(s["id"] for s in spool).values()) == 1
    assert set(health["sinks"]) == {"spool"}


def test_exporter_console_and_otlp(out: Path, grpc_receiver: GrpcReceiver):
    health, stdout, _ = run_workload(out, otlp_env(grpc_receiver, OTEL_TRACES_EXPORTER="console,otlp"))
    assert grpc_receiver.span_count() == 2 * EPOCHS + 1
    assert stdout.count('"name": "step"') == EPOCHS and stdout.count('"name": "cirron.session"') == 1
    assert health["otel"]["exporters"] == ["otlp", "otlp_metrics", "console"]
    assert health["sinks"]["console"]["exported"] == 2 * EPOCHS + 1


def test_exporter_console_is_sampled_too(out: Path):
    _, stdout, _ = run_workload(out, {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "always_off"})
    assert '"name"' not in stdout
    assert len(spans_and_marks(out)[0]) == 2 * EPOCHS + 1


def test_an_unknown_exporter_warns_naming_the_variable_and_the_others_still_work(
    out: Path, grpc_receiver: GrpcReceiver
):
    _, _, stderr = run_workload(out, otlp_env(grpc_receiver, OTEL_TRACES_EXPORTER="no_such_exporter,otlp"))
    assert warnings_about(stderr, "OTEL_TRACES_EXPORTER") == 1 and "'no_such_exporter'" in stderr
    assert grpc_receiver.span_count() == 2 * EPOCHS + 1


@pytest.mark.parametrize(
    ("exporter", "output", "sent"), [("otlp", "spool", False), ("none", "spool,otlp", True)]
)
def test_profile_output_wins_over_the_variable(
    out: Path, grpc_receiver: GrpcReceiver, exporter: str, output: str, sent: bool
):
    run_workload(out, otlp_env(grpc_receiver, OTEL_TRACES_EXPORTER=exporter), profile=f", output={output!r}")
    assert grpc_receiver.span_count() == (2 * EPOCHS + 1 if sent else 0)


# -- the cirron_spool exporter beside profile(): every record once -----------------------------------

SPOOL_EXPORTER_APP = """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from cirron_otel.exporters.otel_spool import SpoolSpanExporter
    exporter = SpoolSpanExporter()  # what OTEL_TRACES_EXPORTER=cirron_spool configures
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("app")
"""


@pytest.mark.parametrize("output", ["spool", "otlp"])
def test_the_cirron_spool_exporter_and_profile_write_each_record_once(out: Path, output: str):
    """profile() sends Cirron's spans through the app's provider, whose cirron_spool exporter
    writes the same spool: they are written once, by whichever writes this spool."""
    code = textwrap.dedent(SPOOL_EXPORTER_APP) + textwrap.dedent(f"""
        import cirron_otel as ci
        ci.profile(flush_interval=0.05, install_signal_handlers=False, output={output!r})
        with tracer.start_as_current_span("request"):
            for epoch in ci.epochs(range({EPOCHS})):
                with ci.scope("step"):
                    ci.mark("loss", 0.5)
        ci.shutdown()
        provider.shutdown()
        print("skipped:", exporter.skipped_spans)
    """)
    run = run_script(code, env={"CIRRON_OUTPUT_DIR": str(out)}, timeout=120)
    assert run.returncode == 0, run.stderr
    spans, marks = spans_and_marks(out)
    names = Counter(s["name"] for s in spans)
    assert names == {"request": 1, "epoch": EPOCHS, "step": EPOCHS, "cirron.session": 1}
    assert max(Counter(s["id"] for s in spans).values()) == 1
    assert len(marks) == EPOCHS and max(Counter(m["id"] for m in marks).values()) == 1
    # with its own spool, profile() wrote Cirron's spans; the exporter skipped its copies
    skipped = int(re.search(r"skipped: (\d+)", run.stdout).group(1))  # type: ignore[union-attr]
    assert skipped == (2 * EPOCHS + 1 if output == "spool" else 0)


def run_instrumented(tmp_path: Path, app_code: str) -> None:
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    if not instrument.exists():
        pytest.skip("opentelemetry-instrument is not installed (opentelemetry-distro, a test extra)")
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(app_code))
    out = tmp_path / "cirron"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CIRRON_"))}
    env.update(
        OTEL_TRACES_EXPORTER="cirron_spool",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        CIRRON_OUTPUT_DIR=str(out),
    )
    run = subprocess.run(
        [str(instrument), sys.executable, str(app)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr


INSTRUMENTED_APP = """
    from opentelemetry import trace
    import cirron_otel as ci
    ci.profile(flush_interval=30, install_signal_handlers=False{profile})
    with trace.get_tracer("app").start_as_current_span("request"):
        for epoch in ci.epochs(range({epochs})):
            with ci.scope("step"):
                ci.mark("loss", 0.5)
    {after}
"""


@pytest.mark.real_backend  # needs the opentelemetry-instrument entry point: a skip fails CI
def test_under_opentelemetry_instrument_with_cirron_spool_each_record_once(tmp_path: Path):
    # flush(): Cirron's spans reach the app's provider, and its cirron_spool exporter, before exit
    run_instrumented(tmp_path, INSTRUMENTED_APP.format(profile="", epochs=EPOCHS, after="ci.flush()"))
    spans, marks = spans_and_marks(tmp_path / "cirron")
    assert Counter(s["name"] for s in spans) == {
        "request": 1,
        "epoch": EPOCHS,
        "step": EPOCHS,
        "cirron.session": 1,
    }
    assert max(Counter(s["id"] for s in spans).values()) == 1 and len(marks) == EPOCHS


@pytest.mark.real_backend  # needs the opentelemetry-instrument entry point: a skip fails CI
def test_under_opentelemetry_instrument_cirron_spans_reach_the_provider_before_it_shuts_down(tmp_path: Path):
    """The instrument's provider is made after its exporter entry point imported cirron_otel, so
    its atexit shutdown runs before cirron_otel's exit hook: profile() hands it what was recorded
    first. (The session span, closed by the exit hook, is in the profiler's own spool only.)"""
    run_instrumented(tmp_path, INSTRUMENTED_APP.format(profile=", output='otlp'", epochs=EPOCHS, after=""))
    spans, marks = spans_and_marks(tmp_path / "cirron")  # written by the cirron_spool exporter alone
    assert Counter(s["name"] for s in spans) == {"request": 1, "epoch": EPOCHS, "step": EPOCHS}
    assert len(marks) == EPOCHS


# -- exit with the collector unreachable -------------------------------------------------------------

EXIT_SCRIPT = """
    import time
    import cirron_otel as ci
    ci.profile(install_signal_handlers=False)
    with ci.scope({name!r}):
        ci.mark("loss", 0.5)
    print(time.monotonic(), flush=True)  # the program's last line
"""
EXIT_MARGIN = 0.5  # the interpreter's own finalization, on a loaded 2-core machine


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
def test_an_unreachable_collector_does_not_hold_the_exit_and_the_next_run_delivers(
    out: Path, grpc_receiver: GrpcReceiver, http_receiver: HttpReceiver, proto: str
):
    receiver: Receiver = grpc_receiver if proto == "grpc" else http_receiver
    receiver.stop()  # its port now refuses connections
    env = otlp_env(receiver, CIRRON_OUTPUT_DIR=str(out))
    run = run_script(EXIT_SCRIPT.format(name="first_run"), env=env, timeout=60)
    ended = time.monotonic()
    assert run.returncode == 0, run.stderr
    last_line = float(run.stdout.split()[-1])
    assert ended - last_line < 1.0 + EXIT_MARGIN, f"exit took {ended - last_line:.2f} s"
    outbox = sorted((out / "otlp-outbox").glob("*.pb"))
    assert outbox, "what was not delivered must stay in the outbox"
    receiver.start()  # the collector is back: the next run delivers the first run's spans
    run = run_script(EXIT_SCRIPT.format(name="second_run"), env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    names = Counter(s["name"] for s in receiver.spans())
    assert names == {"first_run": 1, "second_run": 1, "cirron.session": 2}
    assert not list((out / "otlp-outbox").glob("*.pb"))


def test_without_an_outbox_the_exit_is_as_quick_and_the_loss_is_counted(
    out: Path, grpc_receiver: GrpcReceiver
):
    grpc_receiver.stop()
    code = """
        import atexit, json, time
        atexit.register(lambda: print(json.dumps(__import__("cirron_otel").health()["sinks"]["otlp"])))
        import cirron_otel as ci  # its exit hook runs before the one registered above
        ci.profile(output="otlp", install_signal_handlers=False)
        with ci.scope("lost"):
            pass
        print(time.monotonic(), flush=True)
    """
    run = run_script(code, env=otlp_env(grpc_receiver), timeout=60)
    ended = time.monotonic()
    assert run.returncode == 0, run.stderr
    last_line, otlp = run.stdout.splitlines()
    assert ended - float(last_line) < 1.0 + EXIT_MARGIN
    health = json.loads(otlp)
    assert (health["exported"], health["dropped"], health["pending"]) == (0, 2, 0)
    assert "not delivered at shutdown" in health["last_error"]


def test_an_explicit_shutdown_still_retries_until_its_timeout(out: Path, grpc_receiver: GrpcReceiver):
    """Only the exit gives up at the first failure: shutdown(timeout) keeps retrying (the collector
    comes back meanwhile)."""
    grpc_receiver.stop()
    ci.profile(
        output_dir=str(out),
        otlp_endpoint=grpc_receiver.endpoint,
        flush_interval=0.05,
        install_signal_handlers=False,
        tracer_provider=None,
    )
    with ci.scope("late"):
        pass
    back = threading.Timer(1.0, grpc_receiver.start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failed attempts warn
        assert not ci.flush(timeout=1)
        back.start()
        ci.shutdown(timeout=30)
    back.join()
    assert "late" in {s["name"] for s in grpc_receiver.spans()}
