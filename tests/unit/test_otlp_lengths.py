"""The OTLP encoder's length prefixes (pb.h): a nested message reserves one byte for its
length and is moved right when the length needs more. Messages of every length class (under
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
