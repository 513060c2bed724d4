"""The OTLP encoder's event store (otlp.c): the events of open spans share one buffer,
chained per span, and are compacted after each batch. Spans left open across many
`otlp_encode` calls and batches, spans of two threads interleaved, the event limit dropping
the oldest, and an exception event counting toward that limit all decode with
opentelemetry-proto to exactly the events recorded, in order. Run in a subprocess: the
session and rings are process-wide."""

from __future__ import annotations

import json

from tests.support.helpers import run_script

PROGRAM = """
import json, threading
from cirron_otel import _native
import cirron_otel as ci
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

LIMIT = 6
_native.configure(otlp=True)
_native.session_begin({})
state = _native.OtlpState(LIMIT)
spans = {}

def encode():
    while (b := _native.drain(100_000)) is not None:
        for req, _ in _native.otlp_encode(state, [b], b"", "cirron_otel", "1"):
            msg = ExportTraceServiceRequest.FromString(req)
            assert len(msg.SerializeToString()) == len(req)  # canonical lengths
            for rs in msg.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        values = [e.attributes[0].value.double_value for e in s.events if e.name == "m"]
                        spans[s.name] = {"values": values, "names": [e.name for e in s.events],
                                         "dropped": s.dropped_events_count}

v = 0.0
def marks(n):
    global v
    out = []
    for _ in range(n):
        v += 1.0
        ci.mark("m", v)
        out.append(v)
    return out

expected = {}
long_scope = ci.scope("long")  # open across many calls and batches, over the limit
long_scope.__enter__()
seen = marks(2)
for call in range(5):
    for k in range(40):  # short spans close around it in every batch: the buffer is compacted
        with ci.scope(f"short-{call}-{k}"):
            expected[f"short-{call}-{k}"] = marks(3)
    seen += marks(2)
    encode()
    assert "long" not in spans
long_scope.__exit__(None, None, None)
expected["long"] = seen[-LIMIT:]
expected["long-dropped"] = len(seen) - LIMIT

two = ci.scope("few")  # open across calls, under the limit
two.__enter__()
few = marks(2)
encode()
few += marks(1)
two.__exit__(None, None, None)
expected["few"] = few

# two threads' spans open at once, their marks in one batch before either closes
barrier = threading.Barrier(2)
def worker(name):
    with ci.scope(name):
        barrier.wait()
        local = [float(i) for i in range(4)]
        for x in local:
            ci.mark("m", x)
        barrier.wait()
    expected[name] = local
threads = [threading.Thread(target=worker, args=(f"thread-{i}",)) for i in range(2)]
for t in threads: t.start()
for t in threads: t.join()

# an exception event counts toward the limit: the oldest mark goes to make room for it
try:
    with ci.scope("failed"):
        failed = marks(LIMIT)
        raise ValueError("boom")
except ValueError:
    pass
expected["failed"] = failed[1:]
encode()
print(json.dumps({"expected": expected, "spans": spans,
                  "open": state.open_spans, "events_dropped": state.events_dropped}))
"""


def test_events_of_open_spans_survive_compaction_in_order_under_the_limit() -> None:
    r = run_script(PROGRAM, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    expected, spans = res["expected"], res["spans"]
    shorts = [name for name in expected if name.startswith("short-")]
    assert len(shorts) == 200
    for name in shorts:
        assert spans[name] == {"values": expected[name], "names": ["m"] * 3, "dropped": 0}, name
    assert spans["long"]["values"] == expected["long"]
    assert spans["long"]["dropped"] == expected["long-dropped"] > 0
    assert spans["few"] == {"values": expected["few"], "names": ["m"] * 3, "dropped": 0}
    for name in ("thread-0", "thread-1"):
        assert spans[name]["values"] == expected[name]
    assert spans["failed"]["values"] == expected["failed"]
    assert spans["failed"]["names"] == ["m"] * 5 + ["exception"]
    assert spans["failed"]["dropped"] == 1
    assert res["events_dropped"] == expected["long-dropped"]
    assert res["open"] <= 1  # the session, at most: every closed span's entry went
