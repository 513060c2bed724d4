"""Attribute values are captured at the call, and no attribute
object ever carries two equal keys (in the spool JSON or over OTLP).

The drainer renders attrs later, on its own thread; these tests mutate what was passed
right after the call and compare what reached the spool / an OTLP receiver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import cirron_otel as ci
from tests.support.helpers import read_spool, spans_and_marks

pytestmark = pytest.mark.timeout(120)


def _start(out: Path, **kwargs: Any) -> ci.Profiler:
    return ci.profile(
        output_dir=str(out), flush_interval=60, install_signal_handlers=False, tracer_provider=None, **kwargs
    )


def test_mark_attrs_are_captured_at_the_call(out: Path) -> None:
    _start(out)  # flush_interval=60: nothing is rendered before the mutations below
    lst, nested, tags, buf = [1, 2], {"a": [1], "b": {"c": 1}}, {"x"}, bytearray(b"ab")
    tup = (1, [2])
    ci.mark("m", 1.0, lst=lst, nested=nested, tags=tags, buf=buf, tup=tup)
    lst.append(3)
    nested["a"].append(2)
    nested["b"]["c"] = 2
    nested["new"] = True
    tags.add("y")
    buf += b"cd"
    tup[1].append(3)
    assert ci.flush()
    _, marks = spans_and_marks(out)
    (m,) = marks
    assert m["attrs"] == {
        "lst": [1, 2],
        "nested": {"a": [1], "b": {"c": 1}},
        "tags": "{'x'}",
        "buf": "bytearray(b'ab')",
        "tup": [1, [2]],
    }


def test_scope_attrs_are_captured_at_the_call_and_at_close(out: Path) -> None:
    _start(out)
    tags = ["a"]
    with ci.scope("s", tags=tags) as s:
        tags.append("during")  # after scope(): not seen
        late = [1]
        s.attrs["late"] = late  # set through the handle: captured when the scope closes
        held = s.attrs
    late.append(2)
    held["after_close"] = 1  # a dict reference obtained while open, used after close
    s.attrs["after_close_2"] = 2
    with ci.scope("plain", k=[1]) as p:  # never handed out: the record shares the dict
        pass
    p.attrs["k"].append(2)  # the handle's view after close is its own
    p.attrs["x"] = 1
    assert ci.flush()
    spans, _ = spans_and_marks(out)
    by = {x["name"]: x for x in spans}
    assert by["s"]["attrs"] == {"tags": ["a"], "late": [1]}
    assert by["plain"]["attrs"] == {"k": [1]}


def test_cycles_and_deep_nesting_still_degrade_to_str(out: Path) -> None:
    _start(out)
    cyc: list[Any] = [1]
    cyc.append(cyc)
    deep: Any = 0
    for _ in range(100):
        deep = [deep]
    ci.mark("c", 1, cyc=cyc, deep=deep)
    cyc.append("later")
    assert ci.flush()
    _, (m,) = spans_and_marks(out)
    assert m["attrs"]["cyc"] == [1, "[1, [...]]"]
    depth, node = 0, m["attrs"]["deep"]
    while isinstance(node, list):
        node, depth = node[0], depth + 1
    assert isinstance(node, str) and depth < 40


def _raw_attr_objects(out: Path) -> list[str]:
    """The raw JSON text of every batch file (json.loads would silently keep the last duplicate)."""
    return [p.read_text() for p in sorted((out / "spool").glob("*.json"))]


def _pairs_hook(seen: list[list[str]]):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen.append([k for k, _ in pairs])
        return dict(pairs)

    return hook


class _Key:
    """Distinct dict keys that all print as "k"."""

    def __str__(self) -> str:
        return "k"


DUPS = {
    1: "int",
    "1": "str",
    None: "none",
    "None": "strnone",
    2.5: "float",
    (1, 2): "tuple",
    "(1, 2)": "strtuple",
    _Key(): "first k",
    _Key(): "second k",
}


def test_no_duplicate_keys_in_the_spool(out: Path) -> None:
    _start(out)
    ci.mark("d", 1, d=dict(DUPS), nested={"x": {1: "a", "1": "b"}})
    with ci.scope("s") as s:
        s.attrs[7] = "int7"
        s.attrs["7"] = "str7"
    assert ci.flush()
    read_spool(out)  # strict parse and schema
    objects: list[list[str]] = []
    for text in _raw_attr_objects(out):
        json.loads(text, object_pairs_hook=_pairs_hook(objects))
    assert objects and all(len(keys) == len(set(keys)) for keys in objects), objects
    spans, (m,) = spans_and_marks(out)
    # a str key wins over a non-str key written the same way
    # otherwise the first in the dict's order
    assert m["attrs"]["d"] == {
        "1": "str",
        "None": "strnone",
        "2.5": "float",
        "(1, 2)": "strtuple",
        "k": "first k",
    }
    assert m["attrs"]["nested"] == {"x": {"1": "b"}}
    assert next(x for x in spans if x["name"] == "s")["attrs"] == {"7": "str7"}


def test_no_duplicate_keys_over_otlp(out: Path, grpc_receiver) -> None:
    _start(out, otlp_endpoint=grpc_receiver.endpoint, otlp_protocol="grpc")
    with ci.scope("s") as s:
        s.attrs[7] = "int7"
        s.attrs["7"] = "str7"
        s.attrs[None] = "none"
        ci.mark("p", 1.0, plain=[1, 2])
    ci.shutdown()
    grpc_receiver.wait_for_spans(2)
    (span,) = [
        x
        for r in grpc_receiver.requests
        for rs in r.resource_spans
        for ss in rs.scope_spans
        for x in ss.spans
        if x.name == "s"
    ]
    keys = [kv.key for kv in span.attributes]
    assert len(keys) == len(set(keys)), keys
    attrs = {kv.key: kv.value.string_value for kv in span.attributes}
    assert attrs["7"] == "str7" and attrs["None"] == "none"
