"""SIGKILL loop: a flat-out producer killed at random moments, again and again, in one output
directory. Every batch file left is strict, schema-valid JSON; mark ids never repeat across
files; temporary files of killed writers are removed by the next start-up and never counted;
a final clean run leaves none."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cirron_otel.exporters.schema import loads_strict

from tests.support.helpers import read_spool, run_script, validate

pytestmark = pytest.mark.timeout(240)

KILLS = 22
LOOP_SECONDS = 90.0  # bound on the whole loop (the machine may be shared and slow)
MAX_BYTES = 40_000_000  # keeps the directory (and the final strict parse) small

PRODUCER = textwrap.dedent("""
    import sys
    import cirron_otel as ci
    ci.profile(output_dir=sys.argv[1], flush_interval=0.02, spool_max_bytes=int(sys.argv[2]))
    print("ready", flush=True)
    i = 0
    while True:                     # flat out until killed
        with ci.scope("step", i, note="n"):
            for j in range(10):
                ci.mark("m", i * 10 + j, tag="t")
        i += 1
""")


def _check_newest(spool: Path, checked: set[str], newest: int = 1) -> None:
    """Strictly parse and validate the newest batch file (the one a kill could have cut):
    the byte cap may evict them before the end of the loop."""
    names = sorted(p.name for p in spool.glob("*.json")) if spool.exists() else []
    for name in [n for n in names[-newest:] if n not in checked]:
        try:
            raw = (spool / name).read_bytes()
        except FileNotFoundError:
            continue
        doc = loads_strict(raw)
        validate(doc)
        assert name == f"{doc['created_ns']:020d}-{doc['batch_id']}.json"
        checked.add(name)


def _tmp_files(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.glob("*.tmp")) if spool.exists() else []


def test_sigkill_loop_leaves_only_whole_files_and_unique_ids(tmp_path):
    out = tmp_path / "cirron"
    spool = out / "spool"
    seed = int(os.environ.get("CIRRON_TEST_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    kills = 0
    stale_seen: set[str] = set()  # .tmp names found right after a kill
    removed_at_startup = 0
    checked: set[str] = set()
    deadline = time.monotonic() + LOOP_SECONDS
    while kills < KILLS:
        assert time.monotonic() < deadline, f"loop too slow: {kills} kills (seed {seed})"
        left = set(_tmp_files(spool))
        proc = subprocess.Popen(
            [sys.executable, "-c", PRODUCER, str(out), str(MAX_BYTES)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
            # The previous run's stale temps are gone once this one has started.
            removed_at_startup += len(left - set(_tmp_files(spool)))
            assert not left & set(_tmp_files(spool)), f"stale .tmp survived a start-up (seed {seed})"
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        stale_seen.update(_tmp_files(spool))
        _check_newest(spool, checked)
    assert kills >= 20

    # A clean run: removes what the last kill left, does not count it, and ends normally.
    left = _tmp_files(spool)
    r = run_script(
        f"""
        import json, os
        import cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, spool_max_bytes={MAX_BYTES}, install_signal_handlers=False)
        h = ci.health()
        on_disk = sum(os.path.getsize(os.path.join(h["spool_dir"], n)) for n in os.listdir(h["spool_dir"])
                      if n.endswith(".json"))
        print(json.dumps({{"stale_removed": h["sinks"]["spool"]["stale_tmp_removed"],
                           "spool_bytes": h["spool_bytes"], "on_disk": on_disk}}))
        with ci.scope("final"):
            ci.mark("final", 1)
        ci.shutdown()
    """,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert final["stale_removed"] == len(left)
    assert final["spool_bytes"] == final["on_disk"]  # no .tmp counted
    assert _tmp_files(spool) == []

    docs = read_spool(out)  # every file strict JSON + schema-valid; asserts no .tmp is left
    mark_ids = [m["id"] for d in docs for m in d["marks"]]
    span_ids = [s["id"] for d in docs for s in d["spans"]]
    assert len(mark_ids) == len(set(mark_ids)), f"duplicate mark ids (seed {seed})"
    assert len(span_ids) == len(set(span_ids)), f"duplicate span ids (seed {seed})"
    assert len({s["pid"] for d in docs for s in d["spans"]}) >= 2  # several killed runs wrote
    assert any(s["name"] == "final" for d in docs for s in d["spans"])
    # Stale temps really were produced by the kills and cleaned at the next start-up.
    assert removed_at_startup + len(left) == len(stale_seen) > 0, (seed, stale_seen)
    print(
        f"seed {seed}: {kills} kills, {len(stale_seen)} stale .tmp left by kills, "
        f"{len(docs)} files, {len(mark_ids)} marks"
    )
