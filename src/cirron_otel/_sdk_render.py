"""cirron-sdk 0.3.0's read-back shapes: `trace()`'s tree text, dict, JSON and DataFrame, and the
one-line span summaries of the `log` / `stdout` outputs. Spans and marks come in as spool
records (dicts), as they do in the SDK's trace buffer.
"""

from __future__ import annotations

from typing import Any

Span = dict[str, Any]
Mark = dict[str, Any]


def wall_us(span: Span) -> int | None:
    start, end = span.get("start_ns"), span.get("end_ns")
    if start is None or end is None:
        return None
    return max(0, (end - start) // 1000)


def _duration(us: int | None) -> str:
    if us is None:
        return "open"
    if us < 1000:
        return f"{us}us"
    if us < 1_000_000:
        return f"{us / 1000:.1f}ms"
    return f"{us / 1_000_000:.2f}s"


def _marks_text(marks: list[Mark]) -> str:
    if not marks:
        return ""
    parts: list[str] = []
    for m in marks:
        name, value = m.get("name", "?"), m.get("value")
        if value is None:
            token = m.get("value_nonfinite")
            parts.append(f"{name}={token}" if token else f"{name}=None")
        elif isinstance(value, float):
            parts.append(f"{name}={value:.4f}")
        else:
            parts.append(f"{name}={value}")
    return " {" + ", ".join(parts) + "}"


def span_line(span: Span, marks: list[Mark] | None = None) -> str:
    name, index = span.get("name", "?"), span.get("index")
    label = f"{name}[{index}]" if index is not None else str(name)
    return f"{label} — {_duration(wall_us(span))}{_marks_text(marks or [])}"


def by_span(marks: list[Mark]) -> dict[str, list[Mark]]:
    out: dict[str, list[Mark]] = {}
    for m in marks:
        if m.get("span_id") is not None:
            out.setdefault(m["span_id"], []).append(m)
    return out


def filter_name(spans: list[Span], name: str) -> list[Span]:
    """Spans named `name` and all their descendants (nested matches stay nested)."""
    children: dict[str, list[str]] = {}
    for s in spans:
        if s.get("parent_id") is not None:
            children.setdefault(s["parent_id"], []).append(s["id"])
    keep: set[str] = set()
    stack = [s["id"] for s in spans if s.get("name") == name]
    while stack:
        sid = stack.pop()
        if sid not in keep:
            keep.add(sid)
            stack.extend(children.get(sid, []))
    return [s for s in spans if s["id"] in keep]


def filter_last(spans: list[Span], last: int) -> list[Span]:
    """The `last` most recently closed spans, by end_ns (the SDK's `last=N`)."""
    if last <= 0:
        return []
    closed = [s for s in spans if s.get("end_ns") is not None]
    return sorted(closed, key=lambda s: s["end_ns"], reverse=True)[:last]


def _tree(spans: list[Span], marks: dict[str, list[Mark]]) -> list[dict[str, Any]]:
    nodes = {s["id"]: {"span": s, "marks": marks.get(s["id"], []), "children": []} for s in spans}
    roots: list[dict[str, Any]] = []
    for s in spans:
        parent = nodes.get(s.get("parent_id") or "")
        (parent["children"] if parent is not None else roots).append(nodes[s["id"]])
    for node in nodes.values():
        node["children"].sort(key=lambda n: n["span"].get("start_ns") or 0)
    roots.sort(key=lambda n: n["span"].get("start_ns") or 0)
    return roots


def tree_text(spans: list[Span], marks: dict[str, list[Mark]]) -> str:
    lines: list[str] = []

    def walk(node: dict[str, Any], depth: int) -> None:
        lines.append("  " * depth + span_line(node["span"], node["marks"]))
        for child in node["children"]:
            walk(child, depth + 1)

    for root in _tree(spans, marks):
        walk(root, 0)
    return "\n".join(lines) if lines else "(no spans)"


def _mark_node(m: Mark) -> dict[str, Any]:
    node = {"name": m.get("name"), "value": m.get("value"), "kind": m.get("kind")}
    if m.get("value_nonfinite"):
        node["value_nonfinite"] = m["value_nonfinite"]
    return node


def dict_tree(spans: list[Span], marks: dict[str, list[Mark]]) -> dict[str, Any]:
    def to_dict(node: dict[str, Any]) -> dict[str, Any]:
        s = node["span"]
        return {
            "id": s.get("id"),
            "parent_id": s.get("parent_id"),
            "name": s.get("name"),
            "index": s.get("index"),
            "start_ns": s.get("start_ns"),
            "end_ns": s.get("end_ns"),
            "wall_us": wall_us(s),
            "cpu_ns": s.get("cpu_ns"),
            "gpu_ns": s.get("gpu_ns"),
            "memory_peak_bytes": s.get("memory_peak_bytes"),
            "attrs": s.get("attrs") or {},
            "marks": [_mark_node(m) for m in node["marks"]],
            "children": [to_dict(c) for c in node["children"]],
        }

    return {"roots": [to_dict(r) for r in _tree(spans, marks)], "span_count": len(spans)}


def df_rows(spans: list[Span], marks: dict[str, list[Mark]]) -> list[dict[str, Any]]:
    ids = {s["id"]: s for s in spans}

    def depth(s: Span) -> int:
        d, cur, seen = 0, s.get("parent_id"), set()
        while cur is not None and cur in ids and cur not in seen:
            seen.add(cur)
            d += 1
            cur = ids[cur].get("parent_id")
        return d

    return [
        {
            "id": s["id"],
            "parent_id": s.get("parent_id"),
            "name": s.get("name"),
            "index": s.get("index"),
            "wall_us": wall_us(s),
            "cpu_ns": s.get("cpu_ns"),
            "gpu_ns": s.get("gpu_ns"),
            "memory_peak_bytes": s.get("memory_peak_bytes"),
            "mark_count": len(marks.get(s["id"], [])),
            "depth": depth(s),
        }
        for s in spans
    ]


class TraceText:
    """`trace()`'s tree in Jupyter: the cell shows the tree; str() and print() give the text."""

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text

    __str__ = __repr__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self._text)


def in_jupyter() -> bool:
    """A ZMQ (Jupyter) IPython kernel; a terminal IPython prints, as a script does."""
    import sys

    if "IPython" not in sys.modules:  # not running under IPython at all: do not import it
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except Exception:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
