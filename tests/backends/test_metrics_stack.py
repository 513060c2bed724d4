"""Marks as metrics, the stack part (issue 11): collector -> Prometheus -> the Grafana dashboard.

The library's metrics encoder does not exist yet. These tests send what README.md, "Marks as
metrics", specifies it must send (hand-built OTLP ExportMetricsServiceRequests over gRPC, as
the native encoder will send them: a point per mark, each with an exemplar naming its span, and
the health metrics) and check the rest of the way against real backends on loopback:

- Prometheus, built from its Go module by scripts/backends/build.sh at the compose image's
  version, run with deploy/prometheus/prometheus.yml and the flags docker-compose.yml gives it;
- the collector built from deploy/collector/builder.yaml, with deploy/collector/config.yaml
  (its metrics pipeline exports to that Prometheus).

Checked through Prometheus's HTTP API: every series exists under the documented name with
exactly the documented labels, every value and timestamp is the one sent (raw samples and
`query_range`), and that `query_exemplars` returns each point's trace id and
span id. Every PromQL expression of the "Cirron run" dashboard is run, with its variables set,
and must return data; each variable query must list what was sent. Also pinned: why a mark is
a non-monotonic Sum and not a Gauge (the marks as Gauges, through the collector or straight to
Prometheus, arrive without their exemplars: the control of the exemplar check), the spec's shape
sent straight to Prometheus, and what Prometheus does with two points in one millisecond and
with a late point.

Without Prometheus, the Grafana provisioning is checked for structure only (Grafana is not
built here): the dashboard parses, its queries name only metrics of the README's table, and the
data source uids it and the exemplar links use are provisioned.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2

from tests.support.backends import (
    COMPOSE_FILE,
    HOST,
    ROOT,
    BackendUnavailable,
    Collector,
    Prometheus,
    get_binary,
)

GRAFANA = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD = GRAFANA / "dashboards" / "cirron-run.json"
DATASOURCES = GRAFANA / "datasources" / "datasources.yaml"
README = ROOT / "README.md"

# The spec (README.md, "Marks as metrics"), as this test sends and reads it.
MARK_PREFIX = "cirron.mark."  # the default of profile(metrics_prefix=...)
PROM_MARK_PREFIX = "cirron_mark_"
SCOPE_ATTR, RANK_ATTR, RUN_ATTR, SINK_ATTR = "cirron.scope", "cirron.rank", "cirron.session.id", "cirron.sink"
MARK_LABELS = {"__name__", "job", "service_name", "cirron_scope", "cirron_rank", "cirron_session_id"}
HEALTH_LABELS = {"__name__", "job", "service_name", "cirron_rank", "cirron_session_id"}
# the dashboard's variables, as Grafana substitutes them for "All"
ALL = ".+"


def _binary(what: str) -> Path:
    try:
        return get_binary(what)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def compose_prometheus_flags() -> list[str]:
    service = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["prometheus"]
    return [str(f) for f in service["command"]]


def prometheus_name(otlp_name: str) -> str:
    """The README's rule for a gauge without unit: the name cut at every character outside
    [a-zA-Z0-9:] (`_` included), the pieces joined with `_`."""
    return "_".join(t for t in re.split(r"[^a-zA-Z0-9:]+", otlp_name) if t)


# -- what the encoder is to send ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    ts_ns: int
    value: float | int  # an int is sent as_int, a float as_double
    trace_id: bytes  # the exemplar: the span of the scope the mark attached to
    span_id: bytes


@dataclasses.dataclass
class MarkSeries:
    """The points of one mark name in one scope, of one run and rank: one Prometheus series."""

    mark: str
    scope: str
    points: list[Point]

    @property
    def otlp_name(self) -> str:
        return MARK_PREFIX + self.mark

    @property
    def prom_name(self) -> str:
        return prometheus_name(self.otlp_name)


@dataclasses.dataclass
class Run:
    """One profiled process (a session): its resource and what its marks and health made."""

    service: str
    session_id: str  # 32 hex, the cirron.session.id of its spans
    rank: int
    marks: list[MarkSeries]
    start_ns: int
    health_ts_ns: list[int]

    def labels(self) -> dict[str, str]:
        return {
            "job": self.service,
            "service_name": self.service,
            "cirron_rank": str(self.rank),
            "cirron_session_id": self.session_id,
        }

    # health values at each of health_ts_ns: counters grow, the gauges move
    def recorded(self, i: int) -> int:
        return 100 * (i + 1)

    def written(self, sink: str, i: int) -> int:
        return 100 * (i + 1) - (3 * i if sink == "otlp" else 0)

    def dropped(self, sink: str, i: int) -> int:
        return 3 * i if sink == "otlp" else 0

    def ring_fill(self, i: int) -> float:
        return [0.0, 0.125, 0.8125, 0.0625][i % 4]

    def outbox_bytes(self, i: int) -> int:
        return [0, 65536, 1048576, 0][i % 4]


SINKS = ("spool", "otlp")


def _ms(ns: int) -> int:
    return ns // 1_000_000


def make_run(service: str, rank: int, t0_ns: int, n: int) -> Run:
    """n batches one second apart from t0 (whole seconds, so query_range steps hit the samples):
    loss, lr, grad_norm (with inf and NaN), samples (an int) and clipped (a bool as 0/1) in each
    `batch` scope, and "val/top-1  acc_" (to check the naming rule) in one `validate` scope at the end."""
    batches = [(secrets.token_bytes(16), secrets.token_bytes(8)) for _ in range(n)]
    grad = [1.5, math.inf, 0.25, math.nan, 3.0e-9, -math.inf]

    def series(mark: str, value: Any) -> MarkSeries:
        return MarkSeries(
            mark,
            "batch",
            [Point(t0_ns + i * 1_000_000_000 + 137_000, value(i), *batches[i]) for i in range(n)],
        )

    marks = [
        series("loss", lambda i: 2.302585092994046 / (i + 1) + 1e-12 * i),
        series("lr", lambda i: 3e-4 * 0.95**i),
        series("grad_norm", lambda i: grad[i % len(grad)]),
        series("samples", lambda i: 256 * (i + 1) + 9_007_199_254_000_000),  # an int below 2**53
        series("clipped", lambda i: float(i % 2)),
    ]
    val_trace, val_span = secrets.token_bytes(16), secrets.token_bytes(8)
    marks.append(
        MarkSeries(
            "val/top-1  acc_",
            "validate",
            [Point(t0_ns + n * 1_000_000_000, 0.6931471805599453, val_trace, val_span)],
        )
    )
    return Run(
        service,
        secrets.token_hex(16),
        rank,
        marks,
        t0_ns - 5_000_000_000,
        [t0_ns + i * 1_000_000_000 for i in range(n)],
    )


def _kv(key: str, value: str | int | float) -> common_pb2.KeyValue:
    if isinstance(value, str):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(double_value=value))


def _number_point(
    ts_ns: int,
    value: float | int,
    attrs: list[common_pb2.KeyValue],
    start_ns: int = 0,
    exemplar: tuple[bytes, bytes] | None = None,
) -> metrics_pb2.NumberDataPoint:
    point = metrics_pb2.NumberDataPoint(time_unix_nano=ts_ns, start_time_unix_nano=start_ns, attributes=attrs)
    if isinstance(value, int):
        point.as_int = value
    else:
        point.as_double = value
    if exemplar is not None:
        ex = point.exemplars.add(time_unix_nano=ts_ns, trace_id=exemplar[0], span_id=exemplar[1])
        if isinstance(value, int):
            ex.as_int = value
        else:
            ex.as_double = value
    return point


def metrics_request(
    run: Run, marks: bool = True, health: bool = True, marks_as: str = "sum"
) -> metrics_service_pb2.ExportMetricsServiceRequest:
    """The ExportMetricsServiceRequest of `run` as the spec has it: the traces' resource and
    scope; each mark name and scope a non-monotonic cumulative Sum (no unit, start time = the
    session's start) with one point per mark and its exemplar; the health as cumulative
    monotonic Sums and Gauges. `marks_as="gauge"`: the marks as Gauges instead (the controls)."""
    resource = resource_pb2.Resource(
        attributes=[
            _kv("service.name", run.service),
            _kv("process.pid", os.getpid()),
            _kv("host.name", socket.gethostname()),
            _kv(RANK_ATTR, run.rank),
            _kv("telemetry.sdk.name", "cirron_otel"),
            _kv("telemetry.sdk.language", "python"),
        ]
    )
    scope_metrics = metrics_pb2.ScopeMetrics(
        scope=common_pb2.InstrumentationScope(name="cirron_otel", version="0")
    )
    common = [_kv(RANK_ATTR, run.rank), _kv(RUN_ATTR, run.session_id)]
    if marks:
        for s in run.marks:
            attrs = [_kv(SCOPE_ATTR, s.scope), *common]
            start = run.start_ns if marks_as == "sum" else 0
            points = [
                _number_point(p.ts_ns, p.value, attrs, start_ns=start, exemplar=(p.trace_id, p.span_id))
                for p in s.points
            ]
            if marks_as == "sum":
                scope_metrics.metrics.append(
                    metrics_pb2.Metric(
                        name=s.otlp_name,
                        sum=metrics_pb2.Sum(
                            aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE,
                            is_monotonic=False,
                            data_points=points,
                        ),
                    )
                )
            else:
                scope_metrics.metrics.append(
                    metrics_pb2.Metric(name=s.otlp_name, gauge=metrics_pb2.Gauge(data_points=points))
                )
    if health:

        def counter(name: str, value: Any, sink: str | None = None) -> metrics_pb2.Metric:
            attrs = [*common, *([_kv(SINK_ATTR, sink)] if sink else [])]
            return metrics_pb2.Metric(
                name=name,
                unit="{record}",
                sum=metrics_pb2.Sum(
                    aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE,
                    is_monotonic=True,
                    data_points=[
                        _number_point(ts, value(i), attrs, start_ns=run.start_ns)
                        for i, ts in enumerate(run.health_ts_ns)
                    ],
                ),
            )

        def gauge(name: str, unit: str, value: Any) -> metrics_pb2.Metric:
            return metrics_pb2.Metric(
                name=name,
                unit=unit,
                gauge=metrics_pb2.Gauge(
                    data_points=[_number_point(ts, value(i), common) for i, ts in enumerate(run.health_ts_ns)]
                ),
            )

        scope_metrics.metrics.append(counter("cirron.health.records.recorded", run.recorded))
        for sink in SINKS:
            scope_metrics.metrics.append(
                counter("cirron.health.records.written", lambda i, k=sink: run.written(k, i), sink)
            )
            scope_metrics.metrics.append(
                counter("cirron.health.records.dropped", lambda i, k=sink: run.dropped(k, i), sink)
            )
        scope_metrics.metrics.append(gauge("cirron.health.ring.fill", "", run.ring_fill))
        scope_metrics.metrics.append(gauge("cirron.health.outbox.size", "By", run.outbox_bytes))
    return metrics_service_pb2.ExportMetricsServiceRequest(
        resource_metrics=[metrics_pb2.ResourceMetrics(resource=resource, scope_metrics=[scope_metrics])]
    )


def send_grpc(target: str, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
    with grpc.insecure_channel(target) as channel:
        response = metrics_service_pb2_grpc.MetricsServiceStub(channel).Export(request, timeout=10)
    assert not response.HasField("partial_success") or response.partial_success.rejected_data_points == 0, (
        response
    )


def send_http(url: str, request: metrics_service_pb2.ExportMetricsServiceRequest) -> int:
    req = urllib.request.Request(
        url,
        data=request.SerializeToString(),
        method="POST",
        headers={"Content-Type": "application/x-protobuf"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


# -- reading it back ------------------------------------------------------------------------


def selector(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def wait_for_series(prom: Prometheus, match: str, count: int, timeout: float = 30.0) -> list[dict[str, str]]:
    """The series matching `match` once there are `count` of them (the collector batches)."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        found = prom.api("series", **{"match[]": match, "start": time.time() - 3600, "end": time.time() + 60})
        if len(found) >= count:
            time.sleep(0.5)  # late duplicates would show now
            return prom.api(
                "series", **{"match[]": match, "start": time.time() - 3600, "end": time.time() + 60}
            )
        time.sleep(0.2)
    raise AssertionError(f"Prometheus has {len(found)} series for {match}, expected {count}: {found}")


def raw_samples(prom: Prometheus, sel: str) -> list[tuple[int, float]]:
    """Every stored sample of the one series `sel` selects: (ms, value)."""
    (result,) = prom.api("query", query=f"{sel}[2h]", time=time.time())["result"]
    return [(round(float(t) * 1000), float(v)) for t, v in result["values"]]


def same_value(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def assert_samples(got: list[tuple[int, float]], want: list[tuple[int, float | int]]) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    for (t, g), (_, w) in zip(got, want, strict=True):
        assert same_value(g, float(w)), f"at {t} ms: Prometheus has {g!r}, sent {w!r}"


def exemplars(prom: Prometheus, sel: str, start_ns: int, end_ns: int) -> list[tuple[str, str, int, float]]:
    """(trace_id, span_id, ms, value) of every exemplar of the series `sel` selects."""
    data = prom.api("query_exemplars", query=sel, start=start_ns / 1e9 - 1, end=end_ns / 1e9 + 1)
    out = []
    for entry in data:
        for ex in entry["exemplars"]:
            assert set(ex["labels"]) == {"trace_id", "span_id"}, ex
            out.append(
                (
                    ex["labels"]["trace_id"],
                    ex["labels"]["span_id"],
                    round(float(ex["timestamp"]) * 1000),
                    float(ex["value"]),
                )
            )
    return sorted(out)


def want_exemplars(s: MarkSeries) -> list[tuple[str, str, int, float]]:
    return sorted((p.trace_id.hex(), p.span_id.hex(), _ms(p.ts_ns), float(p.value)) for p in s.points)


def same_exemplars(got: list[tuple[str, str, int, float]], want: list[tuple[str, str, int, float]]) -> bool:
    return len(got) == len(want) and all(
        g[:3] == w[:3] and same_value(g[3], w[3]) for g, w in zip(got, want, strict=True)
    )


# -- the stack on loopback ------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_bin() -> Path:
    return _binary("prometheus")


@pytest.fixture(scope="module")
def otelcol_bin() -> Path:
    return _binary("collector")


@pytest.fixture(scope="module")
def prometheus(prometheus_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    backend = Prometheus(prometheus_bin, tmp_path_factory.mktemp("prometheus"), compose_prometheus_flags())
    backend.start()
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def collector(
    otelcol_bin: Path, prometheus: Prometheus, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Collector]:
    """The repo's collector config; its traces exporters point at a closed port (no traces here)."""
    backend = Collector(
        otelcol_bin, tmp_path_factory.mktemp("collector"), f"{HOST}:1", f"{HOST}:1", prometheus.otlp_url
    )
    backend.start()
    yield backend
    backend.stop()


@dataclasses.dataclass
class Sent:
    service: str
    runs: list[Run]
    t0_ns: int
    t1_ns: int


@pytest.fixture(scope="module")
def sent(collector: Collector, prometheus: Prometheus) -> Sent:
    """Two runs of one service (rank 0 and rank 1, two sessions) sent through the collector,
    each in two requests (the marks, then the health), until Prometheus has every series."""
    service = f"cirron-metrics-{uuid.uuid4().hex[:8]}"
    t0 = (time.time_ns() // 1_000_000_000 - 60) * 1_000_000_000
    runs = [make_run(service, 0, t0, 8), make_run(service, 1, t0 + 500_000_000, 8)]
    target = f"{HOST}:{collector.ports['otlp_grpc']}"
    for run in runs:
        send_grpc(target, metrics_request(run, health=False))
        send_grpc(target, metrics_request(run, marks=False))
    n_marks = sum(len(r.marks) for r in runs)
    wait_for_series(prometheus, f'{{__name__=~"{PROM_MARK_PREFIX}.+", service_name="{service}"}}', n_marks)
    wait_for_series(prometheus, f'{{__name__=~"cirron_health_.+", service_name="{service}"}}', 7 * len(runs))
    return Sent(service, runs, t0, t0 + 10_000_000_000)


# -- the marks ------------------------------------------------------------------------------


@pytest.mark.real_backend
def test_each_mark_is_one_series_with_the_documented_name_and_labels(sent: Sent, prometheus: Prometheus):
    got = prometheus.api(
        "series",
        **{
            "match[]": f'{{__name__=~"{PROM_MARK_PREFIX}.+", service_name="{sent.service}"}}',
            "start": sent.t0_ns / 1e9 - 10,
            "end": time.time(),
        },
    )
    want = [
        {"__name__": s.prom_name, "cirron_scope": s.scope, **run.labels()}
        for run in sent.runs
        for s in run.marks
    ]
    assert sorted(got, key=json.dumps) == sorted(want, key=json.dumps)
    assert all(set(s) == MARK_LABELS for s in got)
    names = {s["__name__"] for s in got}
    assert names == {
        "cirron_mark_loss",
        "cirron_mark_lr",
        "cirron_mark_grad_norm",
        "cirron_mark_samples",
        "cirron_mark_clipped",
        "cirron_mark_val_top_1_acc",
    }


@pytest.mark.real_backend
def test_every_mark_value_and_timestamp_is_the_one_sent(sent: Sent, prometheus: Prometheus):
    for run in sent.runs:
        for s in run.marks:
            sel = selector(s.prom_name, {"cirron_scope": s.scope, **run.labels()})
            assert_samples(raw_samples(prometheus, sel), [(_ms(p.ts_ns), p.value) for p in s.points])


@pytest.mark.real_backend
def test_query_range_at_the_marks_steps_gives_the_marks(sent: Sent, prometheus: Prometheus):
    """What Grafana asks for: a range query whose steps fall on the marks returns them."""
    run = sent.runs[0]
    for s in run.marks[:4]:
        sel = selector(s.prom_name, {"cirron_scope": s.scope, **run.labels()})
        first, last = _ms(s.points[0].ts_ns), _ms(s.points[-1].ts_ns)
        (result,) = prometheus.api("query_range", query=sel, start=first / 1000, end=last / 1000, step=1)[
            "result"
        ]
        got = [(round(float(t) * 1000), float(v)) for t, v in result["values"]]
        assert_samples(got, [(_ms(p.ts_ns), p.value) for p in s.points])


@pytest.mark.real_backend
def test_every_mark_point_has_its_span_as_exemplar(sent: Sent, prometheus: Prometheus):
    for run in sent.runs:
        for s in run.marks:
            sel = selector(s.prom_name, {"cirron_scope": s.scope, **run.labels()})
            got = exemplars(prometheus, sel, s.points[0].ts_ns, s.points[-1].ts_ns)
            assert same_exemplars(got, want_exemplars(s)), (sel, got, want_exemplars(s))


# -- the health -----------------------------------------------------------------------------


@pytest.mark.real_backend
def test_health_metrics_have_the_documented_names_labels_and_values(sent: Sent, prometheus: Prometheus):
    for run in sent.runs:
        ts = [_ms(t) for t in run.health_ts_ns]
        n = range(len(ts))
        expected: dict[str, list[tuple[int, float | int]]] = {
            selector("cirron_health_records_recorded_total", run.labels()): list(
                zip(ts, map(run.recorded, n), strict=True)
            ),
            selector("cirron_health_ring_fill", run.labels()): list(
                zip(ts, map(run.ring_fill, n), strict=True)
            ),
            selector("cirron_health_outbox_size_bytes", run.labels()): list(
                zip(ts, map(run.outbox_bytes, n), strict=True)
            ),
        }
        for sink in SINKS:
            labels = {**run.labels(), "cirron_sink": sink}
            expected[selector("cirron_health_records_written_total", labels)] = [
                (t, run.written(sink, i)) for i, t in enumerate(ts)
            ]
            expected[selector("cirron_health_records_dropped_total", labels)] = [
                (t, run.dropped(sink, i)) for i, t in enumerate(ts)
            ]
        for sel, want in expected.items():
            assert_samples(raw_samples(prometheus, sel), want)
    got = prometheus.api(
        "series",
        **{
            "match[]": f'{{__name__=~"cirron_health_.+", service_name="{sent.service}"}}',
            "start": sent.t0_ns / 1e9 - 10,
            "end": time.time(),
        },
    )
    assert len(got) == 7 * len(sent.runs)
    for series in got:
        extra = (
            {"cirron_sink"}
            if "records_written" in series["__name__"] or "dropped" in series["__name__"]
            else set()
        )
        assert set(series) == HEALTH_LABELS | extra, series


# -- the dashboard against the data ---------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels") or []


def prometheus_exprs(dash: dict[str, Any]) -> list[str]:
    return [
        t["expr"]
        for p in panels(dash)
        if p.get("datasource", {}).get("type") == "prometheus"
        for t in p.get("targets") or []
    ]


def substitute(text: str, values: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"the dashboard uses ${name}, which the test does not set"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def label_values(prom: Prometheus, query: str, start: float, end: float) -> list[str]:
    """A Grafana `label_values(selector, label)` variable query, as Grafana runs it."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert m, query
    return prom.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1), "start": start, "end": end})


@pytest.mark.real_backend
def test_the_dashboard_variables_list_what_was_sent(sent: Sent, prometheus: Prometheus):
    variables = dashboard_variables()
    start, end = sent.t0_ns / 1e9 - 10, time.time()
    values = {"prefix": variables["prefix"]["query"], "service": sent.service, "run": ALL, "rank": ALL}
    assert values["prefix"] == PROM_MARK_PREFIX

    def run(name: str) -> list[str]:
        return label_values(prometheus, substitute(variables[name]["query"], values), start, end)

    assert sent.service in run("service")
    assert sorted(run("run")) == sorted(r.session_id for r in sent.runs)
    assert sorted(run("rank")) == ["0", "1"]
    assert sorted(run("mark")) == sorted({s.prom_name for s in sent.runs[0].marks})
    values["run"] = sent.runs[1].session_id
    assert run("rank") == ["1"]


@pytest.mark.real_backend
def test_every_dashboard_query_returns_the_data_sent(sent: Sent, prometheus: Prometheus):
    dash = dashboard()
    marks = sorted({s.prom_name for s in sent.runs[0].marks})
    start, end = sent.t0_ns / 1e9 - 5, sent.t1_ns / 1e9 + 5
    exprs = prometheus_exprs(dash)
    assert len(exprs) >= 5
    for rank in (ALL, "0"):
        for mark in marks:
            values = {
                "prefix": PROM_MARK_PREFIX,
                "service": sent.service,
                "run": ALL,
                "rank": rank,
                "mark": mark,
            }
            for expr in exprs:
                query = substitute(expr, values)
                result = prometheus.api("query_range", query=query, start=start, end=end, step=1)["result"]
                assert result, f"no data for the dashboard's {expr!r} as {query!r}"
                assert all(len(r["values"]) > 0 for r in result)
    # the mark panels ask for exemplars, and get each mark's spans
    (mark_panel,) = [p for p in panels(dash) if p.get("repeat") == "mark"]
    (target,) = mark_panel["targets"]
    assert target["exemplar"] is True
    run = sent.runs[0]
    values = {"service": sent.service, "run": run.session_id, "rank": ALL, "mark": "cirron_mark_loss"}
    got = exemplars(prometheus, substitute(target["expr"], values), sent.t0_ns, sent.t1_ns)
    assert same_exemplars(got, want_exemplars(run.marks[0]))


# -- what Prometheus does with other shapes (why the spec is what it is) --------------------


def _fresh_run(service_tag: str) -> Run:
    t0 = (time.time_ns() // 1_000_000_000 - 30) * 1_000_000_000
    return make_run(f"cirron-{service_tag}-{uuid.uuid4().hex[:8]}", 0, t0, 4)


def _check_gauge_exemplars_lost(prometheus: Prometheus, run: Run) -> None:
    loss = run.marks[0]
    sel = selector(loss.prom_name, {"cirron_scope": "batch", **run.labels()})
    wait_for_series(prometheus, sel, 1)
    assert_samples(raw_samples(prometheus, sel), [(_ms(p.ts_ns), p.value) for p in loss.points])
    assert exemplars(prometheus, sel, loss.points[0].ts_ns, loss.points[-1].ts_ns) == []


@pytest.mark.real_backend
def test_marks_as_gauges_lose_their_exemplars_through_the_collector(
    collector: Collector, prometheus: Prometheus
):
    """Control for test_every_mark_point_has_its_span_as_exemplar, and the reason marks are
    non-monotonic Sums: Prometheus's OTLP translation (3.16) appends no exemplar for a Gauge
    point. The same series, the same values, no links. If this starts to fail, Prometheus keeps
    them now, and the spec can go back to Gauges."""
    run = _fresh_run("gauge-via-collector")
    send_grpc(f"{HOST}:{collector.ports['otlp_grpc']}", metrics_request(run, health=False, marks_as="gauge"))
    _check_gauge_exemplars_lost(prometheus, run)


@pytest.mark.real_backend
def test_marks_as_gauges_lose_their_exemplars_straight_to_prometheus(prometheus: Prometheus):
    run = _fresh_run("gauge-direct")
    assert (
        send_http(f"{prometheus.otlp_url}/v1/metrics", metrics_request(run, health=False, marks_as="gauge"))
        == 200
    )
    _check_gauge_exemplars_lost(prometheus, run)


@pytest.mark.real_backend
def test_marks_straight_to_prometheus_keep_values_and_exemplars(prometheus: Prometheus):
    """The library may also send to Prometheus's OTLP endpoint itself: the spec's shape keeps
    everything there too."""
    run = _fresh_run("sum-direct")
    assert send_http(f"{prometheus.otlp_url}/v1/metrics", metrics_request(run, health=False)) == 200
    for s in run.marks:
        sel = selector(s.prom_name, {"cirron_scope": s.scope, **run.labels()})
        wait_for_series(prometheus, sel, 1)
        assert_samples(raw_samples(prometheus, sel), [(_ms(p.ts_ns), p.value) for p in s.points])
        got = exemplars(prometheus, sel, s.points[0].ts_ns, s.points[-1].ts_ns)
        assert same_exemplars(got, want_exemplars(s))


@pytest.mark.real_backend
def test_milliseconds_and_late_points(collector: Collector, prometheus: Prometheus):
    """Two points of a series in one millisecond: Prometheus keeps the first, drops the second,
    and the request succeeds. A point older than the series' newest (an outbox replayed after
    an outage): kept within prometheus.yml's out_of_order_time_window, with its exemplar."""
    run = _fresh_run("late")
    loss = run.marks[0]
    del run.marks[1:]
    last = loss.points[-1]
    target = f"{HOST}:{collector.ports['otlp_grpc']}"
    send_grpc(target, metrics_request(run, health=False))
    sel = selector(loss.prom_name, {"cirron_scope": "batch", **run.labels()})
    wait_for_series(prometheus, sel, 1)
    same_ms = [
        Point(last.ts_ns + 2_000_000_000, 1.25, secrets.token_bytes(16), secrets.token_bytes(8)),
        Point(last.ts_ns + 2_000_000_000 + 400_000, 9.5, secrets.token_bytes(16), secrets.token_bytes(8)),
    ]
    late = Point(last.ts_ns - 1_500_000_000, 0.125, secrets.token_bytes(16), secrets.token_bytes(8))
    loss.points = same_ms
    send_grpc(target, metrics_request(run, health=False))
    loss.points = [late]
    send_grpc(target, metrics_request(run, health=False))
    deadline = time.monotonic() + 30
    while len(raw_samples(prometheus, sel)) < 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    got = dict(raw_samples(prometheus, sel))
    assert got[_ms(same_ms[0].ts_ns)] == 1.25 and 9.5 not in got.values()
    assert got[_ms(late.ts_ns)] == 0.125
    assert len(got) == 4 + 1 + 1
    ex = exemplars(prometheus, sel, late.ts_ns, late.ts_ns)
    assert (late.trace_id.hex(), late.span_id.hex(), _ms(late.ts_ns), 0.125) in ex


@pytest.mark.real_backend
def test_a_point_older_than_the_window_fails_its_whole_request(prometheus: Prometheus):
    """One point more than out_of_order_time_window (1 h) older than its series' newest:
    Prometheus answers 400 and stores none of the request's points (the README's rule)."""
    run = _fresh_run("too-old")
    del run.marks[1:]
    loss = run.marks[0]
    url = f"{prometheus.otlp_url}/v1/metrics"
    assert send_http(url, metrics_request(run, health=False)) == 200
    sel = selector(loss.prom_name, {"cirron_scope": "batch", **run.labels()})
    wait_for_series(prometheus, sel, 1)
    first = loss.points[0]
    too_old = Point(first.ts_ns - 2 * 3600 * 10**9, 5.0, first.trace_id, first.span_id)
    fine = Point(loss.points[-1].ts_ns + 10**9, 6.0, first.trace_id, first.span_id)
    kept = list(loss.points)
    loss.points = [too_old, fine]
    with pytest.raises(urllib.error.HTTPError) as refused:
        send_http(url, metrics_request(run, health=False))
    assert refused.value.code == 400 and b"too old sample" in refused.value.read()
    time.sleep(0.5)
    assert_samples(raw_samples(prometheus, sel), [(_ms(p.ts_ns), p.value) for p in kept])


@pytest.mark.real_backend
def test_prometheus_is_the_compose_version(prometheus_bin: Path):
    r = subprocess.run([str(prometheus_bin), "--version"], capture_output=True, text=True, timeout=30)
    image = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["prometheus"]["image"]
    assert r.returncode == 0 and f"version {image.rsplit(':v', 1)[1]}" in r.stdout + r.stderr, r


# -- the Grafana provisioning, structurally (no Grafana here) -------------------------------


def readme_spec_names() -> set[str]:
    """The Prometheus names in the README's "Marks as metrics" table (the backticked
    `cirron_...` names)."""
    text = README.read_text()
    m = re.search(r"^## Marks as metrics[^\n]*\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert m, 'README.md has no "## Marks as metrics" section'
    return set(re.findall(r"`(cirron_[a-z0-9_]+)`", m.group(1)))


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: bare names and __name__ matchers."""
    names = set(re.findall(r"\b(cirron_[a-zA-Z0-9_]+)\b", expr))
    return names


def test_the_dashboard_uses_only_metric_names_of_the_spec():
    spec = readme_spec_names()
    assert {"cirron_mark_loss", "cirron_health_records_recorded_total", "cirron_health_ring_fill"} <= spec
    dash = dashboard()
    used: set[str] = set()
    for expr in prometheus_exprs(dash) + [
        v["query"] for v in dash["templating"]["list"] if v["type"] == "query"
    ]:
        used |= promql_metric_names(expr)
    used.discard("cirron_session_id")
    used.discard("cirron_rank")
    used.discard("cirron_scope")
    used.discard("cirron_sink")
    # the mark prefix ("cirron_mark_") and the health family ("cirron_health_") are regex
    # prefixes; every full name must be in the spec
    assert {n for n in used if not n.endswith("_")} <= spec, used - spec
    assert dashboard_variables()["prefix"]["query"] == PROM_MARK_PREFIX
    assert all(any(s.startswith(n) for s in spec) for n in used if n.endswith("_"))


def test_the_dashboard_and_exemplar_links_name_provisioned_data_sources():
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {d["uid"]: d["type"] for d in sources}
    assert {"tempo": "tempo", "jaeger": "jaeger", "prometheus": "prometheus"}.items() <= uids.items()
    (prom,) = [d for d in sources if d["type"] == "prometheus"]
    links = prom["jsonData"]["exemplarTraceIdDestinations"]
    # Prometheus's OTLP translation names the exemplar's trace id label trace_id (checked above)
    assert {(d["name"], d["datasourceUid"]) for d in links} == {("trace_id", "tempo"), ("trace_id", "jaeger")}
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert prom["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["prometheus"]["ports"]

    dash = dashboard()
    refs = [p["datasource"] for p in panels(dash) if "datasource" in p]
    refs += [t["datasource"] for p in panels(dash) for t in p.get("targets") or [] if "datasource" in t]
    refs += [v["datasource"] for v in dash["templating"]["list"] if "datasource" in v]
    assert refs
    for ref in refs:
        assert uids.get(ref["uid"]) == ref["type"], ref
    assert dash["uid"] == "cirron-run" and dash["title"] == "Cirron run"
    # a panel per chosen mark: repeated over the multi-valued `mark` variable
    variables = dashboard_variables()
    assert variables["mark"]["multi"] is True and variables["mark"]["includeAll"] is True
    assert [p for p in panels(dash) if p.get("repeat") == "mark"]
    assert {"service", "run", "rank", "mark", "prefix"} <= set(variables)


def test_grafana_provisioning_paths_match_the_compose_mount():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in compose["grafana"]["volumes"]
    providers = yaml.safe_load((GRAFANA / "dashboards" / "dashboards.yaml").read_text())["providers"]
    (provider,) = providers
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path.startswith("/etc/grafana/provisioning/")
    local = GRAFANA / Path(path).relative_to("/etc/grafana/provisioning")
    assert DASHBOARD.parent == local and DASHBOARD.is_file()
    ini = (ROOT / "deploy" / "grafana" / "grafana.ini").read_text()
    home = re.search(r"^default_home_dashboard_path\s*=\s*(\S+)", ini, re.MULTILINE)
    assert home and GRAFANA / Path(home.group(1)).relative_to("/etc/grafana/provisioning") == DASHBOARD


def test_compose_gives_prometheus_the_otlp_receiver_and_exemplar_storage():
    flags = compose_prometheus_flags()
    assert "--web.enable-otlp-receiver" in flags
    assert "--enable-feature=exemplar-storage" in flags
    service = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["prometheus"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in service["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in flags


NATIVE_PROGRAM = r"""
import json, sys, time
from cirron_otel import _native
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.common.v1.common_pb2 import KeyValue, AnyValue

service = sys.argv[1]
_native.configure(otlp=True, rank=2)
session = _native.session_begin({})
state = _native.OtlpState(128, metrics=True)
resource = Resource(attributes=[
    KeyValue(key="service.name", value=AnyValue(string_value=service))]).SerializeToString()
session_trace = (0x0123456789ABCDEF, 0x0FEDCBA987654321)
for step in range(5):
    with _native.scope("batch", step):
        _native.mark("loss", 1.0 / (step + 1))
        _native.mark("samples", 64 * (step + 1))
        _native.mark("note", "strings are not charted")
    time.sleep(0.003)  # one point per series per millisecond: Prometheus keeps ms
_native.mark("lr", 0.25)
spans, marks = [], []
while (b := _native.drain(100_000)) is not None:
    for req, _ in _native.otlp_encode(state, [b], resource, "cirron_otel", "0", session_trace):
        for rs in ExportTraceServiceRequest.FromString(req).resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append({"name": s.name, "trace": s.trace_id.hex(), "span": s.span_id.hex(),
                                  "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                                  "events": [(e.name, e.time_unix_nano, e.attributes[0].value.double_value
                                              or e.attributes[0].value.int_value) for e in s.events]})
session_id = tuple(int(session.id[i:i + 16], 16) for i in (0, 16))
reqs = _native.otlp_metrics_encode(state, resource, "cirron_otel", "0", "cirron.mark.",
                                   time.time_ns() - 10**9, session_id)
print(json.dumps({"requests": [r.hex() for r, _ in reqs], "spans": spans, "session": session.id}))
"""


@pytest.mark.real_backend
def test_the_native_encoder_through_the_collector_into_prometheus(
    collector: Collector, prometheus: Prometheus
):
    """What the library's own encoder sends (not a hand-built request): every numeric mark is a
    sample of its series with the documented labels, and its exemplar is the span it was
    recorded in, with the ids that span is exported with."""
    import sys

    service = f"cirron-native-{uuid.uuid4().hex[:8]}"
    r = subprocess.run(
        [sys.executable, "-c", NATIVE_PROGRAM, service],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for request in res["requests"]:
        req = urllib.request.Request(
            f"http://{HOST}:{collector.ports['otlp_http']}/v1/metrics",
            data=bytes.fromhex(request),
            method="POST",
            headers={"Content-Type": "application/x-protobuf"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    labels = {
        "job": service,
        "service_name": service,
        "cirron_rank": "2",
        "cirron_session_id": res["session"],
    }
    found = wait_for_series(prometheus, f'{{__name__=~"{PROM_MARK_PREFIX}.+", service_name="{service}"}}', 3)
    assert {s["__name__"] for s in found} == {"cirron_mark_loss", "cirron_mark_samples", "cirron_mark_lr"}
    for s in found:
        assert set(s) == MARK_LABELS and {k: s[k] for k in labels} == labels
    batches = sorted((s for s in res["spans"] if s["name"] == "batch"), key=lambda s: s["start"])
    assert len(batches) == 5
    for name in ("loss", "samples"):
        sel = selector(f"cirron_mark_{name}", {"cirron_scope": "batch", **labels})
        want = [(e[1], e[2]) for b in batches for e in b["events"] if e[0] == name]
        assert_samples(raw_samples(prometheus, sel), [(_ms(t), v) for t, v in want])
        got = exemplars(prometheus, sel, want[0][0], want[-1][0])
        spans_of = [
            (b["trace"], b["span"], _ms(e[1]), float(e[2]))
            for b in batches
            for e in b["events"]
            if e[0] == name
        ]
        assert same_exemplars(got, sorted(spans_of))
    sel = selector("cirron_mark_lr", {"cirron_scope": "cirron.session", **labels})
    ((_, value),) = raw_samples(prometheus, sel)
    assert value == 0.25
    ((trace, span, _, _),) = exemplars(prometheus, sel, time.time_ns() - 3 * 10**9 * 60, time.time_ns())
    assert trace == f"{0x0123456789ABCDEF:016x}{0x0FEDCBA987654321:016x}" and span == res["session"][:16]


def test_the_health_encoder_sends_exactly_the_spec():
    """exporters.health_metrics builds the health request this module's spec builder sends
    (and the tests above check against Prometheus): field for field, for one flush."""
    from cirron_otel.exporters.health_metrics import health_request

    run = make_run("svc", 3, (time.time_ns() // 10**9) * 10**9, 1)
    want = metrics_request(run, marks=False)
    resource = want.resource_metrics[0].resource.SerializeToString()
    got = health_request(
        resource=resource,
        scope_version="0",
        start_ns=run.start_ns,
        now_ns=run.health_ts_ns[0],
        rank=run.rank,
        session_id=run.session_id,
        recorded=run.recorded(0),
        sinks={sink: (run.written(sink, 0), run.dropped(sink, 0)) for sink in SINKS},
        ring_fill=run.ring_fill(0),
        outbox_bytes=run.outbox_bytes(0),
    )
    assert metrics_service_pb2.ExportMetricsServiceRequest.FromString(got) == want


PROFILED_PROGRAM = r"""
import sys, time
import cirron_otel as ci

ci.profile(output_dir=sys.argv[1], service_name=sys.argv[2], flush_interval=0.2,
           install_signal_handlers=False)
for step in ci.batches(range(6)):
    ci.mark("loss", 1.0 / (step + 1))
    ci.mark("tokens", 100 * step)
    time.sleep(0.003)  # Prometheus keeps one point per series and millisecond
ci.mark("lr", 0.5)
ci.shutdown()
"""


@pytest.mark.real_backend
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_profiled_program_charts_its_marks_in_prometheus(
    collector: Collector, prometheus: Prometheus, tmp_path: Path, protocol: str
):
    """profile() with OTLP on: the marks reach Prometheus through the collector as series with
    the documented names and labels, each point's exemplar is the span it was recorded in (as
    the spool has it), and the health metrics come along."""
    import sys

    from tests.support.helpers import spans_and_marks

    service = f"cirron-e2e-{uuid.uuid4().hex[:8]}"
    port = collector.ports["otlp_grpc" if protocol == "grpc" else "otlp_http"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CIRRON_"))}
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{HOST}:{port}", OTEL_EXPORTER_OTLP_PROTOCOL=protocol, RANK="1"
    )
    out = tmp_path / "cirron"
    r = subprocess.run(
        [sys.executable, "-c", PROFILED_PROGRAM, str(out), service],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    spans, marks = spans_and_marks(out)
    (session,) = [s for s in spans if s["name"] == "cirron.session"]
    labels = {"job": service, "service_name": service, "cirron_rank": "1", "cirron_session_id": session["id"]}
    found = wait_for_series(prometheus, f'{{__name__=~"{PROM_MARK_PREFIX}.+", service_name="{service}"}}', 3)
    assert {s["__name__"] for s in found} == {"cirron_mark_loss", "cirron_mark_tokens", "cirron_mark_lr"}
    by_id = {s["id"]: s for s in spans}
    for name in ("loss", "tokens"):
        sel = selector(f"cirron_mark_{name}", {"cirron_scope": "batch", **labels})
        mine = sorted((m for m in marks if m["name"] == name), key=lambda m: m["ts_ns"])
        assert_samples(raw_samples(prometheus, sel), [(_ms(m["ts_ns"]), m["value"]) for m in mine])
        want = sorted(
            (by_id[m["span_id"]]["trace_id"], m["span_id"][:16], _ms(m["ts_ns"]), float(m["value"]))
            for m in mine
        )
        assert same_exemplars(exemplars(prometheus, sel, mine[0]["ts_ns"], mine[-1]["ts_ns"]), want)
    sel = selector("cirron_mark_lr", {"cirron_scope": "cirron.session", **labels})
    assert [v for _, v in raw_samples(prometheus, sel)] == [0.5]
    health = wait_for_series(prometheus, f'{{__name__=~"cirron_health_.+", service_name="{service}"}}', 5)
    names = {s["__name__"] for s in health}
    assert {
        "cirron_health_records_recorded_total",
        "cirron_health_records_written_total",
        "cirron_health_records_dropped_total",
        "cirron_health_ring_fill",
        "cirron_health_outbox_size_bytes",
    } <= names
    written = prometheus.api(
        "query",
        query=selector("cirron_health_records_written_total", {"cirron_sink": "spool", **labels}),
        time=time.time(),
    )["result"]
    assert written and float(written[0]["value"][1]) > 0
    # every dashboard query (the mark panels and the health panels) charts this live run
    start_s, end_s = session["start_ns"] / 1e9 - 5, time.time() + 5
    for mark in ("cirron_mark_loss", "cirron_mark_lr"):
        values = {"prefix": PROM_MARK_PREFIX, "service": service, "run": session["id"], "rank": "1"}
        values["mark"] = mark
        for expr in prometheus_exprs(dashboard()):
            query = substitute(expr, values)
            result = prometheus.api("query_range", query=query, start=start_s, end=end_s, step=1)["result"]
            assert result and all(r["values"] for r in result), f"no live data for {expr!r} as {query!r}"
