"""Weight / gradient snapshots with real torch (`ci.watch`, `profile(snapshots=...)`): the spool's
`snapshots` records as cirron-sdk 0.3.0 writes them (the same script under both, each mode, the
safetensors files byte for byte), the `cirron.snapshot` events on the epoch spans over OTLP, and a
model whose parameters cannot be read (counted, warned once, the loop unharmed). Without torch:
tests/unit/test_snapshots.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import cirron_otel as ci
from cirron_otel import _warn
from tests.support.helpers import counter_growth, read_spool
from tests.support.otlp import start
from tests.support.otlp_receivers import GrpcReceiver
from tests.support.spool_tree import snapshot_records, spans

if os.environ.get("CIRRON_REQUIRE_TORCH") == "1":  # .ci/run installs torch: a skip would hide a failure
    import torch
else:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (not a test dependency)")

# 2 epochs x 3 steps; random seeded so that "sampled" (sample_rate 0.5) hits the first epoch
# and misses the second, under either package (both roll the global `random` once per epoch).
LOOP = r"""
import random
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

KEEP = []  # ci.watch holds the model weakly: alive until shutdown() snapshots the last epoch

def train(ci, epochs=2, model=None):
    random.seed(1)
    torch.manual_seed(0)
    model = model if model is not None else nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    KEEP.append(ci.watch(model))
    loader = DataLoader(TensorDataset(torch.randn(6, 4), torch.randn(6, 1)), batch_size=2)
    losses = []
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses
"""
_loop: dict[str, Any] = {}
exec(LOOP, _loop)
train = _loop["train"]


@pytest.fixture(autouse=True)
def _unwatch() -> Any:
    """ci.watch is process-wide: no test sees another's model."""
    ci.watch(None)
    yield
    ci.watch(None)
    _loop["KEEP"].clear()


SCRIPT = (
    "import sys\n"
    + LOOP
    + r"""
ci = __import__(sys.argv[1])
ci.profile(snapshots=sys.argv[2], sample_rate=0.5)
train(ci)
ci.shutdown()
"""
)
TENSORS = ["0.weight", "0.bias", "2.weight", "2.bias"]


def _run(cwd: Path, module: str, mode: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIRRON_", "OTEL_"))}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, module, mode],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("mode", ["stats", "sampled", "full"])
def test_the_snapshots_are_the_sdks(tmp_path: Path, mode: str) -> None:
    pytest.importorskip("cirron", reason="cirron-sdk 0.3.0 is a test dependency (the test-core extra)")
    pytest.importorskip("safetensors", reason="sampled / full write safetensors files (a test dependency)")
    got = {}
    for module in ("cirron", "cirron_otel"):
        cwd = tmp_path / module
        cwd.mkdir()
        _run(cwd, module, mode)
        got[module] = snapshot_records(cwd / ".cirron")
    (sdk, sdk_blobs), (ours, our_blobs) = got["cirron"], got["cirron_otel"]
    assert ours == sdk  # every field, in the same order (ids and times aside)
    assert our_blobs == sdk_blobs  # the same files, byte for byte
    # what the SDK does, spelled out: each epoch's weights, then its gradients
    names = TENSORS + [f"{n}.grad" for n in TENSORS]
    assert [(r["span_id"], r["tensor_name"]) for r in ours] == [
        (e, n) for e in ("epoch0", "epoch1") for n in names
    ]
    hit = {"stats": set(), "sampled": {"epoch0"}, "full": {"epoch0", "epoch1"}}[mode]
    for r in ours:
        blob = "weights" if not r["tensor_name"].endswith(".grad") else "gradients"
        sampled = r["span_id"] in hit
        assert r["mode"] == (mode if sampled else "stats")
        assert r["blob_uri"] == (f"{blob}.safetensors" if sampled else None)
        assert set(r["stats"]) == {"mean", "std", "min", "max", "norm", "histogram"}
        assert len(r["stats"]["histogram"]["bins"]) == 17 and sum(r["stats"]["histogram"]["counts"]) > 0
    assert sorted(our_blobs) == sorted(f"{e}/{b}.safetensors" for e in hit for b in ("weights", "gradients"))


def test_snapshots_are_events_on_the_epoch_spans_over_otlp(out: Path, grpc_receiver: GrpcReceiver) -> None:
    start(out, grpc_receiver, snapshots="stats")
    train(ci)
    ci.shutdown()
    records = [r for doc in read_spool(out) for r in doc["snapshots"]]
    assert len(records) == 16
    received = grpc_receiver.wait_for_spans(len(spans(out / "spool")))
    epochs = {s["span_id"]: s for s in received if s["name"] == "epoch"}
    assert len(epochs) == 2
    for r in records:
        span = epochs[r["span_id"][:16]]  # the OTLP span id: the spool id's first 16 hex
        (event,) = [e for e in span["events"] if e["attributes"].get("cirron.snapshot.id") == r["id"]]
        stats = r["stats"]
        assert event["name"] == "cirron.snapshot" and event["time_ns"] == r["ts_ns"]
        assert event["attributes"] == {
            "cirron.snapshot.id": r["id"],
            "cirron.snapshot.tensor_name": r["tensor_name"],
            "cirron.snapshot.shape": r["shape"],
            "cirron.snapshot.dtype": "float32",
            "cirron.snapshot.mode": "stats",
            **{f"cirron.snapshot.{k}": stats[k] for k in ("mean", "std", "min", "max", "norm")},
            "cirron.snapshot.histogram.bins": stats["histogram"]["bins"],
            "cirron.snapshot.histogram.counts": stats["histogram"]["counts"],
        }
    for span in epochs.values():
        assert len(span["events"]) == 8 and span["dropped_events_count"] == 0
    assert ci.health()["sinks"]["otlp"]["snapshots_dropped"] == 0


def test_a_model_whose_parameters_cannot_be_read_is_counted_and_training_goes_on(out: Path) -> None:
    class Fragile(torch.nn.Sequential):
        """Its parameters cannot be listed the way snapshots list them (no arguments), while
        the optimizer's `parameters()` (which passes `recurse`) still works."""

        def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs:
                raise RuntimeError("parameters unreadable")
            return super().named_parameters(*args, **kwargs)

    def fragile() -> Fragile:
        torch.manual_seed(0)
        return Fragile(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    baseline = train(type("off", (), {"watch": staticmethod(lambda m: m)}), model=fragile())
    model = fragile()
    ci.profile(output_dir=str(out), install_signal_handlers=False)
    _warn.reset()
    before = ci.health()["swallowed_errors"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = train(ci, model=model)
        ci.shutdown()
    assert losses == baseline
    after = ci.health()["swallowed_errors"]
    grew = counter_growth(before, after)
    # every optimizer step's gradient stash, and each epoch end's capture
    assert grew == {"torch.snapshot_grad_stash": 6, "snapshot.parameters": 2}
    messages = [str(w.message) for w in caught if issubclass(w.category, ci.CirronWarning)]
    assert len(messages) == 2, messages  # once per kind
    assert all("parameters unreadable" in m for m in messages)
    assert [r for doc in read_spool(out) for r in doc["snapshots"]] == []
    assert [s["name"] for s in spans(out / "spool")].count("epoch") == 2


def test_nothing_is_captured_without_watch_or_after_watch_none(out: Path) -> None:
    ci.profile(output_dir=str(out), install_signal_handlers=False)
    before = ci.health()["swallowed_errors"]
    train(type("unwatched", (), {"watch": staticmethod(lambda m: None)}))  # never watched
    ci.watch(torch.nn.Linear(2, 2))
    ci.watch(None)  # cleared
    train(type("cleared", (), {"watch": staticmethod(lambda m: m)}), epochs=1)
    ci.shutdown()
    assert [r for doc in read_spool(out) for r in doc["snapshots"]] == []
    assert ci.health()["swallowed_errors"] == before


def test_a_bug_in_the_capture_never_reaches_the_loop(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cirron_otel import _snapshots

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("snapshot bug")

    monkeypatch.setattr(_snapshots, "capture_epoch", broken)
    ci.profile(output_dir=str(out), install_signal_handlers=False)
    _warn.reset()
    before = ci.health()["swallowed_errors"]
    with pytest.warns(ci.CirronWarning, match="snapshot bug"):
        losses = train(ci)
        ci.shutdown()
    assert len(losses) == 6
    after = ci.health()["swallowed_errors"]
    grew = counter_growth(before, after)
    assert grew == {"torch.snapshot_capture": 1, "torch.snapshot_capture_final": 1}
