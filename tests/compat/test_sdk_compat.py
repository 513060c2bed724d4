"""The same cirron-sdk 0.3.0 scripts under cirron-sdk and under cirron_otel: the spool records
field by field (ids, timestamps, pids and thread ids aside; our `trace_id` and the
`gen_ai.*` attributes of request spans are the documented additions), and what `trace()`,
`health()` and the rest returned.

A broken copy of the package can be checked against these (never break the shared tree):
`cp -r src/cirron_otel /tmp/brk-compat/`, break it, run with PYTHONPATH=/tmp/brk-compat.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from . import scripts

pytest.importorskip("cirron", reason="cirron-sdk 0.3.0 is a test dependency (the test-core extra)")

MODULES = ("cirron", "cirron_otel")
TIMES = {"start_ns", "end_ns", "ts_ns", "created_ns", "wall_us", "thread_id", "pid", "batch_id"}
# marks whose values are timings (differ run to run)
TIMED_MARKS = {"time_to_first_token_ms", "request_duration_ms", "tokens_per_second", "chunk_ms"}


# These scripts use no framework. cirron-sdk imports torch at profile() whenever it is
# installed (hooks, the session's device attributes); we only look at a torch the program has
# imported (README, compatibility). So both run as without torch / tensorflow / transformers
# installed: with torch in the environment the SDK's session would gain `mixed_precision` and
# its health `installed_hooks: ["torch"]`. (The PyTorch hooks: tests/integration/test_torch_hooks.py.)
NO_FRAMEWORKS = """import sys
for _name in ("torch", "tensorflow", "transformers"):  # find_spec -> None, import -> ImportError
    sys.modules[_name] = None
"""


def run(
    script: str, module: str, tmp: Path, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], str, Path]:
    cwd = tmp / module
    cwd.mkdir()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CIRRON_", "OTEL_"))}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", NO_FRAMEWORKS + script, module],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{module}: {proc.stderr[-3000:]}"
    lines = [x for x in proc.stdout.splitlines() if x.startswith("@@")]
    result = json.loads(lines[-1][2:]) if lines else {}
    return result, proc.stdout, cwd


def spool(cwd: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"spans": [], "marks": [], "snapshots": [], "headers": []}
    for path in sorted((cwd / ".cirron" / "spool").glob("*.json")):
        doc = json.loads(path.read_text())
        out["headers"].append({k: v for k, v in doc.items() if k not in ("spans", "marks", "snapshots")})
        for key in ("spans", "marks", "snapshots"):
            out[key].extend(doc[key])
    return out


def normalize(records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Ids replaced by the span's rank in start order, times and per-process values dropped."""
    spans = sorted(records["spans"], key=lambda s: s["start_ns"])
    ids = {s["id"]: f"span{i}" for i, s in enumerate(spans)}
    marks = sorted(records["marks"], key=lambda m: m["ts_ns"])
    mark_ids = {m["id"]: f"mark{i}" for i, m in enumerate(marks)}

    def attrs(a: dict[str, Any]) -> dict[str, Any]:
        return {
            k: ("<id>" if k == "request_id" else ("<pid>" if k == "pid" else v))
            for k, v in a.items()
            if not k.startswith("gen_ai.")
        }

    out_spans = []
    for s in spans:
        s = {k: v for k, v in s.items() if k not in TIMES and k != "trace_id"}
        s["id"] = ids[s["id"]]
        s["parent_id"] = ids.get(s["parent_id"], s["parent_id"] and "<outside>")
        s["mark_ids"] = sorted(mark_ids.get(m, m) for m in s["mark_ids"])
        s["attrs"] = attrs(s["attrs"])
        out_spans.append(s)
    out_marks = []
    for m in marks:
        m = {k: v for k, v in m.items() if k not in TIMES}
        m["id"], m["span_id"] = mark_ids[m["id"]], ids.get(m["span_id"], "<outside>")
        if m["name"] in TIMED_MARKS:
            m["value"] = "<timing>"
        m["attrs"] = attrs(m["attrs"])
        out_marks.append(m)
    headers = [{k: v for k, v in h.items() if k not in TIMES} for h in records["headers"]]
    return {
        "spans": out_spans,
        "marks": out_marks,
        "snapshots": records["snapshots"],
        "header_keys": sorted({k for h in headers for k in h}),
        "schema": {h["schema_version"] for h in headers},
    }


def tree(doc: Any) -> Any:
    """trace(format='dict') with ids and times dropped (structure, names, attrs, marks kept)."""
    if isinstance(doc, dict):
        return {
            k: (tree(v) if k != "attrs" else {a: b for a, b in v.items() if a != "pid"})
            for k, v in doc.items()
            if k not in TIMES | {"id", "parent_id"}
        }
    if isinstance(doc, list):
        return [tree(x) for x in doc]
    return doc


@pytest.fixture
def both(tmp_path: Path):
    def go(script: str, env: dict[str, str] | None = None) -> dict[str, tuple[dict[str, Any], str, Path]]:
        return {m: run(script, m, tmp_path, env) for m in MODULES}

    return go


def test_training_script_spool_is_the_sdks(both) -> None:
    res = both(scripts.TRAINING, {"CIRRON_RUN_ID": "run-42", "RANK": "3"})
    sdk, ours = (normalize(spool(res[m][2])) for m in MODULES)
    assert ours["spans"] == sdk["spans"]
    assert ours["marks"] == sdk["marks"]
    assert ours["snapshots"] == sdk["snapshots"]
    assert ours["header_keys"] == sdk["header_keys"] and ours["schema"] == sdk["schema"]
    session = next(s for s in ours["spans"] if s["name"] == "cirron.session")
    assert session["attrs"] == {"pid": "<pid>", "rank": 3, "cirron.run_id": "run-42", "device": "cpu"}


def test_training_script_trace_returns_the_sdks(both) -> None:
    res = both(scripts.TRAINING)
    sdk, ours = res["cirron"][0], res["cirron_otel"][0]
    for key in ("dict", "json", "name", "last", "last0", "dict_after"):
        assert tree(ours[key]) == tree(sdk[key]), key
    assert ours["dict"]["span_count"] == sdk["dict"]["span_count"] == 21

    def walls(nodes: list[dict[str, Any]]) -> list[bool]:  # wall_us is the duration in µs
        return [
            n["wall_us"] == (n["end_ns"] - n["start_ns"]) // 1000 and all(walls(n["children"])) for n in nodes
        ]

    assert all(walls(ours["dict"]["roots"])) and all(walls(sdk["dict"]["roots"]))
    assert ours["df_columns"] == sdk["df_columns"] and ours["df_rows"] == sdk["df_rows"]
    assert ours["tree_returns"] == sdk["tree_returns"] == "None"  # printed in a script
    assert ours["profile_again_same"] is sdk["profile_again_same"] is True
    assert ours["config"] == sdk["config"] == ["stats", 0.5, 0.5]


def _printed_tree(stdout: str) -> list[str]:
    # trace() printed the tree; durations differ run to run
    import re

    lines = [x for x in stdout.splitlines() if not x.startswith("@@")]
    return [re.sub(r" — [0-9.]+(us|ms|s)", " — <t>", x) for x in lines]


def test_training_script_prints_the_sdks_tree(both) -> None:
    res = both(scripts.TRAINING)
    assert _printed_tree(res["cirron_otel"][1]) == _printed_tree(res["cirron"][1])


@pytest.mark.parametrize("env", [{}, {"CIRRON_RUN_ID": "run-42"}], ids=["standalone", "run-id"])
def test_health_has_the_sdks_keys_and_meanings(both, env: dict[str, str]) -> None:
    res = both(scripts.TRAINING, env)
    for when in ("health", "health_after"):
        sdk, ours = res["cirron"][0][when], res["cirron_otel"][0][when]
        assert set(sdk) <= set(ours), set(sdk) - set(ours)
        for key in sdk:
            if when == "health_after" and key in ("spool_dir", "spool_bytes"):
                # the SDK forgets the stopped profiler; ours keeps the last run's spool (README)
                assert sdk[key] in (None, 0) and ours[key]
            elif key == "transport" and env and when == "health":
                # a run id makes the SDK stream to the Cirron platform; there is no platform
                # transport here (README, compatibility): spans stay in the spool / OTLP
                assert (ours[key], sdk[key]) == ("FileOnlyTransport", "EventStreamTransport")
            elif key == "spool_bytes":
                assert (ours[key] > 0) == (sdk[key] > 0), when
            elif key == "spool_dir" and sdk[key] is not None:
                assert os.path.normpath(ours[key]) == os.path.normpath(sdk[key])
            else:
                assert ours[key] == sdk[key], (when, key)


def test_disabled_health_is_the_sdks(both) -> None:
    res = both(scripts.DISABLED)
    sdk, ours = res["cirron"][0]["health"], res["cirron_otel"][0]["health"]
    assert {k: ours[k] for k in sdk} == sdk


@pytest.mark.parametrize("script", [scripts.INFERENCE, scripts.ASYNC_INFERENCE], ids=["sync", "async"])
def test_inference_spool_is_the_sdks(both, script: str) -> None:
    res = both(script)
    assert res["cirron_otel"][0] == res["cirron"][0]
    sdk, ours = (normalize(spool(res[m][2])) for m in MODULES)
    requests = [s["parent_id"] for s in ours["spans"] if s["name"] == "request"]
    assert requests and set(requests) == {None}  # roots, as the SDK's
    assert ours["spans"] == sdk["spans"]
    assert ours["marks"] == sdk["marks"]


def test_inference_request_spans_carry_gen_ai_attributes(both) -> None:
    res = both(scripts.INFERENCE)
    requests = [s for s in spool(res["cirron_otel"][2])["spans"] if s["name"] == "request"]
    by_rid = sorted(requests, key=lambda s: s["start_ns"])
    assert by_rid[0]["attrs"]["gen_ai.usage.input_tokens"] == 3
    assert by_rid[0]["attrs"]["gen_ai.usage.output_tokens"] == 5
    assert by_rid[1]["attrs"]["gen_ai.usage.output_tokens"] == 3  # the streamed chunks


def test_config_errors_wrap_and_watch_as_the_sdk(both) -> None:
    res = both(scripts.CONFIG)
    assert res["cirron_otel"][0] == res["cirron"][0]
    sdk, ours = (normalize(spool(res[m][2])) for m in MODULES)
    assert ours["spans"] == sdk["spans"] and ours["marks"] == sdk["marks"]


def test_cirron_yaml_profiling_section_and_environment(tmp_path: Path) -> None:
    script = r"""
import json, sys
ci = __import__(sys.argv[1])
ci.profile()
d = ci.get_default()
print("@@" + json.dumps([d.snapshots, d.sample_rate, d.flush_interval]))
ci.shutdown()
"""
    results = {}
    for m in MODULES:
        cwd = tmp_path / m
        (cwd / "sub").mkdir(parents=True)
        (cwd / "cirron.yaml").write_text(
            "name: m\nframework: pytorch\ntype: regression\nversion: '1'\n"
            "profiling:\n  snapshots: sampled\n  sample_rate: 0.3\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CIRRON_", "OTEL_"))}
        env["CIRRON_FLUSH_INTERVAL"] = "0.7"
        proc = subprocess.run(
            [sys.executable, "-c", script, m],
            cwd=cwd / "sub",
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        results[m] = json.loads(proc.stdout.split("@@")[-1])
    assert results["cirron_otel"] == results["cirron"] == ["sampled", 0.3, 0.7]


def test_output_stdout_lines_are_the_sdks(both) -> None:
    res = both(scripts.OUTPUT_STDOUT)
    assert _printed_tree(res["cirron_otel"][1]) == _printed_tree(res["cirron"][1]) != []


def test_output_none_writes_nothing(both) -> None:
    res = both(scripts.OUTPUT_NONE)
    assert res["cirron_otel"][0] == res["cirron"][0] == {"spool": False}


def test_every_public_sdk_name_exists() -> None:
    import cirron

    import cirron_otel

    missing = [n for n in cirron.__all__ if not hasattr(cirron_otel, n)]
    assert missing == []


@pytest.mark.parametrize(
    "name, args",
    [
        ("load", ("ds",)),
        ("map", (len,)),
        ("secret", ("k",)),
        ("env", ("HOME",)),
        ("deps", ()),
        ("load_cirron_yaml", ()),
    ],
)
def test_what_is_not_instrumentation_fails_clearly(name: str, args: tuple[Any, ...]) -> None:
    import cirron_otel as ci

    with pytest.raises(ci.CirronNotProvided, match=f"cirron_otel.{name}: .*not part of cirron-otel"):
        getattr(ci, name)(*args)
    assert issubclass(ci.CirronNotProvided, ci.CirronError)
    assert issubclass(ci.CirronNotProvided, NotImplementedError)


def test_trace_df_without_pandas_names_pandas(tmp_path: Path) -> None:
    script = r"""
import sys
sys.modules["pandas"] = None  # as if not installed
import cirron_otel as ci
ci.profile()
with ci.scope("s"):
    pass
try:
    ci.trace(format="df")
except ci.CirronDependencyError as e:
    print("@@", e)
ci.shutdown()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert "@@" in proc.stdout and "pandas" in proc.stdout.split("@@")[1], proc.stderr


def test_trace_tree_is_a_rich_object_in_jupyter(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import types

    from cirron_otel import _sdk_render

    class ZMQInteractiveShell:  # what a Jupyter kernel's get_ipython() returns
        pass

    fake = types.ModuleType("IPython")
    fake.get_ipython = ZMQInteractiveShell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert _sdk_render.in_jupyter()
    import cirron_otel as ci

    shown = ci.trace()
    assert isinstance(shown, _sdk_render.TraceText) and capsys.readouterr().out == ""
    assert repr(shown) == str(shown)


@pytest.mark.parametrize(
    "text, error",
    [("profiling: [1\n", "Malformed"), ("- 1\n", "mapping"), ("profiling:\n  snapshots: all\n", None)],
)
def test_bad_cirron_yaml_fails_at_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, error: str | None
) -> None:
    import cirron_otel as ci
    from cirron_otel import _config

    (tmp_path / "cirron.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    if error is None:  # a value the SDK's model refuses: ValueError, as pydantic's there
        with pytest.raises(ValueError, match="snapshots"):
            _config.sdk_profiling(
                _config.SDK_DEFAULTS,
                config=None,
                frameworks=None,
                snapshots=None,
                sample_rate=None,
                flush_interval=None,
                path=None,
            )
    else:
        with pytest.raises(ci.CirronYamlError, match=error):
            _config.load_cirron_yaml_profiling()


def test_profiler_handle_and_an_explicit_cirron_instance(both) -> None:
    res = both(scripts.HANDLE, {"CIRRON_RUN_ID": "r7"})
    assert res["cirron_otel"][0] == res["cirron"][0]
    assert res["cirron"][0]["ctx"] == {"run_id": "r7"} and res["cirron"][0]["spool_files"] is True


HOME_CONFIG_SCRIPT = r"""
import json, sys
ci = __import__(sys.argv[1])
ci.profile()
ci.mark("m", 1)
d = ci.get_default()
ci.shutdown()
print("@@" + json.dumps([d.snapshots, d.sample_rate, d.flush_interval, d.output_dir, d.spool_max_bytes]))
"""


SDK_DEFAULT_VIEW = ["stats", 0.01, 1.0, "./.cirron/", 1_000_000_000]


@pytest.mark.parametrize(
    "toml, env, expected",
    [
        (  # every layer: a bool is no number (default 1.0), a string int coerces, env wins
            'workspace = "x"\n[default]\noutput_dir = "./from-toml/"\nsnapshots = "full"\n'
            'sample_rate = 0.2\nflush_interval = true\nspool_max_bytes = "1048576"\n',
            {"CIRRON_SAMPLE_RATE": "0.4"},
            ["full", 0.4, 1.0, "./from-toml/", 1048576],
        ),
        ("[default\nsnapshots = 'full'\n", {}, SDK_DEFAULT_VIEW),  # malformed: ignored
        ('[default]\nsnapshots = "all"\nsample_rate = "a lot"\n', {}, SDK_DEFAULT_VIEW),  # values ignored
    ],
)
def test_home_config_toml_is_read_as_the_sdk_reads_it(
    tmp_path: Path, toml: str, env: dict[str, str], expected: list[Any]
) -> None:
    home = tmp_path / "home"
    (home / ".cirron").mkdir(parents=True)
    (home / ".cirron" / "config.toml").write_text(toml)
    results = {}
    for m in MODULES:
        results[m] = run(HOME_CONFIG_SCRIPT, m, tmp_path, {"HOME": str(home), **env})
    sdk, ours = results["cirron"][0], results["cirron_otel"][0]
    assert ours == sdk
    assert ours == expected
    for m in MODULES:  # the spool is where the resolved output_dir says
        assert list((tmp_path / m / ours[3] / "spool").glob("*.json")), m
    if "[default\n" in toml:  # the SDK is silent about a broken file; we say so, once
        from cirron_otel import _config, _warn

        _warn.reset()
        with pytest.warns(_warn.CirronWarning, match=r"config\.toml ignored: TOMLDecodeError"):
            assert _config.sdk_home_config(home / ".cirron" / "config.toml") == {}


def test_scope_handle_lists_its_marks_as_the_sdks(both) -> None:
    """`Scope.marks`: the ids of the marks recorded directly on the scope (not its children's),
    while open and once closed, the same ids as the spool's `mark_ids`."""
    res = both(scripts.SCOPE_MARKS)
    assert res["cirron_otel"][0] == res["cirron"][0]
    assert res["cirron"][0]["a_open"] == ["m1", "m3"] and res["cirron"][0]["b"] == ["w", "w", "w"]


def test_scope_handle_fields_are_the_sdks(both) -> None:
    res = both(scripts.SCOPE_HANDLE, {"RANK": "2"})
    assert res["cirron_otel"][0] == res["cirron"][0]
    assert res["cirron"][0]["other_thread"]["thread"] is True and res["cirron"][0]["open"]["rank"] == 2
