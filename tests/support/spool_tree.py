"""The spool's spans as a tree of (name, index, attrs, children), and its snapshot records
normalized: what the framework-hook tests compare (tests/unit/test_torch_hooks_logic.py,
tests/integration/test_torch_hooks.py, test_snapshots.py, the Trainer and Keras tests)."""

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
    """(name, index, attrs, children) under the session span, in start order (attrs: `_attrs`)."""
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for s in records:
        kids.setdefault(s["parent_id"], []).append(s)

    def node(s: dict[str, Any]) -> tuple[Any, ...]:
        return (s["name"], s["index"], _attrs(s["attrs"]), [node(c) for c in kids.get(s["id"], [])])

    (session,) = [s for s in records if s["name"] == root_name]
    return [node(c) for c in kids.get(session["id"], [])]


def marks(spool_dir: Path) -> list[dict[str, Any]]:
    """Every mark of the spool's JSON files, in time order."""
    out: list[dict[str, Any]] = []
    for path in sorted(spool_dir.glob("*.json")):
        out.extend(json.loads(path.read_text())["marks"])
    return sorted(out, key=lambda m: m["ts_ns"])


def marked_tree(spool_dir: Path, root_name: str = "cirron.session") -> tuple[Any, ...]:
    """The session as (name, index, attrs, marks, children), marks as (name, kind, value) on the
    span they were made in; attrs as `tree` has them, the session's less `pid`."""
    records, by_span = spans(spool_dir), {}
    for m in marks(spool_dir):
        by_span.setdefault(m["span_id"], []).append((m["name"], m["kind"], m["value"]))
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for s in records:
        kids.setdefault(s["parent_id"], []).append(s)

    def node(s: dict[str, Any]) -> tuple[Any, ...]:
        attrs = _attrs(s["attrs"])
        if s["name"] == root_name:
            attrs.pop("pid", None)
        children = [node(c) for c in kids.get(s["id"], [])]
        return (s["name"], s["index"], attrs, by_span.get(s["id"], []), children)

    (session,) = [s for s in records if s["name"] == root_name]
    return node(session)


def _attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """data_load_ns (a duration) checked to be an int and replaced by "<ns>"."""
    out = dict(attrs)
    if "data_load_ns" in out:
        assert isinstance(out["data_load_ns"], int) and out["data_load_ns"] >= 0
        out["data_load_ns"] = "<ns>"
    return out


def snapshot_records(out: Path) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The snapshot records of the spool under the output dir `out`, in file order, with ids and
    times dropped, the epoch span id as "epoch<index>" and blob_uri relative to the output dir;
    and the blob files' bytes."""
    epochs = {s["id"]: f"epoch{s['index']}" for s in spans(out / "spool") if s["name"] == "epoch"}
    records = []
    for path in sorted((out / "spool").glob("*.json")):
        for r in json.loads(path.read_text())["snapshots"]:
            r = {k: v for k, v in r.items() if k not in ("id", "ts_ns")}
            assert r["span_id"] in epochs, "a snapshot links to its epoch span"
            if r["blob_uri"] is not None:
                prefix = (out / "snapshots" / r["span_id"]).resolve().as_uri() + "/"
                assert r["blob_uri"].startswith(prefix), r["blob_uri"]
                r["blob_uri"] = r["blob_uri"][len(prefix) :]
            r["span_id"] = epochs[r["span_id"]]
            records.append(r)
    blobs = {
        f"{epochs[p.parent.name]}/{p.name}": p.read_bytes() for p in sorted((out / "snapshots").glob("*/*"))
    }
    return records, blobs
