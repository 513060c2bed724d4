"""The Hugging Face Trainer hooks with real transformers (on the PyTorch hooks, installed too):
a tiny config-built BERT trained 2 epochs by `Trainer` with no ci.scope calls, its spool as
cirron-sdk 0.3.0 writes it (spans and marks, run side by side with the SDK), training unchanged,
the hooks gone after shutdown, a failing hook counted and never raised, transformers imported
after profile(). (The hook logic without transformers: tests/unit/test_framework_hooks_logic.py.)

transformers, accelerate and torch are not test dependencies: without them these skip, except
under `CIRRON_REQUIRE_FRAMEWORKS=1` (.ci/run, which installs them), where they fail. Nothing is
downloaded: the model is built from a config (HF_HUB_OFFLINE=1).
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

os.environ["HF_HUB_OFFLINE"] = "1"
WHY = "transformers is not installed (not a test dependency): `pip install transformers accelerate torch`"
require("torch", "CIRRON_REQUIRE_FRAMEWORKS", WHY)
require("accelerate", "CIRRON_REQUIRE_FRAMEWORKS", WHY)
transformers = require("transformers", "CIRRON_REQUIRE_FRAMEWORKS", WHY)

# 6 samples, batch 2: 3 steps an epoch, 2 epochs, a log every step; no checkpoint, no hub.
TRAIN = r"""
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

def train(out, epochs=2):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=16, max_position_embeddings=16)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 32, (6,), generator=g), "labels": torch.tensor(i % 2)}
            for i in range(6)]
    args = TrainingArguments(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    weights = [p.detach().sum().item() for p in model.parameters()]
    return trainer.state.log_history, weights
"""
_ns: dict[str, Any] = {}
exec(TRAIN, _ns)  # the same source runs in the scripts below (under either package)
train: Callable[..., tuple[list[dict[str, Any]], list[float]]] = _ns["train"]
TIMED = ("train_runtime", "train_samples_per_second", "train_steps_per_second")  # wall-clock values


def untimed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k not in TIMED} for h in history]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], list[float]]:
    """Unprofiled: a profiled run logs and learns exactly the same."""
    history, weights = train(str(tmp_path_factory.mktemp("hf")))
    return untimed(history), weights


def expected(history: list[dict[str, Any]]) -> tuple[Any, ...]:
    """The session as the SDK records this run (tests/support/spool_tree.marked_tree): Trainer's
    epochs and steps (its callback), the PyTorch hooks' spans inside them (they open no epoch or
    step of their own while Trainer runs); on_log's numbers as marks on the epoch (the step is
    closed when Trainer logs), the learning rate after each step on it, the last log (after the
    last epoch) on the session. data_load spans land where Trainer fetches: 2 batches before its
    first step (it looks one ahead), then one a step, none for the last one."""
    logs = [h for h in history if "loss" in h]
    assert len(logs) == 6

    def step(i: int) -> tuple[Any, ...]:
        lr = (6 - (i + 1)) / 6 * 5e-5  # linear decay, after the scheduler's step i
        inner = [("forward", None, {"mode": "train"}, [], []), ("backward", None, {}, [], [])]
        inner.append(("optimizer_step", None, {}, [], []))
        return ("step", i, {}, [("learning_rate", "point", pytest.approx(lr))], inner)

    def logged(h: dict[str, Any]) -> list[tuple[str, str, Any]]:
        return [(k, "point", pytest.approx(v)) for k, v in h.items() if k != "step"]

    dl = ("data_load", None, {"data_load_ns": "<ns>"}, [], [])
    epochs = []
    for e in (0, 1):
        first = 3 * e
        marks = [m for h in logs[first : first + 3] for m in logged(h)]
        epochs.append(("epoch", e, {}, marks, [dl, dl, step(first), dl, step(first + 1), step(first + 2)]))
    (last,) = [h for h in history if "train_loss" in h]
    final = [(k, "point", pytest.approx(last[k])) for k in ("train_loss", "epoch")]
    return ("cirron.session", None, "<attrs>", final, epochs)


def normalized(session: tuple[Any, ...]) -> tuple[Any, ...]:
    """The session's attrs aside, its timed marks (train_runtime, ...) named but not valued."""
    name, index, _, marks, children = session
    kept = [m for m in marks if m[0] not in TIMED]
    assert [m[0] for m in marks if m[0] in TIMED] == list(TIMED)
    return (name, index, "<attrs>", kept, children)


def profile(out: Path, **kwargs: Any) -> ci.Profiler:
    return ci.profile(output_dir=str(out), install_signal_handlers=False, **kwargs)


def test_trainer_without_scopes_shows_its_structure(out: Path, tmp_path: Path, baseline: Any) -> None:
    before = transformers.Trainer.__dict__["__init__"]
    prof = profile(out)
    # transformers.trainer is imported here (the module's import): hooked at once, in the SDK's order
    assert prof.installed_hooks == ["transformers", "torch"]
    assert ci.health()["installed_hooks"] == ["transformers", "torch"]
    assert transformers.Trainer.__dict__["__init__"] is not before
    history, weights = train(str(tmp_path / "run"))
    ci.shutdown()
    assert (untimed(history), weights) == baseline
    assert normalized(marked_tree(out / "spool")) == expected(history)
    assert transformers.Trainer.__dict__["__init__"] is before
    assert prof.installed_hooks == [] and ci.health()["installed_hooks"] == []


def test_shutdown_restores_trainer_and_a_later_trainer_has_no_callback(out: Path, tmp_path: Path) -> None:
    from transformers import TrainingArguments

    before = transformers.Trainer.__dict__["__init__"]
    profile(out, frameworks=["transformers"])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1)
    )
    during = transformers.Trainer(model=model, args=args)
    names = [type(cb).__name__ for cb in during.callback_handler.callbacks]
    assert names.count("CirronTrainerCallback") == 1
    ci.shutdown()
    assert transformers.Trainer.__dict__["__init__"] is before
    after = transformers.Trainer(model=model, args=args)
    assert "CirronTrainerCallback" not in [type(cb).__name__ for cb in after.callback_handler.callbacks]


def test_a_failing_hook_never_reaches_training_and_is_counted(
    out: Path, tmp_path: Path, baseline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("telemetry bug")

    def counts() -> dict[str, int]:
        return {k: v for k, v in ci.health()["swallowed_errors"].items() if k.startswith("transformers.")}

    profile(out)
    _warn.reset()
    before = counts()
    monkeypatch.setattr(_hooks_common, "_scope", broken)  # every span any hook opens fails
    monkeypatch.setattr(_hooks_common.Spans, "mark_logs", broken)  # and every on_log
    with pytest.warns(ci.CirronWarning, match="Hugging Face Trainer"):
        history, weights = train(str(tmp_path / "run"))
    after = counts()
    assert (untimed(history), weights) == baseline
    grew = counter_growth(before, after)
    # 7 on_log calls: one a step and the final one
    assert grew == {"transformers.open.epoch": 2, "transformers.open.step": 6, "transformers.on_log": 7}
    monkeypatch.undo()
    ci.shutdown()
    session = marked_tree(out / "spool")
    learning_rates = [m for m in session[3] if m[0] == "learning_rate"]
    assert session[4] == [] and len(learning_rates) == 6  # no span; the marks went to the session


# profile() first, transformers imported afterwards (TRAIN imports it)
LATE = (
    "import sys, json\n"
    "import cirron_otel as ci\n"
    "p = ci.profile(output_dir='out', install_signal_handlers=False, **json.loads(sys.argv[1]))\n"
    "before = (p.installed_hooks, 'transformers' in sys.modules)\n" + TRAIN + "\nafter = p.installed_hooks\n"
    "train('hf')\n"
    "finders = [getattr(f, 'fullname', '') for f in sys.meta_path]  # what _on_import waits for\n"
    "ci.shutdown()\n"
    "print('@@' + json.dumps([before, after, finders]))\n"
)


def test_transformers_imported_after_profile_is_hooked_as_it_is_imported(tmp_path: Path) -> None:
    """The SDK imports transformers at profile() whenever it is installed; we never do, so a
    program that imports Trainer after profile() gets the hooks right after its import."""
    for kwargs, hooked in (({}, ["transformers", "torch"]), ({"frameworks": ["torch"]}, ["torch"])):
        cwd = tmp_path / str(len(hooked))
        cwd.mkdir()
        proc = run(LATE, cwd, json.dumps(kwargs))
        before, after, finders = json.loads(proc.stdout.split("@@")[-1])
        assert before == ([[], False] if not kwargs else [["torch"], False]), kwargs
        assert after == hooked, kwargs
        assert not {"torch", "transformers.trainer"} & set(finders), "the one-shot import hooks must be gone"
        session = marked_tree(cwd / "out" / "spool")
        assert [c[:2] for c in session[4]] == ([("epoch", 0), ("epoch", 1)]), kwargs
        if kwargs:  # the PyTorch hooks alone: their own epochs and steps, no marks
            assert session[4][0][4][0][:2] == ("step", 0) and session[3] == [], kwargs


SCRIPT = (
    TRAIN
    + r"""
import sys, json
ci = __import__(sys.argv[1])
ci.profile()
history, _ = train("hf")
ci.shutdown()
print("@@" + json.dumps(history))
"""
)


def test_the_spool_is_the_sdks(tmp_path: Path) -> None:
    pytest.importorskip("cirron", reason="cirron-sdk 0.3.0 is a test dependency (the test-core extra)")
    sessions, snapshots = {}, {}
    for module in ("cirron", "cirron_otel"):
        cwd = tmp_path / module
        cwd.mkdir()
        proc = run(SCRIPT, cwd, module)
        history = json.loads(proc.stdout.split("@@")[-1])
        session = marked_tree(cwd / ".cirron" / "spool")
        assert normalized(session) == expected(history), module
        name, index, attrs, marks, children = session
        timed = [(m[0], m[1]) for m in marks if m[0] in TIMED]
        sessions[module] = (name, index, attrs, [m for m in marks if m[0] not in TIMED], timed, children)
        snapshots[module] = snapshot_records(cwd / ".cirron")
    assert sessions["cirron_otel"] == sessions["cirron"]
    # the trained model's weights (and gradients where .grad is still set) at each epoch end,
    # without ci.watch (snapshots="stats" by default): every record as the SDK's
    assert snapshots["cirron"][0] and snapshots["cirron_otel"] == snapshots["cirron"]
    assert {r["span_id"] for r in snapshots["cirron"][0]} == {"epoch0", "epoch1"}
