"""The spool's spans as a tree of (name, index, attrs, children): what the framework-hook tests
compare (tests/unit/test_torch_hooks_logic.py, tests/integration/test_torch_hooks.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def spans(spool_dir: Path) -> list[dict[str, Any]]:
    """Every span of the spool's JSON files, in start order."""
    out: list[dict[str, Any]] = []
    for path in sorted(spool_dir.glob("*.json")):
        out.extend(json.loads(path.read_text())["spans"])
    return sorted(out, key=lambda s: s["start_ns"])


def tree(records: list[dict[str, Any]], root_name: str = "cirron.session") -> list[Any]:
    """(name, index, attrs, children) under the session span, in start order; data_load_ns
    (a duration) checked to be an int and replaced by "<ns>"."""
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for s in records:
        kids.setdefault(s["parent_id"], []).append(s)

    def node(s: dict[str, Any]) -> tuple[Any, ...]:
        attrs = dict(s["attrs"])
        if "data_load_ns" in attrs:
            assert isinstance(attrs["data_load_ns"], int) and attrs["data_load_ns"] >= 0
            attrs["data_load_ns"] = "<ns>"
        return (s["name"], s["index"], attrs, [node(c) for c in kids.get(s["id"], [])])

    (session,) = [s for s in records if s["name"] == root_name]
    return [node(c) for c in kids.get(session["id"], [])]
