"""`ci.trace()`: the live session's closed spans and their marks, in cirron-sdk 0.3.0's shapes."""

from __future__ import annotations

import json
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


def render(
    batches: Sequence[_native.Batch],
    session: _native.Scope | None,
    *,
    format: str = "tree",
    name: str | None = None,
    last: int | None = None,
) -> Any:
    """cirron-sdk 0.3.0's `trace()`: its closed spans (the open session root is not among them,
    as in the SDK), `name` keeping matching spans with their descendants, `last=N` the N most
    recently closed spans; "tree" printed in a script (returns None) and returned as a rich
    object in Jupyter, "dict" as {"roots", "span_count"}, "json" that as text, "df" a DataFrame."""
    from . import _sdk_render as r

    if format not in ("tree", "dict", "json", "df"):
        raise ValueError(f"trace(format={format!r}) is not valid; expected 'tree', 'dict', 'json', or 'df'")
    if last is not None and (isinstance(last, bool) or not isinstance(last, int)):
        raise ValueError(f"cirron_otel.trace(): last must be an int, got {last!r}")
    spans, marks = _records(batches)
    if name is not None:
        spans = r.filter_name(spans, name)
    if last is not None:
        spans = r.filter_last(spans, last)
    keep = {s["id"] for s in spans}
    by_span = {k: v for k, v in r.by_span(marks).items() if k in keep}
    if format == "tree":
        text = r.tree_text(spans, by_span)
        if r.in_jupyter():
            return r.TraceText(text)
        print(text)
        return None
    if format == "df":
        try:
            import pandas as pd
        except ImportError as exc:
            from .errors import CirronDependencyError

            raise CirronDependencyError(
                "cirron_otel.trace(format='df') requires pandas. Install with: pip install pandas"
            ) from exc
        return pd.DataFrame(r.df_rows(spans, by_span))
    tree = r.dict_tree(spans, by_span)
    return tree if format == "dict" else json.dumps(tree)
