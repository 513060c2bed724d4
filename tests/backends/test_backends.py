"""The OTLP export against real backends, and the compose stack's configuration.

- Jaeger v2 (built from its Go module by scripts/backends/build.sh, run on loopback with
  deploy/jaeger/config.yaml): the training demo, examples/train.py, exports to it over OTLP/gRPC
  and over OTLP/HTTP; Jaeger's HTTP query API must show the service, the session/epoch/batch
  structure with its parent links and session links, point marks as span logs, summary marks
  and scope attributes as tags, and the failed `validate` scope with error status and its
  exception. Every span and mark is also checked against the demo's own spool.
- The OpenTelemetry Collector built by ocb from deploy/collector/builder.yaml: it validates the
  repo's deploy/collector/config.yaml, and the demo's trace goes app -> collector -> Jaeger,
  fanned out as in compose (a second Jaeger stands in for Tempo).
- docker-compose.yml: accepted by `docker-compose config`, and its ports and endpoints agree
  with the collector, Jaeger, Tempo and Grafana configs, the README and the library's defaults.

Every test that needs a backend binary or docker-compose is marked `real_backend`: it skips,
saying why, where that is missing, and fails instead under CI=true (tests/conftest.py).

The demo runs with the default trace shape (trace_per="child"): the session span is a trace of
its own, and each epoch starts a trace linked to it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.backends import (
    COLLECTOR_CONFIG,
    COMPOSE_FILE,
    JAEGER_CONFIG,
    ROOT,
    BackendUnavailable,
    Collector,
    Jaeger,
    clean_env,
    compose_published,
    get_binary,
    host_port,
    load_config,
)
from tests.support.helpers import spans_and_marks

TRAIN = ROOT / "examples" / "train.py"
EPOCHS, BATCHES = 2, 3
SPANS_PER_EPOCH = 1 + 3 * BATCHES + 1  # epoch, BATCHES x (batch, forward, backward), validate
FAILING_EPOCH = 1  # examples/train.py raises in `validate` of epoch 1
PROTOCOLS = {"grpc": "grpc", "http": "http/protobuf"}
APT_DOCKER_COMPOSE = "apt-get install -y docker-compose"


# -- fixtures -------------------------------------------------------------------------------


def _binary(what: str) -> Path:
    try:
        return get_binary(what)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def jaeger_bin() -> Path:
    return _binary("jaeger")


@pytest.fixture(scope="session")
def otelcol_bin() -> Path:
    return _binary("collector")


@pytest.fixture(scope="session")
def jaeger(jaeger_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    """Jaeger v2 on 127.0.0.1 (free ports) with deploy/jaeger/config.yaml, for the whole run."""
    backend = Jaeger(jaeger_bin, tmp_path_factory.mktemp("jaeger"))
    backend.start()
    yield backend
    backend.stop()


@dataclasses.dataclass
class DemoRun:
    service: str
    protocol: str
    output_dir: Path
    stdout: str
    traces: list[dict[str, Any]]  # as Jaeger's /api/traces returns them
    spool_spans: list[dict[str, Any]]
    spool_marks: list[dict[str, Any]]


def _complete(traces: list[dict[str, Any]]) -> bool:
    return sorted(len(t["spans"]) for t in traces) == [1] + [SPANS_PER_EPOCH] * EPOCHS


def run_demo(tmp: Path, label: str, protocol: str, endpoint: str, jaeger: Jaeger) -> DemoRun:
    """examples/train.py with OTLP to `endpoint`, configured only through the standard
    OTEL_* variables; then its traces as `jaeger` shows them."""
    service = f"cirron-train-{label}-{uuid.uuid4().hex[:8]}"
    output_dir = tmp / "cirron"
    env = clean_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": service,
        }
    )
    r = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--epochs",
            str(EPOCHS),
            "--batches",
            str(BATCHES),
            "--output-dir",
            str(output_dir),
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"the demo failed:\n{r.stdout}\n{r.stderr}"
    assert not r.stderr.strip(), f"the demo wrote to stderr (export trouble?):\n{r.stderr}"
    outbox = output_dir / "otlp-outbox"
    assert outbox.is_dir() and not list(outbox.glob("*.pb")), "OTLP requests left undelivered in the outbox"
    traces = jaeger.wait_for_traces(service, _complete)
    spool_spans, spool_marks = spans_and_marks(output_dir)
    return DemoRun(service, protocol, output_dir, r.stdout, traces, spool_spans, spool_marks)


@pytest.fixture(scope="module", params=list(PROTOCOLS), ids=list(PROTOCOLS))
def direct_run(
    request: pytest.FixtureRequest, jaeger: Jaeger, tmp_path_factory: pytest.TempPathFactory
) -> DemoRun:
    """The demo exporting straight to Jaeger's OTLP receiver, once per protocol."""
    protocol = PROTOCOLS[request.param]
    endpoint = jaeger.otlp_grpc_endpoint if request.param == "grpc" else jaeger.otlp_http_endpoint
    tmp = tmp_path_factory.mktemp(f"demo-{request.param}")
    return run_demo(tmp, request.param, protocol, endpoint, jaeger)


@pytest.fixture(scope="module")
def stack(jaeger: Jaeger, jaeger_bin: Path, otelcol_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    """The compose pipeline on loopback: collector -> Jaeger, and -> a second Jaeger standing in
    for Tempo (both OTLP/gRPC receivers), with the config's default exporter list."""
    run_dir = tmp_path_factory.mktemp("stack")
    tempo = Jaeger(jaeger_bin, run_dir, name="tempo-stand-in")
    tempo.start()
    try:
        collector = Collector(otelcol_bin, run_dir, jaeger.otlp_grpc_target, tempo.otlp_grpc_target)
        collector.start()
        try:
            yield collector, tempo
        finally:
            collector.stop()
    finally:
        tempo.stop()


# -- reading Jaeger's traces ----------------------------------------------------------------


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span["tags"]}


def tag_types(span: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["type"] for t in span["tags"]}


def logs(span: dict[str, Any]) -> list[dict[str, Any]]:
    """Each log as {field: value}, plus "_ts" (µs)."""
    return [
        {**{f["key"]: f["value"] for f in log["fields"]}, "_ts": log["timestamp"]}
        for log in span.get("logs") or []
    ]


def refs(span: dict[str, Any], kind: str) -> list[tuple[str, str]]:
    return [(r["traceID"], r["spanID"]) for r in span.get("references") or [] if r["refType"] == kind]


@dataclasses.dataclass
class Shape:
    session: dict[str, Any]
    session_trace: dict[str, Any]
    epochs: list[dict[str, Any]]  # the epoch spans, by cirron.index
    epoch_traces: list[dict[str, Any]]  # their traces, same order
    by_id: dict[str, dict[str, Any]]  # Jaeger spanID -> span, every span

    def children(self, span: dict[str, Any], name: str | None = None) -> list[dict[str, Any]]:
        out = [
            s
            for s in self.by_id.values()
            if (span["traceID"], span["spanID"]) in refs(s, "CHILD_OF")
            and (name is None or s["operationName"] == name)
        ]
        return sorted(out, key=lambda s: s["startTime"])


def shape_of(run: DemoRun) -> Shape:
    sessions = [t for t in run.traces if len(t["spans"]) == 1]
    assert len(sessions) == 1, [len(t["spans"]) for t in run.traces]
    session_trace = sessions[0]
    session = session_trace["spans"][0]
    epoch_traces = [t for t in run.traces if t is not session_trace]
    by_id: dict[str, dict[str, Any]] = {}
    for trace in run.traces:
        ids = [s["spanID"] for s in trace["spans"]]
        assert len(ids) == len(set(ids)), f"duplicate spans in trace {trace['traceID']}"
        by_id.update({s["spanID"]: s for s in trace["spans"]})
    roots = []
    for trace in epoch_traces:
        rs = [s for s in trace["spans"] if not refs(s, "CHILD_OF")]
        assert [s["operationName"] for s in rs] == ["epoch"], f"trace {trace['traceID']}: roots {rs}"
        roots.append((tags(rs[0])["cirron.index"], rs[0], trace))
    roots.sort(key=lambda item: item[0])
    assert [i for i, _, _ in roots] == list(range(EPOCHS))
    return Shape(session, session_trace, [s for _, s, _ in roots], [t for _, _, t in roots], by_id)


def spool_by_id(run: DemoRun) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in run.spool_spans}


# -- the demo straight into Jaeger, over gRPC and over HTTP ----------------------------------


@pytest.mark.real_backend
def test_service_is_listed_with_the_process_resource(direct_run: DemoRun, jaeger: Jaeger):
    assert direct_run.service in jaeger.services()
    for trace in direct_run.traces:
        (process,) = trace["processes"].values()
        assert process["serviceName"] == direct_run.service
        ptags = {t["key"]: t["value"] for t in process["tags"]}
        assert ptags["telemetry.sdk.language"] == "python"
        assert (ptags["telemetry.sdk.name"], ptags["telemetry.distro.name"]) == ("cirron_otel", "cirron-otel")
        assert isinstance(ptags["process.pid"], int) and ptags["host.name"]
        assert ptags["cirron.rank"] == 0
        assert {s["processID"] for s in trace["spans"]} == set(trace["processes"])
        assert not trace.get("warnings"), trace["warnings"]


def check_structure_and_parent_links(run: DemoRun) -> None:
    shape = shape_of(run)
    spool = spool_by_id(run)
    # One Jaeger span per spool span, same ids (the OTel span id is the first half of
    # cirron.span_id), same trace ids, same names, same times.
    assert len(shape.by_id) == len(spool) == 1 + EPOCHS * SPANS_PER_EPOCH
    cirron_id = {sid: tags(s)["cirron.span_id"] for sid, s in shape.by_id.items()}
    assert sorted(cirron_id.values()) == sorted(spool)
    for sid, span in shape.by_id.items():
        rec = spool[cirron_id[sid]]
        assert sid == rec["id"][:16]
        assert span["traceID"] == rec["trace_id"]
        assert span["operationName"] == rec["name"]
        assert span["startTime"] == rec["start_ns"] // 1000
        assert abs(span["duration"] - (rec["end_ns"] - rec["start_ns"]) / 1000) <= 1
        assert tags(span)["span.kind"] == "internal"
        assert not span.get("warnings"), (span["operationName"], span["warnings"])
        # the Cirron parent is the CHILD_OF reference, or for a trace root the session link
        (parent,) = refs(span, "CHILD_OF") or refs(span, "FOLLOWS_FROM") or [(None, None)]
        expected = rec["parent_id"]
        assert (cirron_id[parent[1]] if parent[1] else None) == expected, span["operationName"]

    assert shape.session["operationName"] == "cirron.session"
    assert not shape.session.get("references")
    assert shape.session_trace["traceID"] not in {t["traceID"] for t in shape.epoch_traces}
    assert len({t["traceID"] for t in shape.epoch_traces}) == EPOCHS
    for epoch, trace in zip(shape.epochs, shape.epoch_traces, strict=True):
        assert {s["traceID"] for s in trace["spans"]} == {epoch["traceID"]}
        batches = shape.children(epoch, "batch")
        assert [tags(b)["cirron.index"] for b in batches] == list(range(BATCHES))
        assert [s["operationName"] for s in shape.children(epoch)] == ["batch"] * BATCHES + ["validate"]
        for batch in batches:
            assert [s["operationName"] for s in shape.children(batch)] == ["forward", "backward"]
            for step in shape.children(batch):
                assert not shape.children(step)
                assert "cirron.index" not in tags(step)
                # nested in time (µs rounding)
                assert batch["startTime"] <= step["startTime"]
                assert step["startTime"] + step["duration"] <= batch["startTime"] + batch["duration"] + 1
            assert epoch["startTime"] <= batch["startTime"]
            assert batch["startTime"] + batch["duration"] <= epoch["startTime"] + epoch["duration"] + 1


def check_session_links(run: DemoRun) -> None:
    shape = shape_of(run)
    session = shape.session
    for epoch in shape.epochs:
        # Jaeger renders the OTLP span link as a FOLLOWS_FROM reference into the session's trace
        assert refs(epoch, "FOLLOWS_FROM") == [(session["traceID"], session["spanID"])]
        assert refs(epoch, "CHILD_OF") == []
        assert tags(epoch)["cirron.session.id"] == tags(session)["cirron.span_id"]
    others = [s for s in shape.by_id.values() if s["operationName"] != "epoch"]
    assert all(not refs(s, "FOLLOWS_FROM") and "cirron.session.id" not in tags(s) for s in others)


def check_point_marks(run: DemoRun) -> None:
    shape = shape_of(run)
    point_marks = [m for m in run.spool_marks if m["kind"] == "point"]
    per_run = EPOCHS * BATCHES
    assert Counter(m["name"] for m in point_marks) == {"loss": per_run, "grad_norm": per_run, "lr": per_run}
    by_cirron_id = {tags(s)["cirron.span_id"]: s for s in shape.by_id.values()}
    seen = set()
    for mark in point_marks:
        span = by_cirron_id[mark["span_id"]]
        # loss and lr are marked in the batch scope, grad_norm inside backward
        where = {"loss": "batch", "lr": "batch", "grad_norm": "backward"}
        assert span["operationName"] == where[mark["name"]]
        (log,) = [entry for entry in logs(span) if entry.get("cirron.mark.id") == mark["id"]]
        assert log["event"] == mark["name"]
        assert log["cirron.mark.value"] == mark["value"] and isinstance(log["cirron.mark.value"], float)
        assert log["cirron.mark.kind"] == "point"
        assert log["_ts"] == mark["ts_ns"] // 1000
        assert span["startTime"] <= log["_ts"] <= span["startTime"] + span["duration"] + 1
        types = {f["key"]: f["type"] for lg in span["logs"] for f in lg["fields"]}
        assert types["cirron.mark.value"] == "float64"
        seen.add(mark["id"])
    # and no other logs anywhere but the exception
    all_logs = [(s["operationName"], entry) for s in shape.by_id.values() for entry in logs(s)]
    extra = [
        (name, entry)
        for name, entry in all_logs
        if entry.get("cirron.mark.id") not in seen and entry.get("event") != "exception"
    ]
    assert not extra
    assert len(all_logs) == len(point_marks) + 1


def check_summaries_and_attrs(run: DemoRun) -> None:
    shape = shape_of(run)
    summaries = [m for m in run.spool_marks if m["kind"] == "summary"]
    spool = spool_by_id(run)
    for epoch in shape.epochs:
        index = tags(epoch)["cirron.index"]
        expected = {
            f"cirron.summary.{m['name']}": m["value"]
            for m in summaries
            if spool[m["span_id"]]["name"] == "epoch" and spool[m["span_id"]]["index"] == index
        }
        names = {"cirron.summary.train_loss", "cirron.summary.val_loss"}
        if index == FAILING_EPOCH:  # its validation raised before val_loss was marked
            names.remove("cirron.summary.val_loss")
        assert set(expected) == names
        got = {k: v for k, v in tags(epoch).items() if k.startswith("cirron.summary.")}
        assert got == expected
        assert all(tag_types(epoch)[k] == "float64" for k in got)
        assert tag_types(epoch)["cirron.index"] == "int64"
        (validate,) = shape.children(epoch, "validate")
        assert tags(validate)["samples"] == 256 and tag_types(validate)["samples"] == "int64"
    # no summary tags anywhere else; session attrs as tags on the session span
    assert not [
        s
        for s in shape.by_id.values()
        if s["operationName"] != "epoch" and any(k.startswith("cirron.summary.") for k in tags(s))
    ]
    assert tags(shape.session)["model"] == "two-layer-tanh"
    assert tags(shape.session)["lr"] == 0.1


def check_error_scope(run: DemoRun) -> None:
    shape = shape_of(run)
    failed = [s for s in shape.by_id.values() if "otel.status_code" in tags(s) or tags(s).get("error")]
    assert [s["operationName"] for s in failed] == ["validate"]
    (span,) = failed
    assert span["traceID"] == shape.epochs[FAILING_EPOCH]["traceID"]
    t = tags(span)
    message = "validation set went missing (on purpose, for the demo)"
    assert t["otel.status_code"] == "ERROR"
    assert t["error"] is True  # Jaeger's own tag, from the status (the span has no `error` attribute)
    assert t["otel.status_description"] == message
    assert t["error.type"] == "FloatingPointError"
    assert "error.message" not in t  # the status description carries it
    assert t["thread.name"] == "MainThread" and isinstance(t["thread.id"], int)
    (exc,) = [entry for entry in logs(span) if entry.get("event") == "exception"]
    assert exc["exception.type"] == "FloatingPointError"
    assert exc["exception.message"] == message
    assert exc["exception.stacktrace"].startswith("Traceback (most recent call last):")
    assert "raise FloatingPointError" in exc["exception.stacktrace"]
    assert span["startTime"] <= exc["_ts"] <= span["startTime"] + span["duration"] + 1
    # the epoch it happened in is not itself an error (the demo catches the exception)
    assert "otel.status_code" not in tags(shape.epochs[FAILING_EPOCH])


@pytest.mark.real_backend
def test_session_epoch_batch_structure_and_parent_links(direct_run: DemoRun):
    check_structure_and_parent_links(direct_run)


@pytest.mark.real_backend
def test_epoch_traces_link_to_the_session(direct_run: DemoRun):
    check_session_links(direct_run)


@pytest.mark.real_backend
def test_point_marks_are_span_logs_with_their_values(direct_run: DemoRun):
    check_point_marks(direct_run)


@pytest.mark.real_backend
def test_summary_marks_and_scope_attrs_are_tags(direct_run: DemoRun):
    check_summaries_and_attrs(direct_run)


@pytest.mark.real_backend
def test_the_failed_validate_scope_has_error_status_and_an_exception_log(direct_run: DemoRun):
    check_error_scope(direct_run)


# -- the collector ----------------------------------------------------------------------------


@pytest.mark.real_backend
def test_collector_validates_the_repo_config(otelcol_bin: Path, tmp_path: Path):
    def validate(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(otelcol_bin), "validate", f"--config={config}"],
            cwd=ROOT,
            env=clean_env(env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    # as compose runs it (every ${env:...} at its default), and as the tests run it on loopback
    r = validate(COLLECTOR_CONFIG, {})
    assert r.returncode == 0, r.stderr
    loopback = {
        "COLLECTOR_LISTEN_HOST": "127.0.0.1",
        "JAEGER_OTLP_ENDPOINT": "127.0.0.1:14317",
        "COLLECTOR_TRACES_EXPORTERS": "[otlp_grpc/jaeger]",
    }
    r = validate(COLLECTOR_CONFIG, loopback)
    assert r.returncode == 0, r.stderr
    # control: validate does check components against this build
    broken = tmp_path / "config.yaml"
    broken.write_text(COLLECTOR_CONFIG.read_text().replace("otlp_grpc/tempo", "zipkin/tempo"))
    r = validate(broken, {})
    assert r.returncode != 0 and "zipkin" in r.stderr


@pytest.mark.real_backend
def test_collector_build_has_exactly_the_components_the_config_uses(otelcol_bin: Path):
    r = subprocess.run(
        [str(otelcol_bin), "components"], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert r.returncode == 0, r.stderr
    built = yaml.safe_load(r.stdout)
    config = load_config(COLLECTOR_CONFIG)
    for kind in ("receivers", "processors", "exporters", "extensions"):
        used = {name.split("/")[0] for name in config.get(kind) or {}}
        assert used == {c["name"] for c in built.get(kind) or []}, kind


@pytest.mark.real_backend
def test_jaeger_validates_the_repo_config(jaeger_bin: Path):
    r = subprocess.run(
        [str(jaeger_bin), "validate", f"--config={JAEGER_CONFIG}"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.real_backend
@pytest.mark.parametrize("label", list(PROTOCOLS))
def test_app_to_collector_to_jaeger_and_tempo(label: str, stack, jaeger: Jaeger, tmp_path: Path):
    collector, tempo = stack
    endpoint = collector.otlp_grpc_endpoint if label == "grpc" else collector.otlp_http_endpoint
    run = run_demo(tmp_path, f"via-collector-{label}", PROTOCOLS[label], endpoint, jaeger)
    assert run.service in jaeger.services()
    # the same checks as for the direct export
    check_structure_and_parent_links(run)
    check_session_links(run)
    check_point_marks(run)
    check_summaries_and_attrs(run)
    check_error_scope(run)
    # fanned out: the Tempo exporter got the very same traces
    copy = tempo.wait_for_traces(run.service, _complete)
    spans = {(s["traceID"], s["spanID"]) for t in run.traces for s in t["spans"]}
    assert {(s["traceID"], s["spanID"]) for t in copy for s in t["spans"]} == spans


# -- docker-compose.yml and the configs it mounts --------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.mark.real_backend
def test_docker_compose_config_accepts_the_file():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(f"docker-compose is not installed (Debian: {APT_DOCKER_COMPOSE})")
    r = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert set(resolved["services"]) == {
        "collector",
        "jaeger",
        "tempo-init",
        "tempo",
        "prometheus",
        "grafana",
    }
    for name, service in resolved["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("/"):  # a bind mount, made absolute by compose
                assert Path(source).exists(), f"{name} mounts missing {source}"
                assert Path(source).resolve().is_relative_to(ROOT / "deploy"), f"{name}: {source}"


def _config_path_in_container(service: dict[str, Any]) -> str:
    command = " ".join(service["command"])
    m = re.search(r"-?-config(?:\.file)?=(\S+)", command)
    assert m, command
    return m.group(1)


def test_ports_and_endpoints_agree_across_compose_and_configs():
    services = compose()["services"]
    collector_cfg = load_config(COLLECTOR_CONFIG)
    jaeger_cfg = load_config(JAEGER_CONFIG)
    tempo_cfg = yaml.safe_load((ROOT / "deploy/tempo/tempo.yaml").read_text())
    grafana = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/datasources.yaml").read_text())

    # each service mounts its repo config where its command reads it
    for name, source in (
        ("collector", "deploy/collector/config.yaml"),
        ("jaeger", "deploy/jaeger/config.yaml"),
        ("tempo", "deploy/tempo/tempo.yaml"),
    ):
        target = _config_path_in_container(services[name])
        assert f"./{source}:{target}:ro" in services[name]["volumes"], (name, services[name]["volumes"])

    # the app's one entry point: the collector's OTLP receivers, published on the same host ports
    otlp = collector_cfg["receivers"]["otlp"]["protocols"]
    c_grpc, c_http = host_port(otlp["grpc"]["endpoint"]), host_port(otlp["http"]["endpoint"])
    c_health = host_port(collector_cfg["extensions"]["health_check"]["endpoint"])
    assert c_grpc == ("0.0.0.0", 4317) and c_http == ("0.0.0.0", 4318) and c_health[0] == "0.0.0.0"
    assert compose_published(services["collector"]) == {4317: 4317, 4318: 4318, c_health[1]: c_health[1]}

    # collector -> jaeger and tempo over OTLP/gRPC, by compose service name, to their receivers
    exporters = collector_cfg["exporters"]
    pipeline = collector_cfg["service"]["pipelines"]["traces"]
    assert pipeline["exporters"] == ["otlp_grpc/jaeger", "otlp_grpc/tempo"]
    assert pipeline["receivers"] == ["otlp"]
    j_grpc = host_port(jaeger_cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    t_grpc = host_port(tempo_cfg["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    assert host_port(exporters["otlp_grpc/jaeger"]["endpoint"]) == ("jaeger", j_grpc[1])
    assert host_port(exporters["otlp_grpc/tempo"]["endpoint"]) == ("tempo", t_grpc[1])
    assert all(e["tls"]["insecure"] is True for e in exporters.values())
    assert set(services["collector"]["depends_on"]) >= {"jaeger", "tempo"}

    # Jaeger: UI/API published on its query port; its own OTLP ports stay inside compose (the
    # collector owns 4317/4318 on the host)
    j_query = host_port(jaeger_cfg["extensions"]["jaeger_query"]["http"]["endpoint"])
    assert j_query == ("0.0.0.0", 16686)
    assert compose_published(services["jaeger"]) == {16686: 16686}
    assert jaeger_cfg["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]

    # Tempo and Grafana: Grafana's data sources reach Tempo's and Jaeger's HTTP APIs
    t_http = tempo_cfg["server"]["http_listen_port"]
    assert compose_published(services["tempo"]) == {t_http: t_http} == {3200: 3200}
    urls = {d["type"]: d["url"] for d in grafana["datasources"]}
    assert host_port(urls["tempo"]) == ("tempo", t_http)
    assert host_port(urls["jaeger"]) == ("jaeger", j_query[1])
    assert compose_published(services["grafana"]) == {3000: 3000}

    # no two services publish the same host port
    published = [p for s in services.values() for p in compose_published(s)]
    assert len(published) == len(set(published))


def test_the_library_defaults_match_the_stack(monkeypatch: pytest.MonkeyPatch):
    from cirron_otel.exporters.otlp import GrpcTransport, HttpTransport

    from cirron_otel import _config

    published = compose_published(compose()["services"]["collector"])
    otlp = load_config(COLLECTOR_CONFIG)["receivers"]["otlp"]["protocols"]
    grpc_port, http_port = host_port(otlp["grpc"]["endpoint"])[1], host_port(otlp["http"]["endpoint"])[1]
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)

    # nothing set: the OTLP specification's defaults are the collector's published ports
    grpc = GrpcTransport(_config.otlp_transport_config("grpc", None))
    http = HttpTransport(_config.otlp_transport_config("http/protobuf", None))
    try:
        assert host_port(grpc.target) == ("localhost", 4317)
        assert host_port(http.url) == ("localhost", 4318)
    finally:
        grpc.shutdown()
        http.shutdown()
    assert published[4317] == grpc_port and published[4318] == http_port

    # the README's one variable turns OTLP on, over gRPC (the library's default protocol)
    settings = _config.resolve(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4317"})
    assert "otlp" in settings.outputs and "spool" in settings.outputs
    assert settings.otlp_protocol == "grpc"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4317")
    grpc = GrpcTransport(_config.otlp_transport_config("grpc", None))
    try:
        assert host_port(grpc.target) == ("localhost", grpc_port)
        assert grpc.config.insecure is True  # http:// means plaintext, as the collector serves it
    finally:
        grpc.shutdown()


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^(#+)[^\n]*{re.escape(title)}[^\n]*$", text, re.IGNORECASE | re.MULTILINE)
    assert m, f'README.md has no "{title}" section'
    level = len(m.group(1))
    end = re.search(rf"^#{{1,{level}}} ", text[m.end() :], re.MULTILINE)
    return text[m.end() : m.end() + end.start()] if end else text[m.end() :]


def test_readme_see_it_in_jaeger_and_grafana_matches_the_stack():
    section = _readme_section("see it in Jaeger and Grafana")
    services = compose()["services"]
    for needle in (
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317",
        "http://localhost:16686",
        "http://localhost:3000",
    ):
        assert needle in section, needle
    assert 4317 in compose_published(services["collector"])
    assert 16686 in compose_published(services["jaeger"])
    assert 3000 in compose_published(services["grafana"])
    published = {p for s in services.values() for p in compose_published(s)}
    for port in re.findall(r"localhost:(\d+)", section):
        assert int(port) in published, f"README names localhost:{port}, which compose does not publish"
