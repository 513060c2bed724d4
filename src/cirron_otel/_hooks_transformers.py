"""Hugging Face `Trainer` hooks: cirron-sdk 0.3.0's (its `hooks/_transformers_impl.py`).

`Trainer.__init__` is patched to add a `TrainerCallback` to every Trainer made while the hooks
are installed, so `trainer.train()` with no `ci.scope` calls records, as the SDK does:

    epoch (index=int(state.epoch))     on_epoch_begin .. on_epoch_end; `metrics` given to
                                       on_epoch_end (if any) as `summary` marks
      step (index=state.global_step)   on_step_begin .. on_step_end; a `learning_rate` mark
                                       (the scheduler's get_last_lr()[0], else args.learning_rate)
    marks                              every numeric entry of on_log's `logs` (loss, grad_norm,
                                       learning_rate, epoch, train_runtime, ...), `point` marks
                                       on whatever span is open (the session after the last epoch)

From on_train_begin to on_train_end the callback owns `epoch` and `step`
(`_hooks_common.HookContext`): the PyTorch hooks, installed too, then open neither, but still
record `forward`, `backward`, `optimizer_step` and `data_load` inside these spans.

Every callback body is guarded: a failure is counted in `health()["swallowed_errors"]` (keys
`transformers.*`, the SDK's own keys where it counts one), warned about once, never raised
into training. `uninstall()` restores `Trainer.__init__` and closes the spans a callback left
open; a callback of an earlier session's Trainer then does nothing.

Differences from the SDK, on purpose: a callback-level failure is counted too (the SDK only
logs it); on_train_begin releases the claims a failed earlier train() left (the SDK keeps them,
and the PyTorch hooks then never open epochs again); shutdown closes open spans.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from . import _native
from ._hooks_common import HookContext, Patches, Spans
from ._snapshots import capture_epoch

NAME = "transformers"
_SPANS = Spans(NAME, "Hugging Face Trainer")


class _CallbackLogic:
    """The callback's body; `make_callback_class` puts it before `TrainerCallback` (imported
    only when the hooks install). Trainer calls each `on_*` with (args, state, control, **kw)."""

    _hooks: TrainerHooks

    def __init__(self) -> None:
        super().__init__()
        self._epoch: Any = None
        self._step: Any = None
        self._claimed: list[str] = []
        self._hooks.callbacks.add(self)

    def _live(self) -> bool:
        return self._hooks.installed  # an earlier session's callback: nothing

    def _close_all(self) -> None:
        step, self._step = self._step, None
        _SPANS.close(step)
        epoch, self._epoch = self._epoch, None
        _SPANS.close(epoch)

    def _release(self) -> None:
        claimed, self._claimed = self._claimed, []
        self._hooks.context.release(NAME, claimed)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._live():
            _SPANS.guard("on_train_begin", self._train_begin)

    def _train_begin(self) -> None:
        self._close_all()  # what a train() that raised left open
        self._release()
        self._claimed = self._hooks.context.claim(NAME, ("epoch", "step"))

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._live():
            _SPANS.guard("on_epoch_begin", self._epoch_begin, state)

    def _epoch_begin(self, state: Any) -> None:
        self._epoch = _SPANS.open("epoch", int(state.epoch))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._live():
            _SPANS.guard("on_epoch_end", self._epoch_end, kwargs)

    def _epoch_end(self, kwargs: dict[str, Any]) -> None:
        # end-of-epoch values are the epoch's own: summary marks, as the SDK
        metrics = kwargs.get("metrics")
        if metrics:
            _SPANS.mark_logs(metrics, kind="summary")
        # The epoch ends here: the SDK snapshots the model being trained (kwargs["model"], no
        # ci.watch needed) against the epoch span still open, then closes it
        if self._epoch is not None:
            capture_epoch(kwargs.get("model"), self._epoch)
        epoch, self._epoch = self._epoch, None
        _SPANS.close(epoch)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._live():
            _SPANS.guard("on_step_begin", self._step_begin, state)

    def _step_begin(self, state: Any) -> None:
        self._step = _SPANS.open("step", int(state.global_step))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._live():
            _SPANS.guard("on_step_end", self._step_end, args, kwargs)

    def _step_end(self, args: Any, kwargs: dict[str, Any]) -> None:
        lr = _learning_rate(args, kwargs)
        if lr is not None:
            try:
                _native.mark("learning_rate", lr)
            except Exception as exc:
                _SPANS.failed("mark_learning_rate", exc)
        step, self._step = self._step, None
        _SPANS.close(step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self._live():
            _SPANS.guard("on_log", _SPANS.mark_logs, logs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._live():
            _SPANS.guard("on_train_end", self._train_end)

    def _train_end(self) -> None:
        self._close_all()
        self._release()


def _learning_rate(args: Any, kwargs: dict[str, Any]) -> float | None:
    """The scheduler's current rate, else `args.learning_rate` (the SDK's `_resolve_lr`)."""
    scheduler = kwargs.get("lr_scheduler")
    if scheduler is not None:
        try:
            last = scheduler.get_last_lr()
            if last:
                return float(last[0])
        except Exception:  # a probe: many schedulers have no get_last_lr (not counted, as the SDK)
            pass
    try:
        return float(args.learning_rate)
    except Exception as exc:
        _SPANS.failed("resolve_lr", exc)
        return None


def make_callback_class(base: type, hooks: TrainerHooks) -> type:
    """`CirronTrainerCallback`: the logic above on `base` (transformers' `TrainerCallback`)."""
    return type("CirronTrainerCallback", (_CallbackLogic, base), {"_hooks": hooks})


class TrainerHooks:
    """The installed Trainer hooks (cirron-sdk's TransformersHookHandle)."""

    name = NAME

    def __init__(self, context: HookContext) -> None:
        self.installed = False
        self.context = context
        self.callback_class: type | None = None  # the SDK's handle.CirronTrainerCallback
        self.callbacks: weakref.WeakSet[Any] = weakref.WeakSet()  # for uninstall's closing
        self._patches = Patches(_SPANS)

    def install_on(self, trainer_class: Any, callback_base: type) -> None:
        self.callback_class = make_callback_class(callback_base, self)
        original = trainer_class.__init__
        hooks = self

        @functools.wraps(original)
        def __init__(trainer: Any, *args: Any, **kwargs: Any) -> None:
            original(trainer, *args, **kwargs)  # first: callback_handler exists afterwards
            if hooks.installed:
                _SPANS.guard("attach_callback", hooks._attach, trainer)

        self._patches.patch(trainer_class, "__init__", __init__, "Trainer.__init__")
        self.installed = True

    def _attach(self, trainer: Any) -> None:
        handler = getattr(trainer, "callback_handler", None)
        existing = getattr(handler, "callbacks", None) if handler is not None else None
        cls = self.callback_class
        assert cls is not None  # set by install_on
        if existing is not None and any(isinstance(cb, cls) for cb in existing):
            return  # the program added one itself (the SDK dedups by isinstance too)
        trainer.add_callback(cls())

    def uninstall(self) -> None:
        """Close what the callbacks left open, restore `Trainer.__init__`. Never raises."""
        if not self.installed:
            return
        self.installed = False
        for callback in list(self.callbacks):
            try:
                callback._close_all()
                callback._release()
            except Exception as exc:
                _SPANS.failed("uninstall.close", exc)
        self._patches.undo()


def install(context: HookContext) -> TrainerHooks | None:
    """Import transformers' Trainer and install the hooks (`_profiler` decides when). Never
    raises; None when not installed (a failure counted as `transformers.install`)."""
    hooks = TrainerHooks(context)
    try:
        from transformers.trainer import Trainer
        from transformers.trainer_callback import TrainerCallback

        hooks.install_on(Trainer, TrainerCallback)
        return hooks
    except Exception as exc:  # a broken transformers never stops profile()
        hooks.installed = True
        hooks.uninstall()
        _SPANS.failed("install", exc)
        return None
