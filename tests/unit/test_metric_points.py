"""The native metrics encoder (README, "Marks as metrics"): numeric marks as data points of
non-monotonic cumulative Sums, decoded here with opentelemetry-proto. Points of a scope go
out when the scope closes (its name is their `cirron.scope`, its ids their exemplar); the
session's at once. Run in a subprocess: the session and rings are process-wide."""

from __future__ import annotations

import json
import math

from tests.support.helpers import run_script

PROGRAM = """
import json, math
from cirron_otel import _native
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.common.v1.common_pb2 import KeyValue, AnyValue

_native.configure(otlp=True, rank=3)
session = _native.session_begin({})
state = _native.OtlpState(128, metrics=True)
only = _native.OtlpState(128, metrics=True, traces=False)  # a metrics sink's: points alone
resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="svc"))])
session_trace = (0x1111, 0x2222)
out = {"traces": [], "metrics": [], "ready": []}

def cycle():
    spans = []
    while (b := _native.drain(100_000)) is not None:
        for req, _ in _native.otlp_encode(state, [b], resource.SerializeToString(), "cirron_otel",
                                          "9.9", session_trace):
            spans += [s for rs in ExportTraceServiceRequest.FromString(req).resource_spans
                      for ss in rs.scope_spans for s in ss.spans]
        assert _native.otlp_encode(only, [b], resource.SerializeToString(), "cirron_otel", "9.9",
                                   session_trace) == []
    out["ready"].append(state.metric_points_ready)
    args = (resource.SerializeToString(), "cirron_otel", "9.9", "cirron.mark.", 1234, (0xAB, 0xCD))
    reqs = _native.otlp_metrics_encode(state, *args, max_request_bytes=600)
    assert _native.otlp_metrics_encode(only, *args, max_request_bytes=600) == reqs  # the same points
    metrics = []
    for req, n in reqs:
        msg = ExportMetricsServiceRequest.FromString(req)
        (rm,) = msg.resource_metrics
        (sm,) = rm.scope_metrics
        assert rm.resource.attributes[0].value.string_value == "svc"
        assert (sm.scope.name, sm.scope.version) == ("cirron_otel", "9.9")
        assert n == sum(len(m.sum.data_points) for m in sm.metrics)
        for m in sm.metrics:
            assert m.WhichOneof("data") == "sum" and not m.sum.is_monotonic
            assert m.sum.aggregation_temporality == 2  # cumulative
            for p in m.sum.data_points:
                attrs = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in p.attributes}
                ex = [(e.trace_id.hex(), e.span_id.hex(), e.time_unix_nano,
                       getattr(e, e.WhichOneof("value"))) for e in p.exemplars]
                metrics.append({"name": m.name, "value": getattr(p, p.WhichOneof("value")),
                                "kind": p.WhichOneof("value"), "start": p.start_time_unix_nano,
                                "t": p.time_unix_nano, "attrs": attrs, "exemplars": ex})
    out["traces"].append([{"name": s.name, "trace": s.trace_id.hex(), "span": s.span_id.hex()}
                          for s in spans])
    out["metrics"].append(metrics)
    out["requests"] = len(reqs)

with _native.scope("step") as sc:
    for i in range(40):
        _native.mark("loss", 1.0 / (i + 1))
    _native.mark("count", 7)
    _native.mark("ok", True)
    _native.mark("text", "not a number")
    _native.mark("diverged", float("nan"))
    _native.mark("acc", 0.9, kind="summary")
    cycle()  # the scope is open: nothing of it yet
_native.mark("lr", 0.1)  # on the session: at once
cycle()
print(json.dumps({**out, "step_id": sc.id, "session": session.id}))
"""


def test_numeric_marks_become_sum_points_with_their_scope_and_exemplar() -> None:
    r = run_script(PROGRAM)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ready"][0] == 0 and res["metrics"][0] == []  # held while "step" is open
    points = res["metrics"][1]
    (step,) = [s for s in res["traces"][1] if s["name"] == "step"]
    by_name: dict[str, list[dict]] = {}
    for p in points:
        by_name.setdefault(p["name"], []).append(p)
    assert sorted(by_name) == [
        "cirron.mark.acc",  # a summary mark: a point of its own metric
        "cirron.mark.count",
        "cirron.mark.diverged",
        "cirron.mark.loss",
        "cirron.mark.lr",
        "cirron.mark.ok",
    ]  # no "text": a string mark stays in traces and the spool
    assert res["requests"] > 1  # cut near max_request_bytes, one Metric per name per request
    loss = by_name["cirron.mark.loss"]
    assert [p["value"] for p in loss] == [1.0 / (i + 1) for i in range(40)]
    assert [p["t"] for p in loss] == sorted(p["t"] for p in loss)  # in time order
    assert (
        by_name["cirron.mark.count"][0]["kind"] == "as_int" and by_name["cirron.mark.count"][0]["value"] == 7
    )
    assert (
        by_name["cirron.mark.ok"][0]["value"] == 1.0 and by_name["cirron.mark.ok"][0]["kind"] == "as_double"
    )
    assert math.isnan(by_name["cirron.mark.diverged"][0]["value"])  # the double itself
    session_hex = f"{0xAB:016x}{0xCD:016x}"
    for p in points:
        assert p["start"] == 1234
        on_session = p["name"] == "cirron.mark.lr"
        assert p["attrs"] == {
            "cirron.scope": "cirron.session" if on_session else "step",
            "cirron.rank": 3,
            "cirron.session.id": session_hex,
        }
        (ex,) = p["exemplars"]
        trace, span = (
            (f"{0x1111:016x}{0x2222:016x}", res["session"][:16])
            if on_session
            else (
                step["trace"],
                step["span"],
            )
        )
        assert ex[0] == trace and ex[1] == span  # the span's exported ids
        assert ex[2] == p["t"]
        if not math.isnan(p["value"]):
            assert ex[3] == p["value"]
    assert step["span"] == res["step_id"][:16]


ALLOW_PROGRAM = """
import json
from cirron_otel import _native
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

_native.configure(otlp=True)
session = _native.session_begin({})
state = _native.OtlpState(metrics=True, traces=False, metric_attrs=["split", "model.size"])
for split in ("train", "val"):
    with _native.scope("eval"):
        _native.mark("loss", 0.5, split=split, step=7, **{"model.size": 3})
    _native.mark("acc", 1.0)  # no attrs at all
while (b := _native.drain(100_000)) is not None:
    _native.otlp_encode(state, [b], b"", "cirron_otel", "0")
points = []
for req, _ in _native.otlp_metrics_encode(state, b"", "cirron_otel", "0", "m.", 1, (1, 2)):
    for m in ExportMetricsServiceRequest.FromString(req).resource_metrics[0].scope_metrics[0].metrics:
        for p in m.sum.data_points:
            points.append([m.name, {a.key: str(getattr(a.value, a.value.WhichOneof("value")))
                                    for a in p.attributes if not a.key.startswith("cirron.")}])
try:
    _native.OtlpState(metric_attrs=[1])
except TypeError as e:
    points.append(str(e))
print(json.dumps(points))
"""


def test_allow_listed_mark_attrs_become_point_attributes_and_nothing_else() -> None:
    r = run_script(ALLOW_PROGRAM)
    assert r.returncode == 0, r.stderr
    *points, error = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(points, key=str) == sorted(
        [
            ["m.acc", {}],
            ["m.acc", {}],
            ["m.loss", {"split": "train", "model.size": "3"}],  # `step` is not allowed: no label
            ["m.loss", {"split": "val", "model.size": "3"}],
        ],
        key=str,
    )
    assert "metric_attrs must be a sequence of str" in error


FIT_PROGRAM = """
import json
from cirron_otel import _native
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from cirron_otel.exporters.otlp import encode_resource

_native.configure(otlp=True)
_native.session_begin({})
resource = encode_resource({"service.name": "fit"})
res = {}
for budget in range(300, 1400, 37):  # many cut positions, each point ~150-200 bytes
    state = _native.OtlpState(128, metrics=True, traces=False)
    with _native.scope("step"):
        for i in range(60):
            _native.mark("loss" if i % 3 else "grad_norm_of_a_long_name", float(i))
    while (b := _native.drain(100_000)) is not None:
        _native.otlp_encode(state, [b], b"", "s", "1", (1, 2))
    reqs = _native.otlp_metrics_encode(state, resource, "s", "1", "p.", 1, (1, 2), max_request_bytes=budget)
    values, sizes = [], []
    for req, n in reqs:
        msg = ExportMetricsServiceRequest.FromString(req)
        assert len(msg.SerializeToString()) == len(req)  # canonical lengths: none padded
        assert msg.resource_metrics[0].resource.attributes[0].value.string_value == "fit"
        metrics = msg.resource_metrics[0].scope_metrics[0].metrics
        assert len({m.name for m in metrics}) == len(metrics)  # one Metric per name
        got = [p.as_double for m in metrics for p in m.sum.data_points]
        assert len(got) == n, (budget, len(got), n)
        values += got
        sizes.append(len(req))
    res[budget] = {"sizes": sizes, "values": sorted(values)}
print(json.dumps(res))
"""


def test_every_metrics_request_fits_its_budget_and_every_point_goes_once() -> None:
    # A request closed past max_request_bytes cannot be split by the sender (it once rewrote
    # the same outbox file for ever, sending nothing): the encoder cuts before the point.
    r = run_script(FIT_PROGRAM)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res) > 20
    for budget, got in res.items():
        assert got["values"] == [float(i) for i in range(60)], budget
        assert max(got["sizes"]) <= int(budget), (budget, got["sizes"])
        assert len(got["sizes"]) > 1, budget


REUSE_PROGRAM = """
import json
from cirron_otel import _native
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

_native.configure(otlp=True)
_native.session_begin({})
state = _native.OtlpState(128, metrics=True, traces=False)  # one state, as a sink keeps
expected, got = [], []
value = 0.0
for round in range(4):  # closed spans' entries (and their points arrays) serve later spans
    for k in range(300):
        marks = 3 + (k * 7) % 30  # some spans outgrow an entry's first points array
        with _native.scope(f"s{k % 5}"):
            for _ in range(marks):
                value += 1.0
                _native.mark("loss", value)
                expected.append([f"s{k % 5}", value])
        with _native.scope("empty"):  # no points: a recycled entry must not bring old ones
            pass
    while (b := _native.drain(100_000)) is not None:
        _native.otlp_encode(state, [b], b"", "s", "1", (1, 2))
    for req, n in _native.otlp_metrics_encode(state, b"", "s", "1", "p.", 1, (1, 2)):
        for m in ExportMetricsServiceRequest.FromString(req).resource_metrics[0].scope_metrics[0].metrics:
            for p in m.sum.data_points:
                scope = {a.key: a.value.string_value for a in p.attributes}["cirron.scope"]
                got.append([scope, p.as_double])
print(json.dumps({"expected": expected, "got": got, "open": state.open_spans}))
"""


def test_points_of_many_spans_through_one_state_go_once_with_their_own_scope() -> None:
    r = run_script(REUSE_PROGRAM, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res["expected"]) > 10_000
    assert sorted(res["got"], key=lambda p: p[1]) == res["expected"]
    assert res["open"] <= 1  # the session, at most
