"""`ci.trace()`: the live session's closed spans and their marks as a tree, dicts or JSON."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from . import _native
from ._version import __version__

Node = dict[str, Any]


def _records(batches: Sequence[_native.Batch]) -> tuple[list[Node], list[Node]]:
    if not batches:
        return [], []
    # The spool encoder is the one place records become JSON; reuse it rather than keep a
    # second conversion in sync.
    doc = json.loads(_native.encode_spool(batches, "0" * 32, 0, __version__))
    return doc["spans"], doc["marks"]


def _duration(span: Node) -> str:
    if span.get("end_ns") is None:
        return "open"
    us = max(0, (span["end_ns"] - span["start_ns"]) // 1000)
    if us < 1000:
        return f"{us}us"
    if us < 1_000_000:
        return f"{us / 1000:.1f}ms"
    return f"{us / 1_000_000:.2f}s"


def _mark_text(mark: Node) -> str:
    value = mark["value"]
    if value is None and "value_nonfinite" in mark:
        return mark["value_nonfinite"]
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:39] + "…")
    return str(value)


def _marks_suffix(marks: list[Node]) -> str:
    if not marks:
        return ""
    last: dict[str, Node] = {}
    counts: dict[str, int] = defaultdict(int)
    for m in marks:
        last[m["name"]] = m
        counts[m["name"]] += 1
    parts = []
    for key, m in last.items():
        n = counts[key]
        parts.append(f"{key}={_mark_text(m)}" + (f" (x{n}, last)" if n > 1 else ""))
    return " {" + ", ".join(parts) + "}"


def _build(spans: list[Node], marks: list[Node], session: _native.Scope | None) -> list[Node]:
    by_span: dict[str, list[Node]] = defaultdict(list)
    for m in marks:
        by_span[m["span_id"]].append(m)
    nodes: dict[str, Node] = {}
    for s in spans:
        nodes[s["id"]] = {**s, "marks": by_span.get(s["id"], []), "children": []}
    if session is not None and session.id not in nodes:
        nodes[session.id] = {
            "id": session.id,
            "name": session.name,
            "parent_id": session.parent_id,
            "index": None,
            "start_ns": session.start_ns,
            "end_ns": None,
            "attrs": dict(session.attrs),
            "marks": by_span.get(session.id, []),
            "children": [],
        }
    roots: list[Node] = []
    for node in sorted(nodes.values(), key=lambda n: (n["start_ns"] or 0)):
        parent = nodes.get(node["parent_id"] or "")
        (parent["children"] if parent is not None else roots).append(node)
    return roots


def _find(roots: list[Node], name: str) -> list[Node]:
    found: list[Node] = []
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        if node["name"] == name:
            found.append(node)
            continue
        stack.extend(reversed(node["children"]))
    return found


def _tree_lines(node: Node, depth: int, out: list[str]) -> None:
    label = node["name"] if node.get("index") is None else f"{node['name']}[{node['index']}]"
    attrs = node.get("attrs") or {}
    error = ""
    if attrs.get("error"):
        error = f" !{attrs.get('error.type', 'error')}: {attrs.get('error.message', '')}"
    out.append(f"{'  ' * depth}{label} — {_duration(node)}{_marks_suffix(node['marks'])}{error}")
    for child in node["children"]:
        _tree_lines(child, depth + 1, out)


def _public(node: Node) -> Node:
    end = node.get("end_ns")
    return {
        "id": node["id"],
        "name": node["name"],
        "index": node.get("index"),
        "parent_id": node.get("parent_id"),
        "start_ns": node["start_ns"],
        "end_ns": end,
        "duration_ns": None if end is None else end - node["start_ns"],
        "attrs": node.get("attrs", {}),
        "marks": [
            {k: m[k] for k in ("id", "name", "value", "value_type", "kind", "ts_ns", "attrs")}
            | ({"value_nonfinite": m["value_nonfinite"]} if "value_nonfinite" in m else {})
            for m in node["marks"]
        ],
        "children": [_public(c) for c in node["children"]],
    }


def render(
    batches: Sequence[_native.Batch],
    session: _native.Scope | None,
    *,
    format: str = "tree",
    name: str | None = None,
    last: int | None = None,
) -> Any:
    if format not in ("tree", "dict", "json"):
        raise ValueError(f"cirron_otel.trace(): format must be 'tree', 'dict' or 'json', got {format!r}")
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
        raise ValueError(f"cirron_otel.trace(): last must be a non-negative int, got {last!r}")
    spans, marks = _records(batches)
    roots = _build(spans, marks, session)
    if name is not None:
        roots = _find(roots, name)
    if last is not None:
        roots = roots[-last:] if last else []
    if format == "tree":
        lines: list[str] = []
        for root in roots:
            _tree_lines(root, 0, lines)
        return "\n".join(lines)
    dicts = [_public(r) for r in roots]
    return dicts if format == "dict" else json.dumps(dicts)
