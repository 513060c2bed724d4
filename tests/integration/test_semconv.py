"""OpenTelemetry semantic conventions on exported spans.

Each test profiles against a real in-process OTLP receiver (gRPC, or both transports where
the encoding differs) and compares the decoded requests with the spool:

- `thread.name` beside `thread.id`, read once per thread (when its ring is made);
- `code.function.name`, `code.file.path`, `code.line.number` on scopes opened by the
  decorator, worked out once when decorating, over OTLP only (the spool is unchanged);
- the resource's `telemetry.sdk.*` name this package (its encoder made the spans), with
  `telemetry.distro.*`;
- a failed scope: status ERROR + `error.type`, without the spool's `error` / `error.message`
  attributes (the spool keeps them).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from cirron_otel.exporters.otel_spool import SpoolSpanExporter
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

import cirron_otel as ci
from tests.support.helpers import spans_and_marks
from tests.support.otlp import Receiver, start
from tests.support.otlp_receivers import GrpcReceiver, SpanDict


@pytest.fixture(autouse=True)
def _clean_env(clean_env: None) -> None:
    """No OTEL_*, CIRRON_* or rank variable of the calling environment leaks into these tests."""


Record = dict[str, Any]
STATUS_ERROR = 2
# the module (the package's `_decorate` attribute is the function that imports it)
decorate_module = importlib.import_module("cirron_otel._decorate")
pytestmark = pytest.mark.timeout(120)


def finish(out: Path, receiver: Receiver) -> tuple[dict[str, Record], dict[str, SpanDict]]:
    """Shut down; (spool spans by id, OTLP spans by spool id) once every spool span arrived."""
    ci.shutdown()
    spans, _ = spans_and_marks(out)
    received = {s["span_id"]: s for s in receiver.wait_for_spans(len(spans), timeout=10)}
    return {s["id"]: s for s in spans}, {s["id"]: received[s["id"][:16]] for s in spans}


def named(spans: dict[str, Record], name: str) -> list[Record]:
    return [s for s in spans.values() if s["name"] == name]


# -- thread.name -----------------------------------------------------------------------------


def test_thread_name_beside_thread_id_is_the_producing_threads(out: Path, receiver: Receiver):
    start(out, receiver)
    with ci.scope("on_main"):
        pass

    def work(tag: str) -> None:
        with ci.scope("in_thread", tag=tag):
            pass

    # one after the other: the second thread often gets the first one's ident (thread.id),
    # and its spans still carry its own name (the name travels with the ring, not the id)
    for tag in ("loader-0", "loader-1", "loader-2"):
        t = threading.Thread(target=work, args=(tag,), name=tag)
        t.start()
        t.join()
    spool, otlp = finish(out, receiver)
    for span in spool.values():
        attrs = otlp[span["id"]]["attributes"]
        assert attrs["thread.id"] == span["thread_id"]
        expected = span["attrs"].get("tag", threading.main_thread().name)
        assert attrs["thread.name"] == expected, span["name"]
        assert "thread.name" not in span["attrs"]  # the spool is unchanged
    assert len(named(spool, "in_thread")) == 3


def test_thread_name_is_read_once_when_the_thread_first_records(out: Path, grpc_receiver: GrpcReceiver):
    start(out, grpc_receiver)
    names = []

    def work() -> None:
        me = threading.current_thread()
        with ci.scope("before_rename"):
            pass
        me.name = "renamed"  # thread names rarely change: the first one read stays
        with ci.scope("after_rename"):
            pass
        names.append(me.name)

    t = threading.Thread(target=work, name="first-name")
    t.start()
    t.join()
    spool, otlp = finish(out, grpc_receiver)
    assert names == ["renamed"]
    for name in ("before_rename", "after_rename"):
        (span,) = named(spool, name)
        assert otlp[span["id"]]["attributes"]["thread.name"] == "first-name"


# -- code.* on decorated functions -------------------------------------------------------------


@ci.scope("sync_step", phase="train")
def sync_step(x: int) -> int:
    return x + 1


@ci.scope("async_step")
async def async_step(x: int) -> int:
    await asyncio.sleep(0)
    return x * 2


class Model:
    @ci.scope("forward")
    def forward(self, x: int) -> int:
        return x - 1


@ci.scope("failing_step")
def failing_step() -> None:
    raise KeyError("missing")


class Scorer:
    def __call__(self, x: int) -> int:
        return x


score = ci.scope("score")(Scorer())  # a callable object: its class's __call__


def line_of(text: str) -> int:
    """The line of this file holding `text` (the decorator line: where Python starts the function)."""
    lines = Path(__file__).read_text().splitlines()
    (found,) = [n for n, line in enumerate(lines, 1) if line.strip() == text]
    return found


def test_decorated_functions_carry_their_code_location(out: Path, receiver: Receiver):
    start(out, receiver)
    assert sync_step(1) == 2
    assert asyncio.run(async_step(3)) == 6
    assert Model().forward(5) == 4
    assert score(7) == 7
    with pytest.raises(KeyError):
        failing_step()
    with ci.scope("plain"):  # a with-block is not a function: no code location
        pass
    spool, otlp = finish(out, receiver)
    path = os.path.abspath(__file__)
    expected = {
        "sync_step": (f"{__name__}.sync_step", line_of('@ci.scope("sync_step", phase="train")')),
        "async_step": (f"{__name__}.async_step", line_of('@ci.scope("async_step")')),
        "forward": (f"{__name__}.Model.forward", line_of('@ci.scope("forward")')),
        "failing_step": (f"{__name__}.failing_step", line_of('@ci.scope("failing_step")')),
        "score": (f"{__name__}.Scorer.__call__", line_of("def __call__(self, x: int) -> int:")),
    }
    for name, (function, line) in expected.items():
        (span,) = named(spool, name)
        attrs = otlp[span["id"]]["attributes"]
        assert (attrs["code.function.name"], attrs["code.file.path"], attrs["code.line.number"]) == (
            function,
            path,
            line,
        ), name
        assert not any(key.startswith("code.") for key in span["attrs"]), name  # OTLP only
    assert named(spool, "sync_step")[0]["attrs"] == {"phase": "train"}
    for name in ("plain", "cirron.session"):
        (span,) = named(spool, name)
        assert not any(key.startswith("code.") for key in otlp[span["id"]]["attributes"]), name


def test_code_location_is_worked_out_once_when_decorating(
    out: Path, grpc_receiver: GrpcReceiver, monkeypatch: pytest.MonkeyPatch
):
    registered: list[tuple[Any, ...]] = []
    real = ci._native.code_location

    def counting(*where: Any) -> int:
        registered.append(where)
        return real(*where)

    monkeypatch.setattr(ci._native, "code_location", counting)

    def make() -> Any:
        @ci.scope("made")
        def made() -> None:
            pass

        return made

    functions = [make() for _ in range(3)]  # one location, decorated three times: registered once
    assert len(registered) <= 1

    def no_lookup_per_call(func: Any) -> Any:
        raise AssertionError("a call worked out its code location")

    monkeypatch.setattr(decorate_module, "code_location", no_lookup_per_call)
    start(out, grpc_receiver)
    for func in functions:
        func()
        func()
    spool, otlp = finish(out, grpc_receiver)
    made = named(spool, "made")
    assert len(made) == 6
    assert {otlp[s["id"]]["attributes"]["code.function.name"] for s in made} == {
        f"{__name__}.test_code_location_is_worked_out_once_when_decorating.<locals>.make.<locals>.made"
    }


# -- errors: status + error.type ---------------------------------------------------------------


def test_failed_scope_is_status_and_error_type_not_cirron_error_attrs(out: Path, receiver: Receiver):
    start(out, receiver)
    with pytest.raises(ValueError), ci.scope("raised", phase="eval"):
        raise ValueError("boom")
    with ci.scope("by_status"):
        trace.get_current_span().set_status(Status(StatusCode.ERROR, "bad input"))
    with ci.scope("user_error_attr", error="not-a-failure", **{"error.message": "mine"}):
        pass  # not failed: the scope's own attributes stay as they are
    spool, otlp = finish(out, receiver)

    (raised,) = named(spool, "raised")
    assert raised["attrs"] == {
        "phase": "eval",
        "error": True,
        "error.type": "ValueError",
        "error.message": "boom",
    }  # the spool keeps Cirron's attrs
    o = otlp[raised["id"]]
    assert o["status"] == {"code": STATUS_ERROR, "message": "boom"}
    assert {k: v for k, v in o["attributes"].items() if k.startswith("error")} == {"error.type": "ValueError"}
    assert o["attributes"]["phase"] == "eval"
    (exc,) = [e for e in o["events"] if e["name"] == "exception"]
    assert exc["attributes"]["exception.type"] == "ValueError"
    assert exc["attributes"]["exception.message"] == "boom"

    (by_status,) = named(spool, "by_status")
    assert by_status["attrs"] == {"error": True, "error.message": "bad input"}
    o = otlp[by_status["id"]]
    assert o["status"] == {"code": STATUS_ERROR, "message": "bad input"}
    assert not any(k.startswith("error") for k in o["attributes"])

    (user,) = named(spool, "user_error_attr")
    o = otlp[user["id"]]
    assert o["status"]["code"] != STATUS_ERROR
    assert (o["attributes"]["error"], o["attributes"]["error.message"]) == ("not-a-failure", "mine")


# -- resource: telemetry.sdk.* and telemetry.distro.* --------------------------------------------


def test_resource_names_this_package_as_what_encoded_the_spans(
    out: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
):
    # the SDK's own reserved name cannot come back through OTEL_RESOURCE_ATTRIBUTES either
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "telemetry.sdk.name=opentelemetry,team=ml")
    start(out, receiver)
    with ci.scope("work"):
        pass
    _, otlp = finish(out, receiver)
    for o in otlp.values():
        r = o["resource"]
        assert r["telemetry.sdk.name"] == "cirron_otel"
        assert r["telemetry.sdk.language"] == "python"
        assert r["telemetry.sdk.version"] == ci.__version__
        assert r["telemetry.distro.name"] == "cirron-otel"
        assert r["telemetry.distro.version"] == ci.__version__
        assert r["team"] == "ml"
        assert o["scope"] == {"name": "cirron_otel", "version": ci.__version__}


# -- through an application's TracerProvider, back into the spool ------------------------------


def test_through_a_tracer_provider_into_the_spool_exporter_the_spool_is_unchanged(out: Path, tmp_path: Path):
    """The spans an app's provider receives carry the conventions; `SpoolSpanExporter` turns
    them back into exactly the spool records (no thread.name / code.*; error attrs from the
    status and the exception event)."""
    again = tmp_path / "again"
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(SimpleSpanProcessor(SpoolSpanExporter(again)))
    ci.profile(
        output_dir=str(out),
        flush_interval=0.05,
        install_signal_handlers=False,
        output="spool",
        tracer_provider=provider,
    )
    sync_step(1)
    with contextlib.suppress(KeyError):
        failing_step()
    t = threading.Thread(target=sync_step, args=(2,), name="worker-7")
    t.start()
    t.join()
    ci.shutdown()
    provider.shutdown()
    spans, _ = spans_and_marks(out)
    back, _ = spans_and_marks(again)
    assert len(back) == len(spans) == 4
    seen = {s.name: s for s in memory.get_finished_spans() if s.name != "failing_step"}
    assert seen["sync_step"].attributes["code.function.name"] == f"{__name__}.sync_step"
    assert {s.attributes["thread.name"] for s in memory.get_finished_spans()} == {"MainThread", "worker-7"}
    (failed,) = [s for s in memory.get_finished_spans() if s.name == "failing_step"]
    assert failed.status.status_code is StatusCode.ERROR and failed.attributes["error.type"] == "KeyError"
    assert "error" not in failed.attributes and "error.message" not in failed.attributes
    by_id = {s["id"]: s for s in back}
    for span in spans:
        got = by_id[span["id"]]
        assert {**got, "mark_ids": None} == {**span, "mark_ids": None}, span["name"]
