"""Keras hooks: cirron-sdk 0.3.0's (its `hooks/_tf_impl.py`; the SDK calls them "tensorflow").

`keras.Model.fit` is patched to add a `keras.callbacks.Callback` to every fit() while the hooks
are installed, so `model.fit(...)` with no `ci.scope` calls records, as the SDK does:

    epoch (index=epoch)        on_epoch_begin .. on_epoch_end; the epoch's `logs` as marks
      batch (index=batch)      on_train_batch_begin .. on_train_batch_end (the index restarts
                               each epoch); the batch's `logs` as marks

Marks are `point` marks, one per numeric entry of `logs` (loss, the compiled metrics). From
on_train_begin to on_train_end the callback owns `epoch` (`_hooks_common.HookContext`): the
PyTorch hooks (Keras 3 on its torch backend drives torch DataLoaders and modules) open no
epoch then, but, as in the SDK, still open their implicit `step` and the rest.

Every callback body is guarded: a failure is counted in `health()["swallowed_errors"]` (keys
`tensorflow.*`), warned about once, never raised into training. `uninstall()` restores
`Model.fit`; a callback of an earlier session then does nothing.

Differences from the SDK, on purpose: failures are counted (the SDK drops them silently); a
fit() that raises leaves no span open (the SDK's stay open, and later spans nest under them);
`callbacks` given positionally gets the callback too (the SDK passes `callbacks=` again, and
fit() raises TypeError).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from ._hooks_common import HookContext, Patches, Spans
from ._snapshots import capture_epoch

NAME = "tensorflow"  # the SDK's name (health()["installed_hooks"], frameworks=[...])
_SPANS = Spans(NAME, "Keras")
_CALLBACKS_POSITION = 5  # fit(x, y, batch_size, epochs, verbose, callbacks, ...): Keras 2 and 3


class _CallbackLogic:
    """The callback's body; `make_callback_class` puts it before `keras.callbacks.Callback`."""

    _hooks: KerasHooks

    def __init__(self) -> None:
        super().__init__()
        self._epoch: Any = None
        self._batch: Any = None
        self._claimed: list[str] = []
        self._hooks.callbacks.add(self)

    def _live(self) -> bool:
        return self._hooks.installed  # an earlier session's callback: nothing

    def _close_all(self) -> None:
        batch, self._batch = self._batch, None
        _SPANS.close(batch)
        epoch, self._epoch = self._epoch, None
        _SPANS.close(epoch)
        claimed, self._claimed = self._claimed, []
        self._hooks.context.release(NAME, claimed)

    def on_train_begin(self, logs: Any = None) -> None:
        if self._live():
            _SPANS.guard("on_train_begin", self._train_begin)

    def _train_begin(self) -> None:
        self._claimed = self._hooks.context.claim(NAME, ("epoch",))

    def on_train_end(self, logs: Any = None) -> None:
        if self._live():
            _SPANS.guard("on_train_end", self._train_end)

    def _train_end(self) -> None:
        claimed, self._claimed = self._claimed, []
        self._hooks.context.release(NAME, claimed)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self._live():
            _SPANS.guard("on_epoch_begin", self._epoch_begin, epoch)

    def _epoch_begin(self, epoch: int) -> None:
        self._epoch = _SPANS.open("epoch", int(epoch))

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self._live():
            _SPANS.guard("on_epoch_end", self._epoch_end, logs)

    def _epoch_end(self, logs: Any) -> None:
        _SPANS.guard("on_epoch_end.logs", _SPANS.mark_logs, logs)
        # The epoch ends here: the SDK snapshots the model being trained (self.model, no
        # ci.watch needed) against the epoch span still open, then closes it
        if self._epoch is not None:
            capture_epoch(getattr(self, "model", None), self._epoch)
        epoch, self._epoch = self._epoch, None
        _SPANS.close(epoch)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self._live():
            _SPANS.guard("on_train_batch_begin", self._batch_begin, batch)

    def _batch_begin(self, batch: int) -> None:
        self._batch = _SPANS.open("batch", int(batch))

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self._live():
            _SPANS.guard("on_train_batch_end", self._batch_end, logs)

    def _batch_end(self, logs: Any) -> None:
        _SPANS.guard("on_train_batch_end.logs", _SPANS.mark_logs, logs)
        batch, self._batch = self._batch, None
        _SPANS.close(batch)


def make_callback_class(base: type, hooks: KerasHooks) -> type:
    """`CirronKerasCallback`: the logic above on `base` (`keras.callbacks.Callback`)."""
    return type("CirronKerasCallback", (_CallbackLogic, base), {"_hooks": hooks})


class KerasHooks:
    """The installed Keras hooks (cirron-sdk's TFHookHandle)."""

    name = NAME

    def __init__(self, context: HookContext) -> None:
        self.installed = False
        self.context = context
        self.callback_class: type | None = None  # the SDK's handle.CirronKerasCallback
        self.callbacks: weakref.WeakSet[Any] = weakref.WeakSet()
        self._patches = Patches(_SPANS)

    def install_on(self, model_class: Any, callback_base: type) -> None:
        self.callback_class = make_callback_class(callback_base, self)
        original = model_class.fit
        hooks = self

        @functools.wraps(original)
        def fit(model: Any, *args: Any, **kwargs: Any) -> Any:
            added = None
            if hooks.installed:
                try:
                    args, kwargs, added = hooks._with_callback(args, kwargs)
                except Exception as exc:
                    _SPANS.failed("attach_callback", exc)
            try:
                return original(model, *args, **kwargs)
            finally:
                if added is not None:  # a fit() that raised: its spans closed, its claim released
                    _SPANS.guard("fit_end", added._close_all)

        self._patches.patch(model_class, "fit", fit, "Model.fit")
        self.installed = True

    def _with_callback(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        """fit()'s arguments with our callback added to a new `callbacks` list (the caller's
        list is never changed), unless one is there already; and the callback added."""
        positional = len(args) > _CALLBACKS_POSITION
        given = args[_CALLBACKS_POSITION] if positional else kwargs.get("callbacks")
        if given is None:
            callbacks: list[Any] = []
        else:
            try:
                callbacks = list(given)
            except TypeError:  # a single callback
                callbacks = [given]
        cls = self.callback_class
        assert cls is not None  # set by install_on
        added = None
        if not any(isinstance(cb, cls) for cb in callbacks):
            added = cls()
            callbacks.append(added)
        if positional:
            args = (*args[:_CALLBACKS_POSITION], callbacks, *args[_CALLBACKS_POSITION + 1 :])
        else:
            kwargs = {**kwargs, "callbacks": callbacks}
        return args, kwargs, added

    def uninstall(self) -> None:
        """Close what the callbacks left open, restore `Model.fit`. Never raises."""
        if not self.installed:
            return
        self.installed = False
        for callback in list(self.callbacks):
            _SPANS.guard("uninstall.close", callback._close_all)
        self._patches.undo()


def install(context: HookContext) -> KerasHooks | None:
    """Import keras and install the hooks (`_profiler` decides when). Never raises; None when
    not installed (a failure counted as `tensorflow.install`)."""
    hooks = KerasHooks(context)
    try:
        import keras

        hooks.install_on(keras.Model, keras.callbacks.Callback)
        return hooks
    except Exception as exc:  # a broken keras never stops profile()
        hooks.installed = True
        hooks.uninstall()
        _SPANS.failed("install", exc)
        return None
