"""The Keras hooks with real Keras 3 on its PyTorch backend (no TensorFlow needed): a tiny model
fit 2 epochs with no ci.scope calls, its spool as cirron-sdk 0.3.0 writes it (spans and marks,
run side by side with the SDK, with and without the PyTorch hooks), training unchanged, the
hooks gone after shutdown, a failing hook counted and never raised. (The hook logic without
Keras: tests/unit/test_framework_hooks_logic.py.)

The SDK names its Keras hooks "tensorflow" and installs them by itself only where tensorflow is
installed; without it (here) they are asked for: `frameworks=["tensorflow"]`. keras and torch
are not test dependencies: without them these skip, except under `CIRRON_REQUIRE_FRAMEWORKS=1`
(.ci/run, which installs them), where they fail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cirron_otel as ci
from cirron_otel import _hooks_common, _warn
from tests.support.frameworks import require, run
from tests.support.helpers import counter_growth
from tests.support.spool_tree import marked_tree, snapshot_records

os.environ["KERAS_BACKEND"] = "torch"  # read at keras's import
WHY = "keras is not installed (not a test dependency): `pip install keras torch`"
require("torch", "CIRRON_REQUIRE_FRAMEWORKS", WHY)
keras = require("keras", "CIRRON_REQUIRE_FRAMEWORKS", WHY)
if keras.backend.backend() != "torch":  # pragma: no cover - keras was imported before us
    pytest.skip("keras was imported with another backend", allow_module_level=True)

# 6 samples, batch 2: 3 batches an epoch, 2 epochs, no shuffling.
FIT = r"""
import os
os.environ["KERAS_BACKEND"] = "torch"
import keras
import numpy as np

def fit(epochs=2, **kwargs):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 4)).astype("float32"), rng.standard_normal((6, 1)).astype("float32")
    history = model.fit(x, y, batch_size=2, epochs=epochs, verbose=0, shuffle=False, **kwargs)
    return history.history, [float(w.sum()) for w in model.get_weights()]
"""
_ns: dict[str, Any] = {}
exec(FIT, _ns)  # the same source runs in the scripts below (under either package)
fit: Callable[..., tuple[dict[str, list[float]], list[float]]] = _ns["fit"]
BASELINE = fit()  # unprofiled: a profiled fit() learns exactly the same


def expected(history: dict[str, list[float]]) -> list[Any]:
    """Keras's epochs and batches, the logs as marks: each batch's running loss / mae (not in
    History), each epoch's final ones (History's)."""
    epochs = []
    for e in (0, 1):
        running = [("loss", "point", "<v>"), ("mae", "point", "<v>")]
        batches = [("batch", b, {}, running, []) for b in (0, 1, 2)]
        marks = [(k, "point", pytest.approx(history[k][e])) for k in ("loss", "mae")]
        epochs.append(("epoch", e, {}, marks, batches))
    return epochs


def valued(node: tuple[Any, ...]) -> tuple[Any, ...]:
    """Batch marks' values checked to be floats, then hidden (running means: not in History)."""
    name, index, attrs, marks, children = node
    if name == "batch":
        assert all(isinstance(m[2], float) for m in marks)
        marks = [(m[0], m[1], "<v>") for m in marks]
    return (name, index, attrs, marks, [valued(c) for c in children])


def profile(out: Path, **kwargs: Any) -> ci.Profiler:
    return ci.profile(output_dir=str(out), install_signal_handlers=False, **kwargs)


def test_fit_without_scopes_shows_its_structure(out: Path) -> None:
    before = keras.Model.__dict__.get("fit")
    prof = profile(out, frameworks=["tensorflow"])
    assert prof.installed_hooks == ["tensorflow"] and ci.health()["installed_hooks"] == ["tensorflow"]
    assert keras.Model.__dict__.get("fit") is not before
    history, weights = fit()
    ci.shutdown()
    assert (history, weights) == BASELINE
    assert [valued(c) for c in marked_tree(out / "spool")[4]] == expected(history)
    assert keras.Model.__dict__.get("fit") is before  # inherited: deleted again, not copied
    assert prof.installed_hooks == [] and ci.health()["installed_hooks"] == []


def test_the_callers_callbacks_are_kept_and_not_changed(out: Path) -> None:
    class Seen(keras.callbacks.Callback):
        epochs = 0

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            Seen.epochs += 1

    profile(out, frameworks=["tensorflow"])
    mine = [Seen()]
    history, _ = fit(callbacks=mine)
    ci.shutdown()
    assert Seen.epochs == 2 and len(mine) == 1 and history == BASELINE[0]
    assert [c[:2] for c in marked_tree(out / "spool")[4]] == [("epoch", 0), ("epoch", 1)]


def test_a_failing_hook_never_reaches_training_and_is_counted(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("telemetry bug")

    def counts() -> dict[str, int]:
        return {k: v for k, v in ci.health()["swallowed_errors"].items() if k.startswith("tensorflow.")}

    profile(out, frameworks=["tensorflow"])
    _warn.reset()
    before = counts()
    monkeypatch.setattr(_hooks_common, "_scope", broken)
    monkeypatch.setattr(_hooks_common.Spans, "mark_logs", broken)
    with pytest.warns(ci.CirronWarning, match="Keras"):
        result = fit()
    after = counts()
    assert result == BASELINE
    grew = counter_growth(before, after)
    assert grew == {
        "tensorflow.open.epoch": 2,
        "tensorflow.open.batch": 6,
        "tensorflow.on_epoch_end.logs": 2,
        "tensorflow.on_train_batch_end.logs": 6,
    }
    monkeypatch.undo()
    ci.shutdown()
    assert marked_tree(out / "spool")[3:] == ([], [])


def test_a_fit_that_raises_leaves_no_span_open(out: Path) -> None:
    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 1:
                raise RuntimeError("stop")

    profile(out, frameworks=["tensorflow"])
    with pytest.raises(RuntimeError, match="stop"):
        fit(callbacks=[Stop()])
    assert ci.current_scope() is None  # the epoch and the batch: closed as fit() left
    ci.shutdown()
    (epoch,) = marked_tree(out / "spool")[4]
    assert [c[:2] for c in epoch[4]] == [("batch", 0), ("batch", 1)]


SCRIPT = (
    FIT
    + r"""
import sys, json
import torch  # before profile(): the session's device attributes are probed (as the SDK does)
ci = __import__(sys.argv[1])
ci.profile(frameworks=json.loads(sys.argv[2]))
history, _ = fit()
print("@@" + json.dumps([history, ci.health()["installed_hooks"]]))
ci.shutdown()
"""
)


@pytest.mark.parametrize("frameworks", [["tensorflow"], ["tensorflow", "torch"]])
def test_the_spool_is_the_sdks(tmp_path: Path, frameworks: list[str]) -> None:
    """With the PyTorch hooks too, Keras's torch backend runs torch DataLoaders and modules but
    no torch optimizer: the SDK's torch step opens at the first batch fetched and never closes
    before shutdown, Keras's epochs nest in it. Odd, but the SDK's: matched as it is."""
    pytest.importorskip("cirron", reason="cirron-sdk 0.3.0 is a test dependency (the test-core extra)")
    results, snapshots = {}, {}
    for module in ("cirron", "cirron_otel"):
        cwd = tmp_path / module
        cwd.mkdir()
        proc = run(SCRIPT, cwd, module, json.dumps(frameworks))
        history, installed = json.loads(proc.stdout.split("@@")[-1])
        assert history == BASELINE[0] and installed == frameworks, module
        results[module] = marked_tree(cwd / ".cirron" / "spool")
        snapshots[module] = snapshot_records(cwd / ".cirron")
    assert results["cirron_otel"] == results["cirron"]
    # the model's weights at each epoch end, without ci.watch (snapshots="stats" by default)
    assert snapshots["cirron"][0] and snapshots["cirron_otel"] == snapshots["cirron"]
    if frameworks == ["tensorflow"]:
        assert [valued(c) for c in results["cirron"][4]] == expected(BASELINE[0])
