"""The Trainer and Keras hooks' logic without the frameworks: their callbacks on stand-in base
classes, driven the way Trainer / Keras call them; the hand-over of `epoch` / `step` to the
PyTorch hooks; failures counted, never raised; restore on shutdown; and `_profiler`'s choice of
hooks (frameworks given or detected, a framework imported after profile()), with fake modules.
The same hooks with the real frameworks: tests/integration/test_{transformers,keras}_hooks.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import cirron_otel as ci
from cirron_otel import _hooks_common, _hooks_keras, _hooks_transformers, _native, _warn
from cirron_otel._hooks_common import HookContext
from cirron_otel._hooks_keras import KerasHooks
from cirron_otel._hooks_transformers import TrainerHooks
from cirron_otel._on_import import cancel
from tests.support.helpers import counter_growth
from tests.support.spool_tree import marked_tree


class TrainerCallback:  # transformers.TrainerCallback: no __init__ of its own, no-op events
    pass


class Trainer:
    """transformers.Trainer as far as the hooks go: callback_handler.callbacks, add_callback,
    and train() calling the events as Trainer does (kwargs: model, lr_scheduler, ...)."""

    def __init__(self, steps_per_epoch: int = 2, epochs: int = 2, callbacks: Any = ()) -> None:
        self.callback_handler = SimpleNamespace(callbacks=list(callbacks))
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs

    def add_callback(self, callback: Any) -> None:
        self.callback_handler.callbacks.append(callback)

    def call(self, event: str, state: Any, **kwargs: Any) -> None:
        args = SimpleNamespace(learning_rate=0.5)
        for cb in self.callback_handler.callbacks:
            getattr(cb, event, lambda *a, **k: None)(args, state, None, lr_scheduler=None, **kwargs)

    def train(self, body: Callable[[], None] = lambda: None) -> None:
        state = SimpleNamespace(epoch=0.0, global_step=0)
        self.call("on_train_begin", state)
        for e in range(self.epochs):
            self.call("on_epoch_begin", state)
            for _ in range(self.steps_per_epoch):
                self.call("on_step_begin", state)
                body()
                state.global_step += 1
                state.epoch += 1 / self.steps_per_epoch
                self.call("on_step_end", state)
                self.call("on_log", state, logs={"loss": 1.0 / state.global_step, "note": "x"})
            self.call("on_epoch_end", state, metrics={"eval_loss": float(e)})
        self.call("on_train_end", state)


class Callback:  # keras.callbacks.Callback: every event a no-op
    def __init__(self) -> None:
        self.model = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class _Trainer:
    def fit(  # fit(x, y, batch_size, epochs, verbose, callbacks, ...) as Keras's
        self,
        x: Any = None,
        y: Any = None,
        batch_size: Any = None,
        epochs: int = 2,
        verbose: Any = 0,
        callbacks: Any = None,
        steps: int = 2,
        body: Callable[[], None] = lambda: None,
    ) -> list[Any]:
        cbs = list(callbacks or [])
        for cb in cbs:
            cb.on_train_begin()
        for e in range(epochs):
            for cb in cbs:
                cb.on_epoch_begin(e)
            for b in range(steps):
                for cb in cbs:
                    cb.on_train_batch_begin(b)
                body()
                for cb in cbs:
                    cb.on_train_batch_end(b, {"loss": float(b), "acc": None})
            for cb in cbs:
                cb.on_epoch_end(e, {"loss": float(e)})
        for cb in cbs:
            cb.on_train_end()
        return cbs


class Model(_Trainer):
    """keras.Model as far as the hooks go: fit() inherited (from a backend trainer), calling
    the callbacks as Keras does."""


@pytest.fixture
def session(out: Path) -> Iterator[Callable[[], tuple[Any, ...]]]:
    current = _native.scope_var.get(None)
    ci.profile(output_dir=str(out), install_signal_handlers=False, frameworks=[])

    def finish() -> tuple[Any, ...]:
        ci.shutdown()
        return marked_tree(out / "spool")

    yield finish
    _native.scope_var.set(current)  # a test that failed half-way leaves its spans open


def trainer_hooks(context: HookContext | None = None) -> TrainerHooks:
    hooks = TrainerHooks(context or HookContext())
    hooks.install_on(Trainer, TrainerCallback)
    return hooks


def keras_hooks(context: HookContext | None = None) -> KerasHooks:
    hooks = KerasHooks(context or HookContext())
    hooks.install_on(Model, Callback)
    return hooks


def counts(prefix: str) -> dict[str, int]:
    return {k: v for k, v in ci.health()["swallowed_errors"].items() if k.startswith(prefix)}


# -- Trainer -----------------------------------------------------------------------------------


def test_trainer_epochs_steps_and_marks(session: Callable[[], tuple[Any, ...]]) -> None:
    hooks = trainer_hooks()
    Trainer().train()
    hooks.uninstall()
    step = [("step", i, {}, [("learning_rate", "point", 0.5)], []) for i in range(4)]
    loss = [("loss", "point", 1.0 / n) for n in range(1, 5)]
    assert session()[4] == [
        ("epoch", 0, {}, [loss[0], loss[1], ("eval_loss", "summary", 0.0)], step[:2]),
        ("epoch", 1, {}, [loss[2], loss[3], ("eval_loss", "summary", 1.0)], step[2:]),
    ]


def test_trainer_callback_attached_once_and_not_after_uninstall(
    session: Callable[[], tuple[Any, ...]],
) -> None:
    original = Trainer.__dict__["__init__"]
    hooks = trainer_hooks()
    assert Trainer.__dict__["__init__"] is not original
    assert Trainer.__init__.__wrapped__ is original  # type: ignore[attr-defined]  # signature kept
    one = Trainer()
    assert [type(cb).__name__ for cb in one.callback_handler.callbacks] == ["CirronTrainerCallback"]
    mine = hooks.callback_class() if hooks.callback_class else None
    assert len(Trainer(callbacks=[mine]).callback_handler.callbacks) == 1  # the program's own: kept
    hooks.uninstall()
    hooks.uninstall()  # idempotent
    assert Trainer.__dict__["__init__"] is original
    assert Trainer().callback_handler.callbacks == []
    one.train()  # an earlier session's callback: nothing
    assert session()[4] == []


def test_trainer_owns_epoch_and_step_while_training() -> None:
    context = HookContext()
    hooks = trainer_hooks(context)
    seen = []
    Trainer(epochs=1, steps_per_epoch=1).train(lambda: seen.append(dict(context.owned_scopes)))
    assert seen == [{"epoch": "transformers", "step": "transformers"}] and context.owned_scopes == {}
    context.owned_scopes["epoch"] = "tensorflow"  # someone else's claim is left alone
    Trainer(epochs=1, steps_per_epoch=1).train()
    assert context.owned_scopes == {"epoch": "tensorflow"}
    hooks.uninstall()


def test_a_train_that_raised_is_cleaned_up_by_the_next(session: Callable[[], tuple[Any, ...]]) -> None:
    context = HookContext()
    hooks = trainer_hooks(context)
    trainer = Trainer(epochs=1, steps_per_epoch=1)

    def boom() -> None:
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        trainer.train(boom)
    assert context.owned_scopes == {"epoch": "transformers", "step": "transformers"}
    trainer.train()
    assert context.owned_scopes == {}
    hooks.uninstall()
    assert [c[:2] for c in session()[4]] == [("epoch", 0), ("epoch", 0)]


def test_uninstall_closes_what_a_callback_left_open(session: Callable[[], tuple[Any, ...]]) -> None:
    context = HookContext()
    hooks = trainer_hooks(context)
    trainer = Trainer()
    state = SimpleNamespace(epoch=0.0, global_step=0)
    trainer.call("on_train_begin", state)
    trainer.call("on_epoch_begin", state)
    trainer.call("on_step_begin", state)
    hooks.uninstall()  # shutdown in the middle of a step
    assert context.owned_scopes == {} and ci.current_scope() is None
    assert session()[4] == [("epoch", 0, {}, [], [("step", 0, {}, [], [])])]


def test_trainer_failures_are_counted_never_raised(
    session: Callable[[], tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = trainer_hooks()
    _warn.reset()
    before = counts("transformers.")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("telemetry bug")

    class NoItems:
        def __bool__(self) -> bool:
            return True

    class BadScheduler:
        def get_last_lr(self) -> list[float]:
            raise RuntimeError("no lr")  # a probe: not counted, args.learning_rate is used

    trainer = Trainer(epochs=1, steps_per_epoch=1)
    state = SimpleNamespace(epoch="not a number", global_step=0)
    with pytest.warns(ci.CirronWarning, match="Hugging Face Trainer"):
        trainer.call("on_epoch_begin", state)  # int("not a number")
    trainer.call("on_log", state, logs=NoItems())  # no .items()
    cb = trainer.callback_handler.callbacks[0]
    cb.on_step_end(SimpleNamespace(), state, None, lr_scheduler=BadScheduler())  # no learning_rate
    monkeypatch.setattr(_hooks_common, "_scope", broken)
    trainer.call("on_step_begin", state)
    monkeypatch.setattr(_native, "mark", broken)
    trainer.call("on_log", state, logs={"loss": 1.0})
    trainer.call("on_step_end", state)
    monkeypatch.undo()
    after = counts("transformers.")
    grew = counter_growth(before, after)
    assert grew == {
        "transformers.on_epoch_begin": 1,
        "transformers.log_items": 1,  # the SDK's keys where it counts
        "transformers.resolve_lr": 1,
        "transformers.open.step": 1,
        "transformers.mark_logged": 1,
        "transformers.mark_learning_rate": 1,
    }
    hooks.uninstall()
    assert session()[4] == []


# -- Keras -------------------------------------------------------------------------------------


def test_keras_epochs_batches_and_marks(session: Callable[[], tuple[Any, ...]]) -> None:
    hooks = keras_hooks()
    Model().fit()  # type: ignore[attr-defined]
    hooks.uninstall()
    batches = [("batch", b, {}, [("loss", "point", float(b))], []) for b in (0, 1)]  # acc=None: skipped
    assert session()[4] == [
        ("epoch", 0, {}, [("loss", "point", 0.0)], batches),
        ("epoch", 1, {}, [("loss", "point", 1.0)], batches),
    ]


def test_keras_callbacks_argument_kept_and_uninstall_restores(session: Callable[[], tuple[Any, ...]]) -> None:
    assert "fit" not in Model.__dict__
    hooks = keras_hooks()
    assert Model.fit.__wrapped__ is _Trainer.fit  # type: ignore[attr-defined]
    mine = [Callback()]
    used = Model().fit(callbacks=mine)  # type: ignore[attr-defined]
    assert mine == [mine[0]] and used[0] is mine[0] and type(used[1]).__name__ == "CirronKerasCallback"
    used = Model().fit(None, None, None, 1, 0, mine)  # type: ignore[attr-defined]  # positional
    assert len(used) == 2 and used[0] is mine[0]
    used = Model().fit(callbacks=mine[0], epochs=1)  # type: ignore[attr-defined]  # one, not a list
    assert len(used) == 2
    ours = hooks.callback_class() if hooks.callback_class else None
    assert Model().fit(callbacks=[ours], epochs=1) == [ours]  # type: ignore[attr-defined]
    hooks.uninstall()
    assert "fit" not in Model.__dict__  # inherited: deleted again, not copied onto Model
    assert Model().fit(epochs=1) == []  # type: ignore[attr-defined]
    assert [c[:2] for c in session()[4]] == [("epoch", 0), ("epoch", 1)] + [("epoch", 0)] * 3


def test_keras_owns_epoch_while_fitting_and_a_raising_fit_leaves_nothing_open(
    session: Callable[[], tuple[Any, ...]],
) -> None:
    context = HookContext()
    hooks = keras_hooks(context)
    seen = []

    def body() -> None:
        seen.append(dict(context.owned_scopes))
        if len(seen) == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        Model().fit(epochs=1, body=body)  # type: ignore[attr-defined]
    assert seen == [{"epoch": "tensorflow"}] * 2
    assert context.owned_scopes == {} and ci.current_scope() is None
    hooks.uninstall()
    (epoch,) = session()[4]
    assert [c[:2] for c in epoch[4]] == [("batch", 0), ("batch", 1)]


def test_keras_failures_are_counted_never_raised(
    session: Callable[[], tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = keras_hooks()
    _warn.reset()
    before = counts("tensorflow.")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("telemetry bug")

    monkeypatch.setattr(_hooks_common, "_scope", broken)
    monkeypatch.setattr(_native, "mark", broken)
    with pytest.warns(ci.CirronWarning, match="Keras"):
        Model().fit(epochs=1)  # type: ignore[attr-defined]
    monkeypatch.setattr(hooks, "_with_callback", broken)
    assert Model().fit(epochs=1) == []  # type: ignore[attr-defined]  # fit() runs, without us
    monkeypatch.undo()
    after = counts("tensorflow.")
    grew = counter_growth(before, after)
    assert grew == {
        "tensorflow.open.epoch": 1,
        "tensorflow.open.batch": 2,
        "tensorflow.mark_logged": 3,
        "tensorflow.attach_callback": 1,
    }
    hooks.uninstall()
    assert session()[3:] == ([], [])


# -- which hooks, and when (_profiler) --------------------------------------------------------


@pytest.fixture
def fake_frameworks(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[Any]]]:
    """Each framework's `install` recording its calls (no framework imported), and find_spec
    answering "installed" for all three."""
    calls: dict[str, list[Any]] = {"torch": [], "transformers": [], "tensorflow": []}
    modules = {"torch": "_hooks_torch", "transformers": "_hooks_transformers", "tensorflow": "_hooks_keras"}
    for name, module in modules.items():

        def install(context: HookContext, name: str = name) -> Any:
            calls[name].append(context)
            return SimpleNamespace(name=name, uninstall=lambda name=name: calls[name].append("uninstall"))

        monkeypatch.setattr(importlib.import_module(f"cirron_otel.{module}"), "install", install)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    for trigger in ("torch", "transformers", "transformers.trainer", "keras"):
        monkeypatch.delitem(sys.modules, trigger, raising=False)
    yield calls
    ci.shutdown()


def test_frameworks_given_install_now_in_the_sdks_order(out: Path, fake_frameworks: dict[str, Any]) -> None:
    prof = ci.profile(
        output_dir=str(out), install_signal_handlers=False, frameworks=["torch", "tensorflow", "transformers"]
    )
    assert prof.installed_hooks == ["transformers", "tensorflow", "torch"]
    contexts = [fake_frameworks[n][0] for n in ("torch", "tensorflow", "transformers")]
    assert all(c is prof.hook_context for c in contexts)  # one hand-over for the session
    ci.shutdown()
    assert [fake_frameworks[n][-1] for n in ("torch", "tensorflow", "transformers")] == ["uninstall"] * 3


def test_an_unknown_framework_warns_once(out: Path, fake_frameworks: dict[str, Any]) -> None:
    _warn.reset()
    with pytest.warns(ci.CirronWarning, match="'keras'.*named 'tensorflow'"):
        prof = ci.profile(output_dir=str(out), install_signal_handlers=False, frameworks=["keras", "torch"])
    assert prof.installed_hooks == ["torch"]


def test_detected_frameworks_install_when_their_module_is_imported(
    out: Path, fake_frameworks: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # imported before profile()
    prof = ci.profile(output_dir=str(out), install_signal_handlers=False)
    assert prof.installed_hooks == ["torch"]
    assert sorted(prof.framework_finders) == ["tensorflow", "transformers"]
    assert "transformers.trainer" in [getattr(f, "fullname", "") for f in sys.meta_path]
    # the program imports Trainer's module, later: hooked right after its import has run
    finder = prof.framework_finders["transformers"]
    cancel(finder)  # what the finder does itself before its callback
    finder.callback()
    assert prof.installed_hooks == ["transformers", "torch"]
    assert sorted(prof.framework_finders) == ["tensorflow"]
    ci.shutdown()
    assert not {"keras", "transformers.trainer"} & {getattr(f, "fullname", "") for f in sys.meta_path}
    assert fake_frameworks["tensorflow"] == []  # never imported: never installed
    assert fake_frameworks["transformers"][-1] == "uninstall"


def test_an_import_after_profile_really_fires(
    out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-shot import hook with a real import: a `keras` package on sys.path, imported after
    profile(frameworks=None) with tensorflow "installed": the Keras hooks install on it."""
    pkg = tmp_path / "site" / "keras"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "class Model:\n    def fit(self, callbacks=None):\n        return callbacks\n"
        "class _C:\n    class Callback:\n        pass\ncallbacks = _C\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "tensorflow" else real(n, *a)
    )
    prof = ci.profile(output_dir=str(out), install_signal_handlers=False)
    assert "tensorflow" not in prof.installed_hooks and "tensorflow" in prof.framework_finders
    import keras  # type: ignore[import-not-found]

    assert "tensorflow" in prof.installed_hooks
    (callback,) = keras.Model().fit()
    assert type(callback).__name__ == "CirronKerasCallback"
    ci.shutdown()
    assert keras.Model().fit() is None
    sys.modules.pop("keras", None)


def test_install_failures_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    monkeypatch.setitem(sys.modules, "transformers.trainer", None)
    monkeypatch.setitem(sys.modules, "keras", None)
    before = counts("")
    assert _hooks_transformers.install(HookContext()) is None
    assert _hooks_keras.install(HookContext()) is None
    after = counts("")
    assert after.get("transformers.install", 0) == before.get("transformers.install", 0) + 1
    assert after.get("tensorflow.install", 0) == before.get("tensorflow.install", 0) + 1
