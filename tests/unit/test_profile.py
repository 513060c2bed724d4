"""profile() / health() / flush() / shutdown() / trace(): contracts and argument checks."""

from __future__ import annotations

import json
import re
import signal
import threading

import pytest

import cirron_otel as ci
from tests.support.helpers import read_spool, run_script, spans_and_marks

REFERENCE_KEYS = {
    "enabled",
    "scope_drop_count",
    "mark_drop_count",
    "spool_drop_count",
    "spool_dir",
    "spool_bytes",
    "flush_mode",
    "flush_restart_count",
    "transport",
    "installed_hooks",
    "platform_context",
}


def test_profile_is_idempotent_and_flush_shutdown_too(out):
    p1 = ci.profile(output_dir=str(out), install_signal_handlers=False)
    p2 = ci.profile(output_dir="/elsewhere")
    assert p1 is p2
    assert ci.flush() is True and ci.flush() is True
    ci.shutdown()
    ci.shutdown()
    assert ci.flush() is True
    assert ci.health()["flush_mode"] == "stopped"


def test_health_has_reference_keys_and_counts(prof, out):
    for i in range(10):
        ci.mark("m", i)
    with ci.scope("s"):
        pass
    ci.flush()
    h = ci.health()
    assert set(h) >= REFERENCE_KEYS
    assert h["enabled"] is True and h["native"] is True
    assert h["flush_mode"] == "normal" and h["drainer_state"] == "background"
    assert h["spool_dir"] == str(out / "spool")
    assert h["spool_bytes"] > 0
    assert h["records_pending"] == 0
    spool = h["sinks"]["spool"]
    assert spool["exported"] >= 11 and spool["failed"] == 0 and spool["last_error"] is None
    assert h["process"]["pid"] > 0
    json.dumps(h)  # plain data


def test_health_never_raises_without_profiler():
    h = ci.health()
    assert set(h) >= REFERENCE_KEYS


def _recorded() -> tuple[int, int]:
    stats = ci._native.stats()
    return stats["marks_recorded"], stats["spans_recorded"]


def test_disabled_profiler_is_a_cheap_noop(out):
    threads_before = set(threading.enumerate())
    recorded_before = _recorded()
    ci.profile(output_dir=str(out), enabled=False)
    ci.mark("x", 1)
    with ci.scope("s"):
        ci.mark("in_scope", 2)
    for _ in ci.epochs(range(3)):
        pass
    ci.flush()
    assert _recorded() == recorded_before  # nothing reached a ring
    assert ci._native.session() is None  # no session span
    assert ci.health()["enabled"] is False
    assert [t.name for t in set(threading.enumerate()) - threads_before] == []  # no drainer, no sinks
    with pytest.raises(TypeError):
        ci.mark("x", object())  # bad input is still an error at the call
    ci.shutdown()
    assert not (out / "spool").exists()


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"output": "kafka"}, ValueError),
        ({"output": 3}, TypeError),
        ({"flush_interval": 0}, ValueError),
        ({"flush_interval": "1"}, TypeError),
        ({"ring_capacity": 10}, ValueError),
        ({"ring_capacity": 1.5}, TypeError),
        ({"spool_max_bytes": -1}, ValueError),
        ({"nonsense": 1}, TypeError),
    ],
)
def test_profile_argument_errors(out, kwargs, exc):
    with pytest.raises(exc):
        ci.profile(output_dir=str(out), **kwargs)


def test_trace_formats(prof, out, capsys):
    for _ in ci.epochs(range(2)):
        for _ in ci.batches(range(2)):
            ci.mark("loss", 0.25)
        ci.mark("acc", 0.5, kind="summary")
    assert ci.trace() is None  # a script: printed (cirron-sdk's behaviour), not returned
    lines = capsys.readouterr().out.splitlines()
    # the open session root is not among trace()'s spans (as in cirron-sdk): epochs are roots
    assert lines[0].startswith("epoch[0]") and "acc=0.5000" in lines[0]
    assert any(line.startswith("  batch[1]") and "loss=0.2500" in line for line in lines)
    tree = ci.trace(format="dict")
    roots = tree["roots"]
    assert tree["span_count"] == 6 and [e["index"] for e in roots] == [0, 1]
    assert roots[0]["children"][0]["marks"][0] == {"name": "loss", "value": 0.25, "kind": "point"}
    assert json.loads(ci.trace(format="json")) == tree
    only = ci.trace(format="dict", name="batch")
    assert only["span_count"] == 4 and all(n["name"] == "batch" for n in only["roots"])
    last = ci.trace(format="dict", last=1)  # the most recently closed span
    assert last["span_count"] == 1 and last["roots"][0]["name"] == "epoch"
    with pytest.raises(ValueError):
        ci.trace(format="xml")


def test_at_exit_writes_everything_including_the_session(out):
    r = run_script(
        f"""
        import cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, flush_interval=60)
        for i in range(1000):
            ci.mark("m", i)
        """
    )
    assert r.returncode == 0, r.stderr
    spans, marks = spans_and_marks(out)
    assert len(marks) == 1000
    assert [s["name"] for s in spans] == ["cirron.session"]


def test_sigterm_with_default_action_flushes_then_dies_by_the_signal(out):
    r = run_script(
        f"""
        import os, signal, cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, flush_interval=60)
        with ci.scope("work"):
            ci.mark("m", 1)
        os.kill(os.getpid(), signal.SIGTERM)
        import time; time.sleep(5)
        print("survived")
        """
    )
    assert r.returncode == -signal.SIGTERM
    assert "survived" not in r.stdout
    spans, marks = spans_and_marks(out)
    assert {s["name"] for s in spans} == {"work", "cirron.session"}
    assert len(marks) == 1


def test_sigterm_chains_to_the_application_handler(out):
    r = run_script(
        f"""
        import os, signal, cirron_otel as ci
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
        ci.profile(output_dir={str(out)!r}, flush_interval=60)
        ci.mark("m", 1)
        os.kill(os.getpid(), signal.SIGTERM)
        import glob, json
        n = sum(len(json.load(open(p))["marks"]) for p in glob.glob({str(out)!r} + "/spool/*.json"))
        print(got, n)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[15]", "1"]


def test_sigint_flushes_then_raises_keyboardinterrupt(out):
    r = run_script(
        f"""
        import os, signal, cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, flush_interval=60)
        ci.mark("m", 1)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            import time; time.sleep(5)
        except KeyboardInterrupt:
            # the flush happened before the default handler raised: the mark is on disk now
            import glob, json
            files = glob.glob(os.path.join({str(out)!r}, "spool", "*.json"))
            print("KeyboardInterrupt", sum(len(json.load(open(f))["marks"]) for f in files))
        """
    )
    assert r.returncode == 0, r.stderr
    assert "KeyboardInterrupt 1" in r.stdout
    assert len(spans_and_marks(out)[1]) == 1
    assert read_spool(out)


def test_the_package_has_no_module_getattr() -> None:
    # CPython specializes `ci.mark` / `ci.scope` attribute lookups only on a module without a
    # `__getattr__` (3.11-3.13: the lookup stays generic otherwise, ~13 ns of every mark).
    import cirron_otel

    assert "__getattr__" not in vars(cirron_otel)
    assert cirron_otel.watch is cirron_otel.compat.watch
    import dis
    import io

    def loop() -> None:
        for _ in range(100):
            cirron_otel.mark("loss", 0.5)

    for _ in range(5):  # past the specializing interpreter's warm-up
        loop()
    text = io.StringIO()
    dis.dis(loop, adaptive=True, file=text)  # type: ignore[call-arg]
    (lookup,) = [
        w
        for line in text.getvalue().splitlines()
        if re.search(r"\(mark\b|\bmark\)", line)  # (mark), (NULL|self + mark), (mark + NULL|self)
        for w in line.split()
        if w.startswith("LOAD_")
    ]
    assert lookup in ("LOAD_METHOD_MODULE", "LOAD_ATTR_MODULE"), lookup  # 3.11; 3.12 and 3.13
