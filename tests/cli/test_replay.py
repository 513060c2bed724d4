"""`cirron-otel replay`: the spool reaches a collector once, with the live mapping, transport,
configuration and error rules; an interrupted replay resumes without duplicates or gaps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from .conftest import TRAIN, cli, load_records, run_python

MANY_FILES = """
import sys, cirron_otel as ci
ci.profile(output_dir=sys.argv[1], install_signal_handlers=False, flush_interval=30)
for step in ci.batches(range(int(sys.argv[2]))):
    with ci.scope("forward"):
        ci.mark("loss", 1.0 / (step + 1))
    ci.flush()
ci.shutdown()
"""


def received_span_ids(receiver: Any) -> Counter[str]:
    return Counter(
        s.span_id.hex()
        for r in list(receiver.requests)
        for rs in r.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    )


def spool_span_ids(out: Path) -> Counter[str]:
    spans, _ = load_records(out)
    return Counter(s["id"][:16] for s in spans)


def received_points(receiver: Any) -> Counter[tuple[str, int, Any]]:
    """(metric name, time, value) of every data point a receiver got."""
    return Counter(
        (m.name, p.time_unix_nano, getattr(p, p.WhichOneof("value")))
        for r in list(receiver.metric_requests)
        for rm in r.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.sum.data_points
    )


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def many_files(tmp_path: Path) -> Path:
    out = tmp_path / "cirron"
    run_python(MANY_FILES, str(out), "40")
    assert len(list((out / "spool").glob("*.json"))) >= 40
    return out


def _protocol(receiver: Any) -> str:
    return "grpc" if type(receiver).__name__.startswith("Grpc") else "http/protobuf"


def test_replay_delivers_every_span_once_then_resumes_to_nothing(
    receiver: Any, train_spool: Path, tmp_path: Path
) -> None:
    state = tmp_path / "replay.state"
    args = [
        "replay",
        str(train_spool),
        "--endpoint",
        receiver.endpoint,
        "--protocol",
        _protocol(receiver),
        "--state",
        str(state),
        "--no-progress",
    ]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert received_span_ids(receiver) == spool_span_ids(train_spool)
    # the requests are exactly what `export --format otlp-json` writes (one mapping)
    target = tmp_path / "x.jsonl"
    assert cli("export", str(train_spool), "--format", "otlp-json", "-o", str(target)).exit_code == 0
    from google.protobuf import json_format

    exported = [json.loads(line) for line in target.read_text().splitlines()]
    sent = [json_format.MessageToDict(r, use_integers_for_enums=True) for r in receiver.requests]
    strip = _drop_instance_id
    assert [strip(_b64_ids(d)) for d in exported] == [strip(d) for d in sent]
    # a second run has nothing left to send
    before = len(receiver.requests)
    again = cli(*args)
    assert again.exit_code == 0 and len(receiver.requests) == before
    assert f"{sum(spool_span_ids(train_spool).values())} spans already sent" in again.stdout


def _b64_ids(doc: dict[str, Any]) -> dict[str, Any]:
    import base64

    def b64(h: str) -> str:
        return base64.b64encode(bytes.fromhex(h)).decode()

    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = b64(span[key])
                for link in span.get("links", []):
                    link["traceId"], link["spanId"] = b64(link["traceId"]), b64(link["spanId"])
    return doc


def _drop_instance_id(doc: dict[str, Any]) -> dict[str, Any]:
    # service.instance.id is the SDK's random per-process id (each command is a process)
    for rs in doc["resourceSpans"]:
        rs["resource"]["attributes"] = [
            a for a in rs["resource"]["attributes"] if a["key"] != "service.instance.id"
        ]
    return doc


def test_replay_honours_the_otel_environment(
    http_receiver: Any, train_spool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", http_receiver.endpoint)  # /v1/traces is added
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=run%2042")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "offline-run")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=lab")
    result = cli("replay", str(train_spool), "--state", str(tmp_path / "s"), "--no-progress")
    assert result.exit_code == 0, result.output
    assert http_receiver.headers[0]["x-tenant"] == "run 42"
    assert http_receiver.headers[0]["content-encoding"] == "gzip"
    spans = list(http_receiver.spans())
    assert {s["resource"]["service.name"] for s in spans} == {"offline-run"}
    assert {s["resource"]["deployment.environment"] for s in spans} == {"lab"}
    spool_spans, _ = load_records(train_spool)
    assert {(s["resource"]["process.pid"], s["resource"]["cirron.rank"]) for s in spans} == {
        (s["pid"], s["rank"]) for s in spool_spans
    }
    assert {s["resource"]["host.name"] for s in spans} == {"node-a"}  # from the session attrs


def test_retryable_failures_are_retried(grpc_receiver: Any, train_spool: Path, tmp_path: Path) -> None:
    grpc_receiver.fail_next(2, grpc.StatusCode.UNAVAILABLE)
    result = cli(
        "replay",
        str(train_spool),
        "--endpoint",
        grpc_receiver.endpoint,
        "--state",
        str(tmp_path / "s"),
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "2 failed attempts" in result.stdout
    assert received_span_ids(grpc_receiver) == spool_span_ids(train_spool)


def test_permanent_rejection_drops_that_request_only(
    grpc_receiver: Any, train_spool: Path, tmp_path: Path
) -> None:
    grpc_receiver.fail_next(1, grpc.StatusCode.INVALID_ARGUMENT)
    args = [
        "replay",
        str(train_spool),
        "--endpoint",
        grpc_receiver.endpoint,
        "--state",
        str(tmp_path / "s"),
        "--no-progress",
    ]
    result = cli(*args)
    assert result.exit_code == 1
    assert "rejected: gRPC INVALID_ARGUMENT" in result.stderr
    received = received_span_ids(grpc_receiver)
    expected = spool_span_ids(train_spool)
    assert received and received.keys() < expected.keys() and max(received.values()) == 1
    # as live: a permanent rejection is never retried, also not by the next run
    again = cli(*args)
    assert again.exit_code == 0 and received_span_ids(grpc_receiver) == received


def test_partly_rejected_request_is_recorded_with_its_rejected_count(
    grpc_receiver: Any, train_spool: Path, tmp_path: Path
) -> None:
    grpc_receiver.reject_spans_next(1, "too old")  # the first request may hold one span
    state = tmp_path / "s"
    args = ["replay", str(train_spool), "--endpoint", grpc_receiver.endpoint, "--state", str(state)]
    result = cli(*args, "--no-progress", "--json")
    assert "1 spans rejected: too old" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["spans_rejected"] == 1
    recorded = [json.loads(line) for line in state.read_text().splitlines()[1:]]
    partly = [e for e in recorded if "rejected_spans" in e]
    assert [e["rejected_spans"] for e in partly] == [1] and partly[0]["spans"] >= 1
    # answered for good: the next run sends nothing again
    sent = len(grpc_receiver.requests)
    again = cli(*args, "--no-progress")
    assert again.exit_code == 0 and len(grpc_receiver.requests) == sent


def test_unreachable_collector_gives_up_then_resumes(
    grpc_receiver: Any, train_spool: Path, tmp_path: Path
) -> None:
    state = tmp_path / "s"
    dead = cli(
        "replay",
        str(train_spool),
        "--endpoint",
        "http://127.0.0.1:9",
        "--retry-for",
        "0.5",
        "--state",
        str(state),
        "--no-progress",
    )
    assert dead.exit_code == 1 and "run again to resume" in dead.stderr
    result = cli(
        "replay",
        str(train_spool),
        "--endpoint",
        grpc_receiver.endpoint,
        "--state",
        str(state),
        "--no-progress",
    )
    assert result.exit_code == 0
    assert received_span_ids(grpc_receiver) == spool_span_ids(train_spool)


def test_interrupted_replay_resumes_nothing_twice_nothing_missing(
    grpc_receiver: Any, many_files: Path, tmp_path: Path
) -> None:
    grpc_receiver.delay = 0.05  # a slow collector: the replay is still running when interrupted
    state = tmp_path / "replay.state"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cirron_otel",
            "replay",
            str(many_files),
            "--endpoint",
            grpc_receiver.endpoint,
            "--state",
            str(state),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(grpc_receiver.requests) >= 5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    partial = received_span_ids(grpc_receiver)
    expected = spool_span_ids(many_files)
    assert 0 < sum(partial.values()) < sum(expected.values())
    # the metrics requests go with their file's traces: some were sent, not all
    points = received_points(grpc_receiver)
    _, marks = load_records(many_files)
    assert 0 < sum(points.values()) < len(marks)
    recorded = [json.loads(line) for line in state.read_text().splitlines()[1:]]
    traces = [e for e in recorded if not e["key"].startswith("metrics:")]
    assert sum(e["spans"] for e in traces) == sum(partial.values())  # every answer recorded
    assert sum(e["points"] for e in recorded if e not in traces) == sum(points.values())
    grpc_receiver.delay = 0.0
    result = cli(
        "replay",
        str(many_files),
        "--endpoint",
        grpc_receiver.endpoint,
        "--state",
        str(state),
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert received_span_ids(grpc_receiver) == expected  # every span exactly once
    # every mark's point exactly once, none missing
    assert received_points(grpc_receiver) == Counter(
        (MARK_PREFIX + m["name"], m["ts_ns"], m["value"]) for m in marks
    )


def test_dry_run_sends_nothing(grpc_receiver: Any, train_spool: Path, tmp_path: Path) -> None:
    result = cli("replay", str(train_spool), "--endpoint", grpc_receiver.endpoint, "--dry-run")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    total = sum(spool_span_ids(train_spool).values())
    assert lines[-1].startswith("dry run: ") and f"{total} spans" in lines[-1]
    assert all(".json#" in line for line in lines[:-1])
    time.sleep(0.2)
    assert grpc_receiver.requests == [] and not os.listdir(tmp_path)


def test_bad_protocol_is_a_usage_error(train_spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("replay", str(train_spool), "--protocol", "http/json").exit_code == 2
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    assert cli("replay", str(train_spool), "--dry-run").exit_code == 2


# -- the real Jaeger -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from ..support.backends import BackendUnavailable, Jaeger, get_binary

    try:
        binary = get_binary("jaeger")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    backend = Jaeger(binary, tmp_path_factory.mktemp("jaeger"))
    backend.start()
    yield backend
    backend.stop()


@pytest.mark.real_backend
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_replay_to_jaeger_looks_like_a_live_run(jaeger: Any, protocol: str, tmp_path: Path) -> None:
    out = tmp_path / "cirron"

    # Jaeger's query API cannot write NaN / inf log values as JSON (HTTP 500, live export alike):
    # this run records finite values only
    finite = TRAIN.replace('float("nan") if b == 1 else 2.0', "2.0")
    finite = finite.replace('ci.mark("inf", float("-inf"))', "")
    assert finite != TRAIN
    run_python(finite, str(out))
    spans, marks = load_records(out)
    service = f"replay-{protocol.replace('/', '-')}-{os.getpid()}"
    endpoint = jaeger.otlp_grpc_endpoint if protocol == "grpc" else jaeger.otlp_http_endpoint
    state = tmp_path / "s"
    args = [
        "replay",
        str(out),
        "--endpoint",
        endpoint,
        "--protocol",
        protocol,
        "--service-name",
        service,
        "--state",
        str(state),
        "--no-progress",
    ]
    assert cli(*args).exit_code == 0
    assert cli(*args).exit_code == 0  # resumed: nothing sent twice

    def complete(traces: list[dict[str, Any]]) -> bool:
        return sum(len(t["spans"]) for t in traces) >= len(spans)

    wait_for(lambda: service in jaeger.services(), timeout=30)  # before that, /api/traces answers 500
    traces = jaeger.wait_for_traces(service, complete)
    got = Counter(s["spanID"] for t in traces for s in t["spans"])
    assert got == Counter(s["id"][:16] for s in spans)  # each span once, none missing
    by_id = {s["spanID"]: s for t in traces for s in t["spans"]}
    spool = {s["id"][:16]: s for s in spans}
    for span_id, record in spool.items():
        span = by_id[span_id]
        assert span["operationName"] == record["name"]
        assert span["startTime"] == record["start_ns"] // 1000
        parents = [r["spanID"] for r in span.get("references", []) if r["refType"] == "CHILD_OF"]
        if record["parent_id"] and record["parent_id"][:16] in spool and parents:
            assert parents == [record["parent_id"][:16]]
    # point marks are span logs with their values; the failed scope is an error with an exception log
    losses = [m for m in marks if m["name"] == "loss"]
    for m in losses:
        logs = by_id[m["span_id"][:16]]["logs"]
        fields = [f for log in logs for f in log["fields"]]
        assert any(f["key"] == "cirron.mark.id" and f["value"] == m["id"] for f in fields)
    failed = next(s for s in spans if s["name"] == "validate")
    tags = {t["key"]: t["value"] for t in by_id[failed["id"][:16]]["tags"]}
    assert tags.get("error") is True and tags.get("error.type") == "ValueError"
    # each epoch is a trace of its own, linked to the session (trace_per="child", as live)
    epochs = [s for s in spans if s["name"] == "epoch"]
    assert len({by_id[e["id"][:16]]["traceID"] for e in epochs}) == len(epochs)


def test_marks_of_a_killed_run_on_spans_never_closed(grpc_receiver: Any, tmp_path: Path) -> None:
    out = tmp_path / "cirron"
    run_python(
        """
        import os, sys, cirron_otel as ci
        ci.profile(output_dir=sys.argv[1], install_signal_handlers=False)
        with ci.scope("done"):
            ci.mark("a", 1)
        scope = ci.scope("open")
        scope.__enter__()
        ci.mark("b", 2)
        ci.mark("c", 3)
        ci.flush()
        os._exit(0)   # killed: "open" and the session never close
    """,
        str(out),
    )
    result = cli(
        "replay",
        str(out),
        "--endpoint",
        grpc_receiver.endpoint,
        "--state",
        str(tmp_path / "s"),
        "--no-progress",
    )
    assert result.exit_code == 0
    assert "2 marks attach to spans the spool does not hold" in result.stderr
    assert [
        s.name
        for r in grpc_receiver.requests
        for rs in r.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ] == ["done"]


# -- marks as metrics ------------------------------------------------------------------------

MARK_PREFIX = "cirron.mark."
LIVE_METRICS = TRAIN.replace(
    "ci.profile(output_dir=sys.argv[1],", "ci.profile(output_dir=sys.argv[1], output='spool,otlp',"
).replace('ci.mark("lr", 0.1)', 'ci.mark("lr", 0.1)\nci.mark("warm", True)\nci.mark("steps", 7)')
assert LIVE_METRICS.count("output='spool,otlp'") == 1 and "warm" in LIVE_METRICS


def metric_points(receiver: Any) -> list[dict[str, Any]]:
    """Every mark data point a receiver got (the health metrics left out), as plain fields; also
    checks what the live encoder guarantees of each request: one Metric per name, a
    non-monotonic cumulative Sum, points ordered by (scope, rank, time)."""
    from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

    out = []
    for request in list(receiver.metric_requests):
        for rm in request.resource_metrics:
            resource = {
                kv.key: getattr(kv.value, kv.value.WhichOneof("value"))
                for kv in rm.resource.attributes
                if kv.key not in ("service.instance.id", "host.name")  # per process / not in the spool
            }
            for sm in rm.scope_metrics:
                names = [m.name for m in sm.metrics if m.name.startswith(MARK_PREFIX)]
                assert len(names) == len(set(names)), names
                for m in sm.metrics:
                    if not m.name.startswith(MARK_PREFIX):
                        continue
                    assert m.WhichOneof("data") == "sum" and not m.sum.is_monotonic
                    temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
                    assert m.sum.aggregation_temporality == temporality
                    order = []
                    for p in m.sum.data_points:
                        attrs = [
                            (kv.key, getattr(kv.value, kv.value.WhichOneof("value"))) for kv in p.attributes
                        ]
                        value = getattr(p, p.WhichOneof("value"))
                        (ex,) = p.exemplars
                        assert getattr(ex, ex.WhichOneof("value")) == value or value != value  # NaN
                        assert ex.time_unix_nano == p.time_unix_nano
                        order.append((attrs[0][1], attrs[1][1], p.time_unix_nano))
                        out.append(
                            {
                                "name": m.name,
                                "attributes": attrs,
                                "start": p.start_time_unix_nano,
                                "time": p.time_unix_nano,
                                "kind": p.WhichOneof("value"),
                                "value": repr(value),  # repr: NaN equals itself
                                "exemplar": (ex.trace_id.hex(), ex.span_id.hex(), ex.WhichOneof("value")),
                                "resource": resource,
                                "scope": (sm.scope.name, sm.scope.version),
                            }
                        )
                    assert order == sorted(order), m.name
    return sorted(out, key=lambda p: (p["name"], p["time"], repr(p["attributes"])))


def exported_spans(receiver: Any) -> dict[str, str]:
    """span id -> trace id of every span a receiver got."""
    return {
        s.span_id.hex(): s.trace_id.hex()
        for r in list(receiver.requests)
        for rs in r.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    }


def test_replayed_metric_points_equal_the_live_ones(
    grpc_receiver: Any, http_receiver: Any, tmp_path: Path
) -> None:
    """The strongest check: a run exported live (traces and metrics) to one receiver, its spool
    replayed to another; every mark's data point is the same, field by field, and its exemplar
    names the span each receiver got."""
    out = tmp_path / "cirron"
    run_python(
        LIVE_METRICS,
        str(out),
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint, "RANK": "2", "OTEL_SERVICE_NAME": "m"},
    )
    spans, marks = load_records(out)
    numeric = [m for m in marks if m["value_type"] != "string" and m["span_id"] != "root"]
    assert {m["name"] for m in numeric} >= {"lr", "warm", "steps", "loss", "grad_norm", "inf", "accuracy"}
    grpc_receiver.wait_for_spans(len(spans), timeout=20)
    grpc_receiver.wait_for_metric_points(len(numeric), MARK_PREFIX, timeout=20)
    live = metric_points(grpc_receiver)
    result = cli(
        "replay",
        str(out),
        "--endpoint",
        http_receiver.endpoint,
        "--protocol",
        "http/protobuf",
        "--service-name",
        "m",
        "--state",
        str(tmp_path / "s"),
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert f"sent {len(numeric)} metric points" in result.stdout
    replayed = metric_points(http_receiver)
    assert len(live) == len(numeric)
    assert replayed == live
    # the exemplars name the spans as each receiver got them (the replay's own ids)
    for receiver, points in ((grpc_receiver, live), (http_receiver, replayed)):
        ids = exported_spans(receiver)
        for p in points:
            trace_id, span_id, _ = p["exemplar"]
            assert ids[span_id] == trace_id, p
    # what the live mapping promises, spelled out on a few points
    by_name = {p["name"]: p for p in replayed}
    session = min(
        (s for s in spans if s["name"] == "cirron.session"), key=lambda s: s["start_ns"]
    )  # not the child's
    lr = by_name[MARK_PREFIX + "lr"]
    assert lr["attributes"] == [
        ("cirron.scope", "cirron.session"),
        ("cirron.rank", 2),
        ("cirron.session.id", session["id"]),
    ]
    assert lr["start"] == session["start_ns"] and lr["kind"] == "as_double"
    assert (
        by_name[MARK_PREFIX + "warm"]["value"] == "1.0" and by_name[MARK_PREFIX + "steps"]["kind"] == "as_int"
    )
    assert {p["value"] for p in replayed if p["name"] == MARK_PREFIX + "grad_norm"} == {"nan", "2.0"}
    assert by_name[MARK_PREFIX + "inf"]["value"] == "-inf"
    assert http_receiver.metric_requests and not any(
        m.name.startswith("cirron.health")
        for r in http_receiver.metric_requests
        for rm in r.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    )  # replay sends the marks' points, never the health metrics


def _numeric_points(out: Path) -> int:
    _, marks = load_records(out)
    return sum(1 for m in marks if m["value_type"] != "string" and m["span_id"] != "root")


@pytest.mark.parametrize("how", ["--no-metrics", "OTEL_METRICS_EXPORTER=none", "traces endpoint only"])
def test_metrics_turned_off_send_no_point(
    grpc_receiver: Any, train_spool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    args = ["replay", str(train_spool), "--state", str(tmp_path / "s"), "--no-progress"]
    if how == "--no-metrics":
        args += ["--endpoint", grpc_receiver.endpoint, "--no-metrics"]
    elif how == "OTEL_METRICS_EXPORTER=none":
        args += ["--endpoint", grpc_receiver.endpoint]
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    else:  # as profile(): the metrics' endpoint would be a default localhost nobody named
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", grpc_receiver.endpoint)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert received_span_ids(grpc_receiver) == spool_span_ids(train_spool)
    assert grpc_receiver.metric_requests == [] and "metric points" not in result.stdout
    # turned on again, the same state file sends the points, and only them
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    again = [a for a in args if a != "--no-metrics"] + ["--metrics", "--endpoint", grpc_receiver.endpoint]
    assert cli(*again).exit_code == 0
    assert received_span_ids(grpc_receiver) == spool_span_ids(train_spool)
    assert sum(received_points(grpc_receiver).values()) == _numeric_points(train_spool)


def test_metrics_go_to_the_metrics_endpoint_and_prefix_as_live(
    grpc_receiver: Any, http_receiver: Any, train_spool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", grpc_receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", http_receiver.endpoint + "/v1/metrics")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("CIRRON_METRICS_PREFIX", "run.")
    dry = cli("replay", str(train_spool), "--dry-run")
    assert dry.exit_code == 0 and grpc_receiver.metric_requests == []
    assert f"{_numeric_points(train_spool)} points to {http_receiver.endpoint}/v1/metrics" in dry.stdout
    assert any(line.startswith("metrics:") and " points, " in line for line in dry.stdout.splitlines())
    result = cli("replay", str(train_spool), "--state", str(tmp_path / "s"), "--no-progress", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["points_sent"] == _numeric_points(train_spool) and summary["points_rejected"] == 0
    assert received_span_ids(grpc_receiver) == spool_span_ids(train_spool)
    assert grpc_receiver.metric_requests == []
    names = {name for name, _, _ in received_points(http_receiver)}
    assert names and all(name.startswith("run.") for name in names)
    again = json.loads(cli("replay", str(train_spool), "--state", str(tmp_path / "s"), "--json").stdout)
    assert again["points_sent"] == 0 and again["points_skipped"] == summary["points_sent"]


@pytest.mark.parametrize("kind", ["grpc", "http/protobuf"])
def test_an_endpoint_without_metrics_gets_the_traces_alone(
    kind: str, train_spool: Path, tmp_path: Path
) -> None:
    """Jaeger's own OTLP port answers UNIMPLEMENTED / 404 for metrics: as live, metrics are off
    for the rest of the replay (one line on stderr), the traces go on, exit 0."""
    from ..support.otlp_receivers import GrpcReceiver, HttpReceiver

    receiver = GrpcReceiver() if kind == "grpc" else HttpReceiver()
    receiver.accept_metrics = False
    with receiver:
        result = cli(
            "replay",
            str(train_spool),
            "--endpoint",
            receiver.endpoint,
            "--protocol",
            kind,
            "--state",
            str(tmp_path / "s"),
            "--no-progress",
        )
        assert result.exit_code == 0, result.output
        assert received_span_ids(receiver) == spool_span_ids(train_spool)
        assert receiver.metric_requests == []
        if kind == "http/protobuf":
            assert receiver.metric_refusals == 1  # nothing more was tried after the first answer
    lines = [line for line in result.stderr.splitlines() if "does not take OTLP metrics" in line]
    assert len(lines) == 1, result.stderr
    assert f"{_numeric_points(train_spool)} points not sent" in lines[0]


def test_metrics_requests_respect_the_request_size_limit(train_spool: Path) -> None:
    """As live (`mpoints_encode`): cut between points, one Metric per name in each request."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from cirron_otel.cli.otlp_map import iter_parts

    def metric_parts(max_bytes: int | None) -> list[Any]:
        args = {"metrics_prefix": MARK_PREFIX, "max_request_bytes": max_bytes}
        return [p for _, p in iter_parts(train_spool, args) if p.signal == "metrics"]

    whole, small = metric_parts(None), metric_parts(1500)
    assert len(small) > len(whole) and all(len(p.data) <= 1500 for p in small)
    assert sum(p.points for p in small) == sum(p.points for p in whole) == _numeric_points(train_spool)

    def points(parts: list[Any]) -> list[Any]:
        out = []
        for p in parts:
            request = ExportMetricsServiceRequest.FromString(p.data)
            (metrics,) = [sm.metrics for rm in request.resource_metrics for sm in rm.scope_metrics]
            assert len({m.name for m in metrics}) == len(metrics)
            assert sum(len(m.sum.data_points) for m in metrics) == p.points
            out += [(m.name, dp.SerializeToString()) for m in metrics for dp in m.sum.data_points]
        return out

    assert points(small) == points(whole)  # the same points, in the same order


# -- weight / gradient snapshots ---------------------------------------------------------------

# A real torch model, 2 epochs, snapshots="stats", two frozen parameters holding inf / -inf /
# NaN (the statistics' non-finite path: a tensor with finite elements, and one with none). The
# marks after each optimizer step are on the epoch span, beside its snapshots. flush_interval=30:
# exports happen only at ci.flush() and shutdown, so the live order of an epoch span's events is
# fixed: epoch 0's marks are flushed before its snapshots are taken; epoch 1's go in the export
# that takes its snapshots, after them.
SNAPSHOT_RUN = """
import sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import cirron_otel as ci

ci.profile(output_dir=sys.argv[1], output="spool,otlp", snapshots="stats", install_signal_handlers=False,
           flush_interval=30)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
model.diverged = nn.Parameter(torch.tensor([1.0, float("inf"), -2.0, 0.5]), requires_grad=False)
model.dead = nn.Parameter(torch.tensor([float("-inf"), float("nan")]), requires_grad=False)
ci.watch(model)
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
loader = DataLoader(TensorDataset(torch.randn(6, 4), torch.randn(6, 1)), batch_size=2)
for epoch in range(2):
    for x, y in loader:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        ci.mark("loss", loss.item())
    if epoch == 0:
        ci.flush()
ci.shutdown()
"""
PER_EPOCH = 10  # 6 weights (2 frozen), 4 gradients


def _require_torch() -> None:
    if os.environ.get("CIRRON_REQUIRE_TORCH") != "1":  # .ci/run installs torch: a skip would hide a failure
        pytest.importorskip("torch", reason="PyTorch is not installed (not a test dependency)")


def _any(av: Any) -> str:
    """An AnyValue as text: its kind and value (NaN equal to itself)."""
    kind = av.WhichOneof("value")
    if kind == "array_value":
        return "[" + ", ".join(_any(v) for v in av.array_value.values) + "]"
    return f"{kind}:{getattr(av, kind)!r}"


Event = tuple[int, str, int, list[tuple[str, str]]]  # time, name, dropped attributes, attributes


def span_events(receiver: Any) -> dict[str, tuple[str, int, list[Event]]]:
    """span id -> (name, dropped events, events), each event with every field it was sent with."""
    return {
        s.span_id.hex(): (
            s.name,
            s.dropped_events_count,
            [
                (
                    e.time_unix_nano,
                    e.name,
                    e.dropped_attributes_count,
                    [(a.key, _any(a.value)) for a in e.attributes],
                )
                for e in s.events
            ],
        )
        for r in list(receiver.requests)
        for rs in r.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    }


@pytest.mark.parametrize("event_limit", [None, 8], ids=["all-events", "event-limit-8"])
def test_replayed_snapshot_events_equal_the_live_ones(
    grpc_receiver: Any,
    http_receiver: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    event_limit: int | None,
) -> None:
    """A torch run exported live to one receiver, its spool replayed to another: every span's
    events, the `cirron.snapshot` ones among them, are the same field by field (times,
    attributes with their non-finite statistics, order among the marks' events, what the event
    limit drops); a second replay sends nothing (resume is per request, snapshots included)."""
    _require_torch()
    out = tmp_path / "cirron"
    if event_limit is not None:
        monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", str(event_limit))  # replay reads it as profile()
    run_python(
        SNAPSHOT_RUN, str(out), env={"OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint}, timeout=180
    )
    spans, marks = load_records(out)
    docs = [json.loads(path.read_bytes()) for path in sorted((out / "spool").glob("*.json"))]
    records = [r for doc in docs for r in doc["snapshots"]]
    epochs = sorted((s for s in spans if s["name"] == "epoch"), key=lambda s: s["index"])
    assert len(epochs) == 2 and len(records) == 2 * PER_EPOCH
    assert {m["span_id"] for m in marks if m["name"] == "loss"} == {e["id"] for e in epochs}
    assert any(r["stats"].get("nonfinite") for r in records)  # the spool's null + nonfinite form
    grpc_receiver.wait_for_spans(len(spans), timeout=20)
    args = ["replay", str(out), "--endpoint", http_receiver.endpoint, "--protocol", "http/protobuf"]
    args += ["--state", str(tmp_path / "s"), "--no-progress", "--no-metrics"]
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["unsent_snapshots"] == 0
    live, replayed = span_events(grpc_receiver), span_events(http_receiver)
    assert replayed == live
    # what live sent, spelled out on the epoch spans
    whole = 3 + PER_EPOCH
    kept = whole if event_limit is None else event_limit
    for epoch in epochs:
        _, dropped, events = live[epoch["id"][:16]]
        assert (len(events), dropped) == (kept, whole - kept)
        names = ["loss"] * 3 + ["cirron.snapshot"] * PER_EPOCH
        if epoch["index"] == 1:
            names = names[3:] + names[:3]  # its marks went in the export that took its snapshots
        assert [e[1] for e in events] == names[whole - kept :]  # the oldest dropped, as the SDK
        sent = [e for e in events if e[1] == "cirron.snapshot"]
        ours = [r for r in records if r["span_id"] == epoch["id"]][PER_EPOCH - len(sent) :]  # the newest kept
        assert [(e[0], e[3][0]) for e in sent] == [
            (r["ts_ns"], ("cirron.snapshot.id", f"string_value:{r['id']!r}")) for r in ours
        ]
    if event_limit is None:
        # the statistics' non-finite values as live sends them (the doubles themselves)
        attrs = {
            dict(e[3])["cirron.snapshot.tensor_name"]: {
                k.removeprefix("cirron.snapshot."): v for k, v in e[3]
            }
            for _, _, events in live.values()
            for e in events
            if e[1] == "cirron.snapshot"
        }
        diverged, dead = attrs["string_value:'diverged'"], attrs["string_value:'dead'"]
        stats = ("mean", "std", "min", "max", "nonfinite_count", "finite.count")
        assert [diverged[k] for k in stats] == [
            "double_value:inf",
            "double_value:nan",
            "double_value:-2.0",
            "double_value:inf",
            "int_value:1",
            "int_value:3",
        ]
        assert "finite.histogram.bins" in diverged and "histogram.bins" not in diverged
        assert [dead[k] for k in stats] == ["double_value:nan"] * 4 + ["int_value:2", "int_value:0"]
    # resumed: the state file holds every request, nothing goes twice
    before = len(http_receiver.requests)
    again = cli(*args)
    assert again.exit_code == 0 and len(http_receiver.requests) == before


def test_snapshots_whose_span_is_not_sent_are_counted_not_sent(grpc_receiver: Any, tmp_path: Path) -> None:
    """As live: no event for a snapshot taken after its span closed (capture_epoch's rule), nor
    for one whose span never closed (a killed run); replay counts them and says so."""
    out = tmp_path / "cirron"
    run_python(
        """
        import os, sys, types
        import numpy as np
        import cirron_otel as ci
        from cirron_otel._snapshots import capture_epoch

        ci.profile(output_dir=sys.argv[1], snapshots="stats", install_signal_handlers=False)
        model = types.SimpleNamespace(weights=[np.ones(3, dtype=np.float32), np.arange(4.0)])
        with ci.scope("epoch", index=0) as closed:
            pass
        capture_epoch(model, closed)   # after its span closed
        with ci.scope("epoch", index=1) as epoch:
            capture_epoch(model, epoch)   # the control: sent
        never = ci.scope("epoch", index=2)
        never.__enter__()
        capture_epoch(model, never)   # its span never closes
        ci.flush()
        os._exit(0)   # killed
    """,
        str(out),
    )
    result = cli(
        "replay", str(out), "--endpoint", grpc_receiver.endpoint, "--state", str(tmp_path / "s"),
        "--no-progress", "--no-metrics", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["unsent_snapshots"] == 4
    assert "4 snapshots attach to spans the spool does not hold, or were taken after" in result.stderr
    events = {
        s["attributes"]["cirron.index"]: [e["name"] for e in s["events"]] for s in grpc_receiver.spans()
    }
    assert events == {0: [], 1: ["cirron.snapshot"] * 2}
