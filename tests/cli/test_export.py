"""`cirron-otel export`: Chrome trace JSON checked against the trace event format, and
OTLP/JSON checked against what the live export sends for the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from .conftest import TRAIN, cli, load_records, run_python

REQUIRED = {
    "X": {"name", "ph", "ts", "dur", "pid", "tid"},
    "C": {"name", "ph", "ts", "pid", "args"},
    "i": {"name", "ph", "ts", "pid", "tid", "s"},
    "M": {"name", "ph", "pid", "args"},
}


def chrome(spool: Path, tmp_path: Path, fmt: str = "perfetto") -> list[dict[str, Any]]:
    target = tmp_path / "trace.json"
    result = cli("export", str(spool), "--format", fmt, "-o", str(target))
    assert result.exit_code == 0, result.output
    doc = json.loads(target.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert isinstance(doc["traceEvents"], list)
    return doc["traceEvents"]


def well_formed(slices: Iterable[dict[str, Any]]) -> None:
    """Any two slices of one track nest or are disjoint (times in ns, as a viewer reads them)."""
    per_thread: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for e in slices:
        start = round(e["ts"] * 1000)
        per_thread[(e["pid"], e["tid"])].append((start, start + round(e["dur"] * 1000)))
    for intervals in per_thread.values():
        intervals.sort(key=lambda iv: (iv[0], -iv[1]))
        stack: list[int] = []
        for start, end in intervals:
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1], (start, end, stack)
            stack.append(end)


def test_chrome_trace_events_have_the_required_fields(train_spool: Path, tmp_path: Path) -> None:
    events = chrome(train_spool, tmp_path)
    spans, marks = load_records(train_spool)
    for e in events:
        assert e["ph"] in REQUIRED, e
        assert REQUIRED[e["ph"]] <= e.keys(), e
        assert isinstance(e["pid"], int)
        if e["ph"] != "M":
            assert isinstance(e["ts"], int | float) and e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] >= 0
        if e["ph"] == "C":
            assert all(isinstance(v, int | float) for v in e["args"].values())
    by_ph: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_ph[e["ph"]].append(e)
    assert len(by_ph["X"]) == len(spans)
    numeric = [
        m for m in marks if m["kind"] == "point" and m["value_type"] != "string" and m["value"] is not None
    ]
    assert len(by_ph["C"]) == len(numeric)
    assert len(by_ph["i"]) == sum(1 for m in marks if m["value_type"] == "string")
    names = {e["args"]["name"] for e in by_ph["M"] if e["name"] == "process_name"}
    assert {f"rank {s['rank']} · pid {s['pid']}" for s in spans} == names


def test_chrome_slices_nest_per_thread_and_carry_summaries(train_spool: Path, tmp_path: Path) -> None:
    events = chrome(train_spool, tmp_path, "chrome")
    spans, marks = load_records(train_spool)
    by_id = {s["id"]: s for s in spans}
    slices = [e for e in events if e["ph"] == "X"]
    # exact ns timing relative to the first record: durations equal the spool's
    for e in slices:
        s = by_id[e["args"]["id"]]
        assert round(e["dur"] * 1000) == s["end_ns"] - s["start_ns"]
        assert (e["pid"], e["tid"]) == (s["pid"], s["thread_id"])
    well_formed(slices)
    epochs = [e for e in slices if e["name"] == "epoch"]
    for e in epochs:
        summary = [m for m in marks if m["span_id"] == e["args"]["id"] and m["kind"] == "summary"]
        assert e["args"]["summary.accuracy"] == summary[-1]["value"]
        assert e["args"]["index"] in (0, 1)
    counters = [e for e in events if e["ph"] == "C" and e["name"] == "loss"]
    losses = sorted(m["value"] for m in marks if m["name"] == "loss")
    assert sorted(c["args"]["loss"] for c in counters) == losses


def otlp_lines(spool: Path, tmp_path: Path) -> list[dict[str, Any]]:
    target = tmp_path / "requests.jsonl"
    result = cli("export", str(spool), "--format", "otlp-json", "-o", str(target))
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in target.read_text().splitlines()]


def test_otlp_json_is_the_otlp_json_encoding(train_spool: Path, tmp_path: Path) -> None:
    lines = otlp_lines(train_spool, tmp_path)
    spans, _ = load_records(train_spool)
    seen = []
    for doc in lines:
        for rs in doc["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                assert ss["scope"]["name"] == "cirron_otel"
                for span in ss["spans"]:
                    # OTLP/JSON: hex ids (not base64), integer enums, lowerCamelCase
                    assert len(span["traceId"]) == 32 and len(span["spanId"]) == 16
                    int(span["traceId"], 16)
                    assert span["kind"] == 1
                    seen.append(span["spanId"])
        # and it reads back as the protobuf message
        back = json.loads(json.dumps(doc))
        for rs in back["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    span["traceId"] = _b64(span["traceId"])
                    span["spanId"] = _b64(span["spanId"])
                    if "parentSpanId" in span:
                        span["parentSpanId"] = _b64(span["parentSpanId"])
                    for link in span.get("links", []):
                        link["traceId"], link["spanId"] = _b64(link["traceId"]), _b64(link["spanId"])
        json_format.ParseDict(back, ExportTraceServiceRequest())
    assert sorted(seen) == sorted(s["id"][:16] for s in spans)


def _b64(hex_id: str) -> str:
    import base64

    return base64.b64encode(bytes.fromhex(hex_id)).decode()


# -- the mapping equals the live one ---------------------------------------------------------

# What the spool cannot carry back (see otlp_map's docstring): never compared.
NOT_IN_SPOOL_SPAN_ATTRS = {"thread.name", "code.function.name", "code.file.path", "code.line.number"}
NOT_IN_SPOOL_RESOURCE = {"host.name", "service.instance.id"}


def normalized(requests: list[ExportTraceServiceRequest]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for request in requests:
        for rs in request.resource_spans:
            resource = {
                kv.key: json_format.MessageToDict(kv.value)
                for kv in rs.resource.attributes
                if kv.key not in NOT_IN_SPOOL_RESOURCE
            }
            for ss in rs.scope_spans:
                for span in ss.spans:
                    d = json_format.MessageToDict(span)
                    d["attributes"] = {
                        a["key"]: a["value"]
                        for a in d.get("attributes", [])
                        if a["key"] not in NOT_IN_SPOOL_SPAN_ATTRS
                    }
                    for ev in d.get("events", []):
                        ev["attributes"] = {
                            a["key"]: a["value"]
                            for a in ev.get("attributes", [])
                            if a["key"] != "exception.stacktrace"
                        }
                    d["resource"] = resource
                    d["scope"] = json_format.MessageToDict(ss.scope)
                    assert span.span_id.hex() not in out, "a span twice"
                    out[span.span_id.hex()] = d
    return out


LIVE = TRAIN.replace(
    "ci.profile(output_dir=sys.argv[1],", "ci.profile(output_dir=sys.argv[1], output='spool,otlp',"
).replace(  # an inference request: a root in the spool, a trace linked to the session
    "os.waitpid(pid, 0)\n",
    "os.waitpid(pid, 0)\n"
    "@ci.inference\n"
    "def complete(prompt):\n"
    "    return {'usage': {'prompt_tokens': 3, 'completion_tokens': 5}}\n"
    "with ci.scope('serve'):\n"
    "    complete('hello')\n",
)
assert "ci.inference" in LIVE


def test_otlp_mapping_equals_the_live_export(grpc_receiver: Any, tmp_path: Path) -> None:
    out = tmp_path / "cirron"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint,
        "OTEL_SERVICE_NAME": "live-vs-spool",
        "RANK": "3",
        "OTEL_SPAN_EVENT_COUNT_LIMIT": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", LIVE, str(out)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    spans, _ = load_records(out)
    grpc_receiver.wait_for_spans(len(spans), timeout=20)
    live = normalized(list(grpc_receiver.requests))
    from cirron_otel.cli.otlp_map import Limits, iter_parts

    limits = Limits(events=1)  # as OTEL_SPAN_EVENT_COUNT_LIMIT=1 above
    mine = normalized(
        [
            ExportTraceServiceRequest.FromString(p.data)
            for _, p in iter_parts(out, {"service_name": "live-vs-spool", "limits": limits})
        ]
    )
    assert mine.keys() == live.keys()
    (request,) = [s for s in live.values() if s["name"] == "request"]
    assert "parentSpanId" not in request and request["links"], request  # as live, linked
    assert any(s["droppedEventsCount"] for s in live.values() if "droppedEventsCount" in s)  # the limit bit
    for span_id, expected in live.items():
        assert mine[span_id] == expected, span_id


def test_malformed_and_unreadable_files(train_spool: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(train_spool, out)
    paths = sorted((out / "spool").glob("*.json"))
    paths[0].write_text("{truncated")
    target = tmp_path / "t.json"
    result = cli("export", str(out), "--format", "chrome", "-o", str(target))
    assert result.exit_code == 0 and f"{paths[0].name}: skipped: not strict JSON" in result.stderr
    doc = json.loads(paths[1].read_text())
    doc["spans"][0].pop("start_ns")
    paths[1].write_text(json.dumps(doc))
    for fmt in ("chrome", "otlp-json"):
        target.unlink(missing_ok=True)
        result = cli("export", str(out), "--format", fmt, "-o", str(target))
        assert result.exit_code == 1 and "cirron-otel validate" in result.stderr
        assert not target.exists()  # no partial file
    assert cli("replay", str(out), "--dry-run").exit_code == 1


OVERLAP = """
import sys
import cirron_otel as ci
ci.profile(output_dir=sys.argv[1], install_signal_handlers=False)
def held():
    with ci.scope("held"):  # opened here, closed by the second next(): inside "later"
        yield
        ci.mark("note", "in held")
g = held()
next(g)
with ci.scope("later"):
    with ci.scope("inner"):
        next(g, None)
ci.shutdown()
"""


def test_overlapping_slices_of_one_thread_go_to_a_lane_of_their_own(tmp_path: Path) -> None:
    out = tmp_path / "cirron"
    run_python(OVERLAP, str(out))
    spans, _ = load_records(out)
    held, later = (next(s for s in spans if s["name"] == n) for n in ("held", "later"))
    assert held["start_ns"] < later["start_ns"] < held["end_ns"] < later["end_ns"]  # the overlap
    events = chrome(out, tmp_path)
    slices = {e["name"]: e for e in events if e["ph"] == "X"}
    well_formed(slices.values())
    tid = held["thread_id"]
    lanes = {(e["tid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert (tid, f"thread {tid}") in lanes
    (lane,) = {t for t, name in lanes if name == f"thread {tid} · overlapping 1"}
    assert lane < 0  # never a real thread's id
    assert slices["held"]["tid"] == tid and slices["later"]["tid"] == lane  # started later: moved
    assert slices["inner"]["tid"] == lane  # nests in "later", on its lane
    assert slices["cirron.session"]["tid"] == tid
    (note,) = (e for e in events if e["ph"] == "i" and e["name"] == "note")
    (mark,) = (m for m in load_records(out)[1] if m["name"] == "note")
    owner = next(s for s in spans if s["id"] == mark["span_id"])
    assert note["tid"] == slices[owner["name"]]["tid"]  # drawn on its span's track
