"""The OTLP encoder's length prefixes (pb.h): a nested message reserves one byte for its
length (a span two) and is moved when the length needs another size; the request's outer
headers are written in front of its body. Messages of every length class (under
128 bytes, up to 16 KiB, beyond) at every nesting level (AnyValue, KeyValue, Event, Span, the
request's ScopeSpans) decode with opentelemetry-proto to exactly what was recorded. Run in a
subprocess: the session and rings are process-wide."""

from __future__ import annotations

import json

from tests.support.helpers import run_script

PROGRAM = """
import json
from cirron_otel import _native
import cirron_otel as ci
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

_native.configure(otlp=True)
_native.session_begin({})
state = _native.OtlpState(128)
sizes = [0, 1, 100, 120, 126, 127, 128, 129, 200, 1000, 16250, 16383, 16384, 16385, 70000]
expected = []
for n in sizes:
    # one string attribute of n bytes on the span and on an event; the span also gets enough
    # small attributes to cross 128 and 16 KiB bytes as a whole
    attrs = {f"k{i:03d}": "v" * (n % 97) for i in range(1 + n // 150)}
    with ci.scope(f"s{n}", big="x" * n, **attrs):
        ci.mark("m", 1.5, note="y" * n)
    expected.append({"name": f"s{n}", "big": n, "attrs": min(len(attrs) + 1, 128), "event_note": n})
got = []
requests = 0
while (b := _native.drain(100_000)) is not None:
    for req, _ in _native.otlp_encode(state, [b], b"", "cirron_otel", "1", max_request_bytes=150_000):
        requests += 1
        msg = ExportTraceServiceRequest.FromString(req)
        assert len(msg.SerializeToString()) == len(req)  # canonical lengths: none padded
        for rs in msg.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    if s.name == "cirron.session":
                        continue
                    a = {kv.key: kv.value.string_value for kv in s.attributes}
                    (ev,) = [e for e in s.events if e.name == "m"]
                    note = {kv.key: kv.value.string_value for kv in ev.attributes}["note"]
                    assert a["big"] == "x" * len(a["big"]) and note == "y" * len(note)
                    assert all(v == "v" * len(v) for k, v in a.items() if k.startswith("k"))
                    got.append({"name": s.name, "big": len(a["big"]),
                                "attrs": sum(1 for k in a if k == "big" or k.startswith("k")),
                                "event_note": len(note)})
print(json.dumps({"expected": expected, "got": got, "requests": requests}))
"""


def test_every_length_class_decodes_exactly() -> None:
    r = run_script(PROGRAM, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["requests"] >= 2  # the request cut too
    assert sorted(res["got"], key=lambda s: s["big"]) == res["expected"]


SPANS_ONLY = """
import json
from cirron_otel import _native
import cirron_otel as ci
from cirron_otel.exporters.otlp import encode_resource
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

# no span attributes: a span without events is then under 128 bytes unless its name is long
_native.configure(otlp=True, span_attr_limit=0)
_native.session_begin({})
state = _native.OtlpState(128)
resource = {"service.name": "lengths", "blob": "r" * 300}
sizes = [0, 1, 40, 60, 80, 100, 200, 16200, 16300, 16400, 70000]
for n in sizes:
    with ci.scope("s" + "n" * n):
        pass
got, requests, wire = [], 0, []
while (b := _native.drain(100_000)) is not None:
    for req, spans in _native.otlp_encode(state, [b], encode_resource(resource), "cirron_otel", "1",
                                          max_request_bytes=50_000):
        requests += 1
        msg = ExportTraceServiceRequest.FromString(req)
        assert len(msg.SerializeToString()) == len(req)  # canonical lengths: none padded
        for rs in msg.resource_spans:
            assert {kv.key: kv.value.string_value for kv in rs.resource.attributes} == resource
            for ss in rs.scope_spans:
                assert (ss.scope.name, ss.scope.version) == ("cirron_otel", "1")
                got += [len(s.name) - 1 for s in ss.spans if s.name != "cirron.session"]
                assert all(s.name[1:] == "n" * (len(s.name) - 1) for s in ss.spans if s.name[0] == "s")
                wire += [s.ByteSize() for s in ss.spans]
print(json.dumps({"expected": sizes, "got": got, "requests": requests, "wire": wire}))
"""


def test_spans_of_every_length_class_without_events_and_a_resource() -> None:
    """The span's two reserved length bytes (pb_begin2): shorter spans move left a byte,
    longer ones right; the request's outer headers are written in front of its body."""
    r = run_script(SPANS_ONLY, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["requests"] >= 2
    assert sorted(res["got"]) == res["expected"]
    classes = {0 if n < 128 else 1 if n < 16384 else 2 for n in res["wire"]}
    assert classes == {0, 1, 2}, res["wire"]
