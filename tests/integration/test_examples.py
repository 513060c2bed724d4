"""The README's demo runs as documented and writes a spool that a strict reader accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.helpers import spans_and_marks

ROOT = Path(__file__).resolve().parents[2]


def test_training_demo(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), "--epochs", "3", "--batches", "4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    # trace() prints the closed spans as cirron-sdk does: epochs are the roots (the session is open)
    assert r.stdout.splitlines()[1].startswith("epoch[0] — ")
    assert "validation failed" in r.stdout
    spans, marks = spans_and_marks(tmp_path / ".cirron")
    names = [s["name"] for s in spans]
    assert names.count("epoch") == 3 and names.count("batch") == 12
    assert names.count("forward") == names.count("backward") == 12
    failed = [s for s in spans if s["attrs"].get("error")]
    assert [s["name"] for s in failed] == ["validate"]
    losses = [m["value"] for m in marks if m["name"] == "loss"]
    assert len(losses) == 12 and losses[-1] < losses[0]  # it really learns
    summaries = {m["name"] for m in marks if m["kind"] == "summary"}
    assert summaries == {"val_loss", "train_loss"}
