"""Helpers the tests import: the strict, schema-checked spool reader and a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
from cirron_otel.exporters.schema import loads_strict, spool_v1_schema

jsonschema.Draft202012Validator.check_schema(spool_v1_schema())
# fastjsonschema compiles the schema to Python: fast enough to check every record of
# 100,000-record files; tests/unit/test_schema.py also runs the reference validator.
validate = fastjsonschema.compile(spool_v1_schema())


def read_spool(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every batch in `<output_dir>/spool`, oldest first, parsed strictly and schema-validated."""
    spool = Path(output_dir) / "spool"
    if not spool.exists():
        return []
    batches = []
    for path in sorted(spool.glob("*.json")):
        raw = path.read_bytes()
        doc = loads_strict(raw)
        validate(doc)
        assert path.name == f"{doc['created_ns']:020d}-{doc['batch_id']}.json"
        batches.append(doc)
    assert not list(spool.glob("*.tmp")), "a .json.tmp file was left behind"
    return batches


def spans_and_marks(output_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spans: list[dict[str, Any]] = []
    marks: list[dict[str, Any]] = []
    for doc in read_spool(output_dir):
        spans.extend(doc["spans"])
        marks.extend(doc["marks"])
    return spans, marks


def run_script(
    code: str,
    *,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (for fork, signals, exit paths, import checks)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )


def drained_batch(scopes: int) -> Any:
    """A `_native.Batch` of `scopes` scopes with two marks each (3 records a scope), recorded
    and collected by hand, without a profiler: what a sink is handed."""
    import cirron_otel as ci
    from cirron_otel import _native

    while _native.drain(1_000_000) is not None:  # whatever earlier tests left in the rings
        pass
    for i in range(scopes):
        with ci.scope("s"):
            ci.mark("m", i)
            ci.mark("m2", i)
    batch = _native.drain(1_000_000)
    assert batch is not None and batch.span_count == scopes and batch.mark_count == 2 * scopes
    return batch


def counter_growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that changed between two snapshots (e.g. health()['swallowed_errors']),
    by how much."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
