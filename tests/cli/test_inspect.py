"""`cirron-otel inspect`, and the command-line skeleton itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from .conftest import cli, load_records, run_python, write_train_spool


def test_entry_points_and_help(train_spool: Path) -> None:
    bindir = Path(sys.executable).parent
    for argv in ([str(bindir / "cirron-otel")], [sys.executable, "-m", "cirron_otel"]):
        proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, check=True)
        for command in ("inspect", "validate", "export", "replay", "tail"):
            assert command in proc.stdout
        proc = subprocess.run([*argv, "inspect", "--json", str(train_spool)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["files"] > 0


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli("inspect").exit_code == 2  # missing PATH
    assert cli("inspect", str(tmp_path / "absent")).exit_code == 2
    assert cli("no-such-command").exit_code == 2
    assert cli("inspect", "--top", "0", str(tmp_path)).exit_code == 2


def test_import_cirron_otel_loads_no_cli() -> None:
    proc = run_python(
        "import sys, cirron_otel; print(sorted(m for m in sys.modules "
        "if m.startswith(('click', 'cirron_otel.cli'))))"
    )
    assert proc.stdout.strip() == "[]"


def test_inspect_counts_match_the_records(train_spool: Path) -> None:
    result = cli("inspect", "--json", str(train_spool))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    spans, marks = load_records(train_spool)
    files = list((train_spool / "spool").glob("*.json"))
    assert doc["files"] == len(files)
    assert doc["bytes"] == sum(f.stat().st_size for f in files)
    assert (doc["spans"], doc["marks"]) == (len(spans), len(marks))
    for name in {s["name"] for s in spans}:
        mine = [s for s in spans if s["name"] == name]
        stats = doc["span_names"][name]
        assert stats["count"] == len(mine)
        assert stats["total_ns"] == sum(s["end_ns"] - s["start_ns"] for s in mine)
        assert stats["max_ns"] == max(s["end_ns"] - s["start_ns"] for s in mine)
    assert doc["span_names"]["validate"]["errors"] == 2  # one per rank
    loss = [m for m in marks if m["name"] == "loss"]
    assert doc["mark_names"]["loss"]["count"] == len(loss) == 12
    assert doc["mark_names"]["loss"]["min"] == min(m["value"] for m in loss)
    assert doc["mark_names"]["loss"]["max"] == max(m["value"] for m in loss) == 1.0
    assert doc["mark_names"]["loss"]["last"] == max(loss, key=lambda m: m["ts_ns"])["value"]
    # non-finite values are counted, not folded into min/max
    assert doc["mark_names"]["grad_norm"]["nonfinite"] == 4
    assert doc["mark_names"]["grad_norm"]["min"] == doc["mark_names"]["grad_norm"]["max"] == 2.0
    assert doc["mark_names"]["inf"]["last"] == "-inf"
    assert doc["mark_names"]["accuracy"]["summary"] == 4
    assert doc["drops"]["root_marks"] == 2  # "before_profile", one per rank
    top = [t["name"] for t in doc["top_scopes"]]
    assert "cirron.session" not in top
    assert [t["total_ns"] for t in doc["top_scopes"]] == sorted(
        (t["total_ns"] for t in doc["top_scopes"]), reverse=True
    )


def test_inspect_sessions_per_process_and_rank(train_spool: Path) -> None:
    doc = json.loads(cli("inspect", "--json", str(train_spool)).stdout)
    spans, _ = load_records(train_spool)
    sessions = {(s["pid"], s["rank"]): s for s in spans if s["name"] == "cirron.session"}
    assert len(sessions) == 4  # two ranks, each with a forked child
    listed = {(s["pid"], s["rank"]): s for s in doc["sessions"]}
    assert listed.keys() == sessions.keys()
    assert {s["rank"] for s in doc["sessions"]} == {0, 1}
    for key, record in sessions.items():
        assert listed[key]["start_ns"] == record["start_ns"]
        assert listed[key]["duration_ns"] == record["end_ns"] - record["start_ns"]
        assert listed[key]["closed"] is True
        assert listed[key]["host"] == "node-a"
    children = [s for s in doc["sessions"] if s["parent_session_id"]]
    assert len(children) == 2


def test_inspect_text_output(train_spool: Path) -> None:
    result = cli("inspect", str(train_spool))
    assert result.exit_code == 0
    for heading in ("Sessions", "Top scopes by total time", "Marks", "Drops"):
        assert heading in result.stdout
    assert "node-a" in result.stdout and "loss" in result.stdout


def test_inspect_unreadable_file_exits_1_and_says_which(tmp_path: Path) -> None:
    out = write_train_spool(tmp_path / "cirron")
    bad = out / "spool" / f"{'9' * 20}-{'a' * 32}.json"
    bad.write_text('{"spans": [NaN]}')
    result = cli("inspect", "--json", str(out))
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["unreadable_files"][0]["file"] == bad.name
    assert doc["spans"] > 0  # the rest is still summarised


def test_inspect_a_spool_still_being_written_and_one_file(tmp_path: Path) -> None:
    out = tmp_path / "cirron"
    run_python(
        """
        import os, sys, cirron_otel as ci
        ci.profile(output_dir=sys.argv[1], install_signal_handlers=False)
        with ci.scope("step"):
            ci.mark("x", 1.5)
        ci.flush()
        os._exit(0)   # killed: no session record
    """,
        str(out),
    )
    (out / "spool" / "00000000000000000001-partial.json.tmp").write_text("{")
    doc = json.loads(cli("inspect", "--json", str(out / "spool")).stdout)
    assert doc["files"] == 1 and doc["sessions"][0]["closed"] is False
    one = next((out / "spool").glob("*.json"))
    assert json.loads(cli("inspect", "--json", str(one)).stdout)["marks"] == 1
    assert math.isclose(json.loads(cli("inspect", "--json", str(one)).stdout)["mark_names"]["x"]["max"], 1.5)
    assert os.path.exists(out / "spool" / "00000000000000000001-partial.json.tmp")  # a reader deletes nothing
