"""Snapshots without a framework: NumPy models (Keras-style `weights`, torch-style duck-typed
`named_parameters`) give cirron-sdk 0.3.0's records and files, a NumPy-only program snapshots
an epoch without importing torch, an unreadable tensor is counted and left out, and the spool
sink puts snapshots in its files exactly once. (With real torch: tests/integration/test_snapshots.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import cirron_otel as ci
from cirron_otel import _snapshots
from cirron_otel.sink import Snapshot
from tests.support.helpers import drained_batch, read_spool

SPAN = "ab" * 16


class Param:
    """A torch-like parameter without torch: `.numpy()`, `.shape`, `.dtype`, `.grad`."""

    def __init__(self, value: np.ndarray, grad: np.ndarray | None = None) -> None:
        self.value, self.grad = value, grad
        self.shape, self.dtype = value.shape, value.dtype

    def numpy(self) -> np.ndarray:
        return self.value


class Unreadable:
    shape = (3,)
    dtype = np.dtype("float32")

    def numpy(self) -> Any:
        raise RuntimeError("device lost")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("device lost")


def keras_like() -> Any:
    rng = np.random.default_rng(0)
    return SimpleNamespace(
        weights=[
            rng.standard_normal((4, 3)).astype(np.float32),
            rng.standard_normal(7),  # float64
            np.array([1.0, np.nan, -np.inf, 2.5, np.inf], dtype=np.float32),  # diverged
            np.array([np.nan, np.nan]),  # nothing finite
            np.arange(12, dtype=np.int64).reshape(3, 4),
            np.zeros((0, 5), dtype=np.float32),  # empty
            np.array([3.0]),  # one element
            np.full(6, 0.5, dtype=np.float32),  # constant
            Unreadable(),
        ]
    )


def torch_like() -> Any:
    rng = np.random.default_rng(1)
    params = [
        ("layer.weight", Param(rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((2, 5)))),
        ("layer.bias", Param(rng.standard_normal(2).astype(np.float32), None)),  # no gradient
        ("head.weight", Param(rng.standard_normal((1, 2)), np.array([[np.inf, 1.0]]))),
    ]
    return SimpleNamespace(named_parameters=lambda: iter(params))


def _ours(model: Any, mode: str, out: Path) -> list[dict[str, Any]]:
    records = _snapshots.capture(model, SPAN, mode, sample_rate=1.0, output_dir=out)
    return [json.loads(s.json) for s in (_snapshots._to_snapshot(r, (0, 0, True)) for r in records) if s]


def _sdks(model: Any, mode: str, out: Path) -> list[dict[str, Any]]:
    from cirron.snapshots.stats import capture
    from cirron.snapshots.types import snapshot_to_dict

    cirron = SimpleNamespace(snapshots=mode, sample_rate=1.0, output_dir=str(out))
    # through JSON as the SDK's spool writer does (its dicts hold the same floats)
    return [json.loads(json.dumps(snapshot_to_dict(r))) for r in capture(cirron, model, SPAN)]


def _comparable(records: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    prefix = (out / "snapshots" / SPAN).resolve().as_uri() + "/"
    return [
        {
            **{k: v for k, v in r.items() if k not in ("id", "ts_ns")},
            "blob_uri": r["blob_uri"] and r["blob_uri"][len(prefix) :],
        }
        for r in records
    ]


@pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning")
@pytest.mark.parametrize("mode", ["stats", "sampled", "full"])
@pytest.mark.parametrize("make", [keras_like, torch_like], ids=["keras-like", "torch-like"])
def test_numpy_models_give_the_sdks_records_and_files(tmp_path: Path, make: Any, mode: str) -> None:
    pytest.importorskip("cirron", reason="cirron-sdk 0.3.0 is a test dependency (the test-core extra)")
    pytest.importorskip("safetensors", reason="sampled / full write safetensors files (a test dependency)")
    sdk = _comparable(_sdks(make(), mode, tmp_path / "sdk"), tmp_path / "sdk")
    ours = _comparable(_ours(make(), mode, tmp_path / "ours"), tmp_path / "ours")
    assert ours == sdk
    assert len(ours) == (8 if make is keras_like else 5)  # the unreadable weight left out
    files = {p.name: p.read_bytes() for p in (tmp_path / "ours" / "snapshots" / SPAN).glob("*")}
    sdk_files = {p.name: p.read_bytes() for p in (tmp_path / "sdk" / "snapshots" / SPAN).glob("*")}
    assert files == sdk_files and (bool(files) is (mode != "stats"))
    diverged = ours[2] if make is keras_like else ours[-1]
    assert "histogram" not in diverged["stats"] and diverged["stats"]["nonfinite"]


def test_an_unreadable_tensor_is_counted_warned_once_and_left_out(tmp_path: Path) -> None:
    from cirron_otel import _warn

    _warn.reset()
    before = ci.health()["swallowed_errors"].get("snapshot.read", 0)
    with pytest.warns(ci.CirronWarning, match="could not be read") as caught:
        for _ in range(2):
            records = _snapshots.capture(keras_like(), SPAN, "stats", output_dir=tmp_path)
            assert len(records) == 8
    assert len([w for w in caught if "could not be read" in str(w.message)]) == 1
    assert ci.health()["swallowed_errors"]["snapshot.read"] == before + 2


NUMPY_ONLY = r"""
import json, sys
for name in ("torch", "tensorflow", "transformers", "jax"):
    sys.modules[name] = None  # not importable: a NumPy-only program
import numpy as np
import cirron_otel as ci
from cirron_otel._snapshots import capture_epoch

class Model:  # Keras-style: `weights`, each with a name
    def __init__(self):
        self.weights = [np.ones((2, 2), dtype=np.float32), np.arange(3.0)]

ci.profile(output_dir="out", install_signal_handlers=False)
model = ci.watch(Model())
with ci.scope("epoch", 0) as epoch:
    n = capture_epoch(model, epoch)  # what a framework hook calls at its epoch end
ci.shutdown()
frameworks = ("torch", "tensorflow")
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in frameworks)
print("@@" + json.dumps([n, epoch.id, loaded]))
"""


def test_a_numpy_only_program_snapshots_an_epoch_without_a_framework(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIRRON_", "OTEL_"))}
    proc = subprocess.run(
        [sys.executable, "-c", NUMPY_ONLY], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, epoch_id, frameworks = json.loads(proc.stdout.split("@@")[-1])
    assert n == 2 and frameworks == []
    records = [r for doc in read_spool(tmp_path / "out") for r in doc["snapshots"]]
    assert [(r["tensor_name"], r["shape"], r["dtype"], r["span_id"], r["mode"]) for r in records] == [
        ("weight_0", [2, 2], "float32", epoch_id, "stats"),
        ("weight_1", [3], "float64", epoch_id, "stats"),
    ]
    assert records[1]["stats"]["mean"] == 1.0 and records[1]["stats"]["histogram"]["counts"][-1] == 1


# -- the spool sink ---------------------------------------------------------------------------------


def _snapshot(i: int) -> Snapshot:
    record = {"id": f"{i:032x}", "span_id": SPAN, "tensor_name": f"t{i}", "shape": [1], "dtype": "float32"}
    record |= {"mode": "stats", "stats": None, "blob_uri": None, "ts_ns": i, "attrs": {}}
    return Snapshot(record, json.dumps(record).encode(), None, (1, 2, True))


def test_the_spool_puts_snapshots_in_the_last_file_of_the_next_export(tmp_path: Path) -> None:
    from cirron_otel.exporters.spool import SpoolSink

    sink = SpoolSink(tmp_path, max_records_per_file=30)
    sink.add_snapshots([_snapshot(0), _snapshot(1)])
    sink.export([drained_batch(10), drained_batch(10)])  # two files of 30 records
    sink.add_snapshots([_snapshot(2)])
    sink.export([])  # a flush with no records: a file of the snapshots alone
    sink.export([])  # nothing: no file
    sink.shutdown(5)
    docs = read_spool(tmp_path)
    assert [(len(d["spans"]) + len(d["marks"]), [s["id"][-1] for s in d["snapshots"]]) for d in docs] == [
        (30, []),
        (30, ["0", "1"]),
        (0, ["2"]),
    ]
    assert sink.stats.as_dict()["snapshots_written"] == 3 and sink.stats.as_dict()["exported"] == 60


def test_a_split_file_keeps_each_snapshot_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cirron_otel.exporters import spool

    sink = spool.SpoolSink(tmp_path)
    item = spool._PendingFile(
        created_ns=1, batch_id="c" * 32, batches=[drained_batch(500)], marks=1000, spans=500
    )
    item.snapshots, item.snapshot_count = b",".join(_snapshot(i).json for i in range(400)), 400
    whole = len(_native_encoded(item))
    free = whole // 3
    assert free > 2 * spool.MIN_PIECE_BYTES
    monkeypatch.setattr(spool.os, "statvfs", lambda _p: SimpleNamespace(f_bavail=free, f_frsize=1))
    sink._queue.append(item)
    assert sink._split_head(item)
    pieces = list(sink._queue)
    assert len(pieces) > 1 and sum(p.weight for p in pieces) == item.weight
    docs = [json.loads(p.data) for p in pieces]
    assert [s["tensor_name"] for d in docs for s in d["snapshots"]] == [f"t{i}" for i in range(400)]
    assert [p.snapshot_count for p in pieces] == [len(d["snapshots"]) for d in docs]


def _native_encoded(item: Any) -> bytes:
    from cirron_otel import _native

    return _native.encode_spool(item.batches, item.batch_id, item.created_ns, "v", snapshots=item.snapshots)


def test_a_sink_holds_at_most_the_sdks_cap_of_snapshots(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cirron_otel.exporters.spool import SpoolSink

    from cirron_otel import sink as sink_module

    monkeypatch.setattr(sink_module, "SNAPSHOTS_PENDING_MAX", 3)
    sink = SpoolSink(tmp_path)
    sink.add_snapshots([_snapshot(i) for i in range(2)])
    sink.add_snapshots([_snapshot(i) for i in range(2, 5)])
    assert [s.record["tensor_name"] for s in sink.take_snapshots()] == ["t0", "t1", "t2"]
    assert sink.stats.as_dict()["snapshots_dropped"] == 2


# -- OpenTelemetry events only for an epoch span still open -----------------------------------------


def test_a_capture_for_a_closed_epoch_span_leaves_no_event_waiting_in_the_encoder(
    out: Path, grpc_receiver: Any
) -> None:
    """capture_epoch's rule: the OTLP sinks get a snapshot as an event only while its epoch span
    is open. A span closed (here: encoded and sent) is never encoded again, so an event for it
    would wait in the encoder's open-span table for good, one more per such capture; the spool
    still gets the records."""
    from tests.support.otlp import start

    prof = start(out, grpc_receiver, snapshots="stats")
    (otlp,) = [s for s in prof.sinks if s.name == "otlp"]
    model = torch_like()  # 3 weights, 2 gradients
    with ci.scope("epoch") as still_open:
        assert _snapshots.capture_epoch(model, still_open) == 5  # the control: events on it
    with ci.scope("epoch") as closed:
        ci.mark("loss", 1.0)
    assert ci.flush()
    assert otlp.state.open_spans == 0  # the closed epoch went out with its mark
    assert _snapshots.capture_epoch(model, closed) == 5
    assert ci.flush()
    assert otlp.state.open_spans == 0  # nothing waits for a span that will never come again
    ci.shutdown()
    assert otlp.state.open_spans == 0
    events = {
        s["span_id"]: [e["name"] for e in s["events"]] for s in grpc_receiver.spans() if s["name"] == "epoch"
    }
    assert events == {still_open.id[:16]: ["cirron.snapshot"] * 5, closed.id[:16]: ["loss"]}
    records = [r for doc in read_spool(out) for r in doc["snapshots"]]
    assert [r["span_id"] for r in records] == [still_open.id] * 5 + [closed.id] * 5


@pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning")
def test_stats_from_wire_gives_back_what_live_sends(tmp_path: Path) -> None:
    """Replay rebuilds the live event's statistics from the spool's: every non-finite scalar in
    its place (the `finite` block's too); only a histogram with a non-finite edge stays lost."""
    raws = [
        r["stats"] for make in (keras_like, torch_like) for r in _snapshots.capture(make(), SPAN, "stats")
    ]
    raws.append(
        {"mean": 1.0, "std": float("inf"), "nonfinite_count": 1, "finite": {"count": 1, "max": float("-inf")}}
    )
    assert sum("nonfinite_count" in r for r in raws) >= 4
    for raw in raws:
        wire = json.loads(json.dumps(_snapshots.stats_to_wire(raw), allow_nan=False))
        back = _snapshots.stats_from_wire(wire)
        assert repr(back) == repr(raw) and list(back) == list(raw)  # repr: NaN equals itself; key order
    lost = {"mean": 0.0, "histogram": {"bins": [float("-inf"), 0.0], "counts": [1]}}
    assert _snapshots.stats_from_wire(json.loads(json.dumps(_snapshots.stats_to_wire(lost)))) == {"mean": 0.0}
