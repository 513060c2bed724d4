"""`cirron-otel validate`: sound spools pass; each kind of damage is found, with file and record."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cirron_otel.exporters.schema import spool_v1_schema

from cirron_otel.cli import schema_check

from .conftest import cli, run_python, write_train_spool


def problems(out: Path) -> list[dict[str, str]]:
    result = cli("validate", "--json", str(out))
    doc = json.loads(result.stdout)
    assert result.exit_code == (1 if doc["problems"] else 0)
    return doc["problems"]


def test_library_spools_are_valid(train_spool: Path) -> None:
    result = cli("validate", str(train_spool))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: ")


def test_many_files_and_session_marks_over_the_list_cap(tmp_path: Path) -> None:
    # > 1,000 marks on the session: its mark_ids is cut and mark_ids_omitted says how many more
    out = tmp_path / "cirron"
    run_python(
        """
        import sys, cirron_otel as ci
        ci.profile(output_dir=sys.argv[1], install_signal_handlers=False, flush_interval=0.01)
        for i in range(1500):
            ci.mark("m", i)
            if i % 300 == 0:
                with ci.scope("s"):
                    ci.mark("inner", i)
                ci.flush()
        ci.shutdown()
    """,
        str(out),
    )
    assert len(list((out / "spool").glob("*.json"))) > 3
    assert problems(out) == []


Doc = dict[str, Any]


def damage(out: Path, edit: Callable[[list[Doc]], None]) -> list[Path]:
    """Apply `edit` to the spool's parsed files (oldest first) and write them back."""
    paths = sorted((out / "spool").glob("*.json"))
    docs = [json.loads(p.read_bytes()) for p in paths]
    edit(docs)
    for p, d in zip(paths, docs, strict=True):
        p.write_text(json.dumps(d))
    return paths


def _find(docs: list[Doc], key: str, pred: Callable[[Doc], bool]) -> tuple[int, int, Doc]:
    for fi, d in enumerate(docs):
        for ri, r in enumerate(d[key]):
            if pred(r):
                return fi, ri, r
    raise AssertionError(f"no such {key}")


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return write_train_spool(tmp_path / "cirron")


def test_nan_token_is_not_json(spool: Path) -> None:
    path = sorted((spool / "spool").glob("*.json"))[-1]
    path.write_text(
        path.read_text()
        .replace('"value":null,"value_nonfinite":"nan"', '"value":NaN', 1)
        .replace('"end_ns":', '"end_ns":Infinity,"x":', 1)
    )
    found = problems(spool)
    # first the file itself; then what its lost records leave dangling elsewhere
    assert found[0]["file"] == path.name and found[0]["record"] == ""
    assert "not strict JSON" in found[0]["message"] and "Infinity" in found[0]["message"]
    assert all(p["file"] != path.name for p in found[1:])


def test_truncated_file(spool: Path) -> None:
    path = sorted((spool / "spool").glob("*.json"))[0]
    path.write_bytes(path.read_bytes()[:-10])
    assert [p["file"] for p in problems(spool)] == [path.name]


def test_schema_violations_name_the_record(spool: Path) -> None:
    state: dict[str, Any] = {}

    def edit(docs: list[Doc]) -> None:
        fi, ri, span = _find(docs, "spans", lambda s: s["name"] == "forward")
        span["start_ns"] = "yesterday"
        fj, rj, mark = _find(docs, "marks", lambda m: m["name"] == "loss")
        mark["value"] = "high"  # a float mark with a string value
        state.update(span=(fi, f"spans[{ri}].start_ns"), mark=(fj, f"marks[{rj}]"))

    paths = damage(spool, edit)
    found = {(p["file"], p["record"]) for p in problems(spool)}
    assert (paths[state["span"][0]].name, state["span"][1]) in found
    assert (paths[state["mark"][0]].name, state["mark"][1]) in found


def test_file_name_must_match_the_batch(spool: Path) -> None:
    path = sorted((spool / "spool").glob("*.json"))[0]
    path.rename(path.with_name(f"{'0' * 20}-{'b' * 32}.json"))
    assert "file name does not match" in problems(spool)[0]["message"]


@pytest.mark.parametrize(
    "case",
    [
        "mark_on_missing_span",
        "dangling_parent",
        "missing_listed_mark",
        "unlisted_mark",
        "duplicate_span",
        "duplicate_mark_across_files",
        "span_ends_before_start",
        "mark_outside_span",
    ],
)
def test_referential_damage(spool: Path, case: str) -> None:
    expect: dict[str, Any] = {}
    ghost = "f" * 32

    def edit(docs: list[Doc]) -> None:
        if case == "mark_on_missing_span":
            fi, ri, m = _find(docs, "marks", lambda m: m["name"] == "bytes")
            m["span_id"] = ghost
            expect.update(file=fi, record=f"marks[{ri}].span_id", text=ghost)
        elif case == "dangling_parent":
            fi, ri, s = _find(docs, "spans", lambda s: s["name"] == "validate")
            s["parent_id"] = ghost
            expect.update(file=fi, record=f"spans[{ri}].parent_id", text=ghost)
        elif case == "missing_listed_mark":
            fi, ri, m = _find(docs, "marks", lambda m: m["name"] == "bytes")
            del docs[fi]["marks"][ri]
            fs, rs, _ = _find(docs, "spans", lambda s: m["id"] in s["mark_ids"])
            expect.update(file=fs, record=f"spans[{rs}].mark_ids", text=m["id"])
        elif case == "unlisted_mark":
            fs, rs, s = _find(docs, "spans", lambda s: s["name"] == "io")
            mid = s["mark_ids"].pop()
            fi, ri, _ = _find(docs, "marks", lambda m: m["id"] == mid)
            expect.update(file=fi, record=f"marks[{ri}]", text="does not list it")
        elif case == "duplicate_span":
            fi, ri, s = _find(docs, "spans", lambda s: s["name"] == "child_step")
            docs[-1]["spans"].append({**s, "mark_ids": []})
            record = f"spans[{len(docs[-1]['spans']) - 1}]"
            expect.update(file=len(docs) - 1, record=record, text="duplicate span id")
        elif case == "duplicate_mark_across_files":
            fi, ri, m = _find(docs, "marks", lambda m: m["name"] == "child_value")
            target = (fi + 1) % len(docs)
            docs[target]["marks"].append(dict(m))
            later = max(fi, target)
            record = f"marks[{ri}]" if later == fi else f"marks[{len(docs[target]['marks']) - 1}]"
            expect.update(file=later, record=record, text="duplicate mark id")
        elif case == "span_ends_before_start":
            fi, ri, s = _find(docs, "spans", lambda s: s["name"] == "forward" and s["mark_ids"] != [])
            s["end_ns"], s["start_ns"] = s["start_ns"], s["end_ns"]
            expect.update(file=fi, record=f"spans[{ri}]", text="before it starts")
        elif case == "mark_outside_span":
            fi, ri, m = _find(docs, "marks", lambda m: m["name"] == "loss")
            m["ts_ns"] += 10**12
            fs, rs, _ = _find(docs, "spans", lambda s: s["id"] == m["span_id"])
            expect.update(file=fs, record=f"spans[{rs}]", text="outside its time range")

    paths = damage(spool, edit)
    found = problems(spool)
    assert any(
        p["file"] == paths[expect["file"]].name
        and p["record"] == expect["record"]
        and expect["text"] in p["message"]
        for p in found
    ), found


def test_text_output_lists_file_and_record(spool: Path) -> None:
    damage(spool, lambda docs: docs[0]["spans"][0].update(parent_id="e" * 32))
    result = cli("validate", str(spool))
    assert result.exit_code == 1
    first = result.stdout.splitlines()[0]
    assert first.startswith(sorted((spool / "spool").glob("*.json"))[0].name + ":spans[0].parent_id: ")


def test_schema_checker_agrees_with_jsonschema(train_spool: Path) -> None:
    reference = jsonschema.Draft202012Validator(spool_v1_schema())
    docs = [json.loads(p.read_bytes()) for p in (train_spool / "spool").glob("*.json")]
    doc = max(docs, key=lambda d: min(len(d["spans"]), len(d["marks"])))
    variants: list[Doc] = [doc]
    for mutate in (
        lambda d: d["marks"][0].update(value_type="int", value=1.5),
        lambda d: d["marks"][0].update(value_type="bool", value=1),
        lambda d: d["marks"][0].update(value_type="float", value=None),
        lambda d: d["marks"][0].update(value_type="float", value=None, value_nonfinite="nan"),
        lambda d: d["marks"][0].update(value_type="int", value=None, value_nonfinite="nan"),
        lambda d: d["marks"][0].update(span_id="root"),
        lambda d: d["marks"][0].update(span_id="ROOT"),
        lambda d: d["marks"][0].update(kind="gauge"),
        lambda d: d["spans"][0].update(parent_id=None, index=True),
        lambda d: d["spans"][0].update(pid=0),
        lambda d: d["spans"][0].update(mark_ids_omitted=0),
        lambda d: d["spans"][0].pop("attrs"),
        lambda d: d.update(schema_version=True),
        lambda d: d.update(snapshots=[{"id": "a" * 32}]),
    ):
        v = json.loads(json.dumps(doc))
        mutate(v)
        variants.append(v)
    checker = schema_check.checker()
    for v in variants:
        mine = list(schema_check.batch_errors(v))
        assert (not mine) == reference.is_valid(v), (mine, list(reference.iter_errors(v))[:1])
        # the fast yes/no path and the one that says why agree, record by record
        for key, ref in (("spans", "#/$defs/span"), ("marks", "#/$defs/mark")):
            for record in v[key]:
                schema = checker.sub(ref)
                assert checker.compiled(schema)(record) == checker.valid(schema, record)


def test_a_mark_after_its_span_is_checked_too(spool: Path) -> None:
    """A mark in a later file than its span (unusual, not wrong): valid when listed and inside
    the span; reported with its record when it falls outside."""
    moved: dict[str, Any] = {}

    def move(docs: list[Doc]) -> None:
        fi, ri, m = _find(docs, "marks", lambda m: m["name"] == "bytes")
        del docs[fi]["marks"][ri]
        docs[-1]["marks"].append(m)
        moved.update(mark=m, index=len(docs[-1]["marks"]) - 1)

    damage(spool, move)
    assert problems(spool) == []

    def shift(docs: list[Doc]) -> None:
        docs[-1]["marks"][moved["index"]]["ts_ns"] += 10**12

    paths = damage(spool, shift)
    found = problems(spool)
    assert len(found) == 1 and "outside its time range" in found[0]["message"]
    assert f"{paths[-1].name}:marks[{moved['index']}]" in found[0]["message"]


def test_session_with_a_partial_mark_list(tmp_path: Path) -> None:
    out = tmp_path / "cirron"
    run_python(
        """
        import sys, cirron_otel as ci
        ci.profile(output_dir=sys.argv[1], install_signal_handlers=False)
        for i in range(1200):
            ci.mark("m", i)
        ci.shutdown()
    """,
        str(out),
    )

    def drop_listed(docs: list[Doc]) -> None:
        _, _, session = _find(docs, "spans", lambda s: s.get("mark_ids_omitted"))
        fi, ri, _ = _find(docs, "marks", lambda m: m["id"] == session["mark_ids"][5])
        del docs[fi]["marks"][ri]

    damage(out, drop_listed)
    found = problems(out)
    messages = " | ".join(p["message"] for p in found)
    assert "is not in the spool" in messages and "more were left out, but 1199 marks attach" in messages
