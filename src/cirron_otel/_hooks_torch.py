"""PyTorch framework hooks: cirron-sdk 0.3.0's (its `hooks/_torch_impl.py`) on our native scopes.

A training loop with no `ci.scope` calls still shows its structure. The spans, as the SDK
writes them (names, nesting, `index` and attributes):

    cirron.session
      epoch (index=0, 1, ...)          opened by DataLoader.__iter__, closed by the next one
        step (index=0, 1, ...)         opened by the first DataLoader.__next__ of a step,
                                       closed after optimizer.step(); numbered across epochs
          data_load (data_load_ns=...) one per batch fetched, opened after the fetch (the
                                       fetch's duration is the attribute, as in the SDK)
          forward (mode=train|eval)    the outermost nn.Module call only (forward depth 1)
          backward                     Tensor.backward / torch.autograd.backward
          optimizer_step               every torch.optim.Optimizer.step()

A loop that never iterates a DataLoader gets its epochs from the SDK's fallback: one every
`epoch_steps` optimizer steps (1000, or `profile(config={"torch": {"epoch_steps": N}})`).
While a Hugging Face Trainer or a Keras fit() runs, their callbacks own `epoch` (and
Trainer's `step`): these hooks then open neither, as in the SDK (`_hooks_common.HookContext`).

Every span goes through the native ring as a user scope does (`_native.scope`, entered and
exited by hand). Every hook body is guarded: a failure is counted in
`health()["swallowed_errors"]` (keys `torch.*`), warned about once, and never reaches the
training loop. `uninstall()` restores every patched function and removes every torch hook.

Weight / gradient snapshots of the model given to `ci.watch` (cirron_otel._snapshots), as the
SDK takes them: after every optimizer step the parameters' `.grad` tensors are stashed (the
program's `zero_grad()` clears them before the epoch ends), and at each epoch rotation and at
uninstall the outgoing epoch is snapshotted (weights live, gradients from the stash) before its
span closes, the records linked to that span.

Left out on purpose, relative to the SDK:
- CUDA event timing (`gpu_ns`): no CUDA timing path exists here (the SDK's pool of
  `torch.cuda.Event` pairs and its deferred emission); spans carry no `gpu_ns`.
One deliberate difference: the forward post-hook is registered with `always_call=True` (when
the installed torch has it), so a forward that raises closes its span and the depth count
stays right; the SDK's stays off by one and records no forward span for the rest of the run.

Imported only when the hooks are installed: it imports torch, which the caller has already
imported (or explicitly asked for with `profile(frameworks=["torch"])`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from . import _hooks_common
from ._hooks_common import HookContext, Patches, Spans
from .compat import snapshots_on, watched_model

NAME = "torch"
DEFAULT_EPOCH_STEPS = 1000

_SPANS = Spans(NAME, "PyTorch")
_failed = _SPANS.failed
_open = _SPANS.open
_close = _SPANS.close
_perf_ns = time.perf_counter_ns


class _ForwardDepth(threading.local):
    """Per-thread nn.Module call depth; only depth 1 opens a `forward` span."""

    def __init__(self) -> None:
        self.n = 0
        self.scope: Any = None


class _LoaderIter:
    """The iterator `DataLoader.__iter__` returns while the hooks are installed: each item
    fetched opens the implicit `step` span (if none is open) and records a `data_load` span."""

    __slots__ = ("_hooks", "_it")

    def __init__(self, hooks: TorchHooks, it: Iterator[Any]) -> None:
        self._hooks = hooks
        self._it = it

    def __iter__(self) -> _LoaderIter:
        return self

    def __next__(self) -> Any:
        t0 = _perf_ns()
        item = next(self._it)  # StopIteration (and the loader's own errors) pass through
        dt = _perf_ns() - t0
        try:
            self._hooks._data_loaded(dt)
        except Exception as exc:
            _failed("data_load", exc)
        return item

    def __len__(self) -> int:
        return len(self._it)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in _LoaderIter.__slots__:  # not set yet (copy / pickle): no recursion
            raise AttributeError(name)
        return getattr(self._it, name)


class TorchHooks:
    """The installed PyTorch hooks (cirron-sdk's TorchHookHandle); `uninstall()` reverses them."""

    name = NAME

    def __init__(self, epoch_steps: int = DEFAULT_EPOCH_STEPS, context: HookContext | None = None) -> None:
        self.installed = False
        self.epoch_steps = epoch_steps
        # the Trainer / Keras callbacks' claims: while they hold "epoch" / "step", these hooks
        # open neither (the SDK's checks, at the same places)
        self.owned = (context if context is not None else HookContext()).owned_scopes
        self._patches = Patches(_SPANS)
        self._handles: list[Any] = []
        self._fwd = _ForwardDepth()
        self._opt = threading.local()  # .scopes: optimizer_step spans between pre and post hook
        self.epoch: Any = None  # the open epoch span
        self.epoch_index = 0  # the next epoch's index
        self.epoch_step_count = 0  # optimizer steps since the last rotation (the fallback)
        self.dl_driven = False  # a DataLoader has rotated epochs: the step fallback is off
        self.step: Any = None  # the open implicit step span
        self.step_index = 0
        # snapshots: the watched model's (name, .grad) after the last optimizer step, and its
        # (name, parameter) pairs cached per model (held weakly: a collected model frees them)
        self.grad_refs: list[tuple[str, Any]] = []
        self._params: tuple[Any, list[tuple[str, Any]], Any] | None = None  # (ref, pairs, finalizer)

    # -- install / uninstall ------------------------------------------------------------------

    def install(self) -> None:
        import torch
        from torch.nn.modules import module as nn_module
        from torch.optim import optimizer as optim_module
        from torch.utils.data import DataLoader

        self._install_forward(nn_module)
        self._install_backward(torch)
        self._install_optimizer(optim_module)
        self._install_dataloader(DataLoader)
        self.installed = True

    def uninstall(self) -> None:
        """Close the open step and epoch spans, remove the torch hooks, restore every patched
        function (last patched first). Never raises."""
        if not self.installed:
            return
        self.installed = False
        try:
            self._close_open_epoch()
        except Exception as exc:
            _failed("uninstall.close_epoch", exc)
        for handle in self._handles:
            try:
                handle.remove()
            except Exception as exc:
                _failed("uninstall.remove_hook", exc)
        self._handles = []
        self._patches.undo()

    # -- forward ------------------------------------------------------------------------------

    def _install_forward(self, nn_module: Any) -> None:
        fwd = self._fwd

        def forward_pre(module: Any, _inputs: Any) -> None:
            try:
                fwd.n += 1
                if fwd.n != 1:
                    return
                try:
                    mode = "train" if bool(module.training) else "eval"
                except Exception as exc:
                    _failed("forward_mode", exc)
                    mode = "train"
                fwd.scope = _open("forward", mode=mode)
            except Exception as exc:
                _failed("forward_pre", exc)

        def forward_post(_module: Any, _inputs: Any, _output: Any) -> None:
            try:
                if fwd.n == 1:
                    scope, fwd.scope = fwd.scope, None
                    _close(scope)
            except Exception as exc:
                _failed("forward_post", exc)
            finally:
                if fwd.n > 0:
                    fwd.n -= 1

        self._handles.append(nn_module.register_module_forward_pre_hook(forward_pre))
        try:
            post = nn_module.register_module_forward_hook(forward_post, always_call=True)
        except TypeError:  # a torch without always_call: the SDK's registration
            post = nn_module.register_module_forward_hook(forward_post)
        self._handles.append(post)

    # -- backward -----------------------------------------------------------------------------

    def _install_backward(self, torch: Any) -> None:
        tensor_backward = torch.Tensor.backward
        autograd_backward = torch.autograd.backward

        def backward(self: Any, *args: Any, **kwargs: Any) -> Any:
            scope = _open("backward")
            try:
                return tensor_backward(self, *args, **kwargs)
            finally:
                _close(scope)

        def autograd_backward_hook(*args: Any, **kwargs: Any) -> Any:
            # Tensor.backward calls torch.autograd.backward: one span, not two
            try:
                current = _hooks_common._current()
                nested = current is not None and current.name == "backward"
            except Exception as exc:
                _failed("backward", exc)
                nested = True
            scope = None if nested else _open("backward")
            try:
                return autograd_backward(*args, **kwargs)
            finally:
                _close(scope)

        backward.__doc__ = tensor_backward.__doc__
        autograd_backward_hook.__doc__ = autograd_backward.__doc__
        self._patches.patch(torch.Tensor, "backward", backward, "Tensor.backward")
        self._patches.patch(torch.autograd, "backward", autograd_backward_hook, "autograd.backward")

    # -- optimizer step -----------------------------------------------------------------------

    def _install_optimizer(self, optim_module: Any) -> None:
        opt = self._opt

        def step_pre(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            try:
                scope = _open("optimizer_step")
                scopes = getattr(opt, "scopes", None)
                if scopes is None:
                    scopes = opt.scopes = []
                scopes.append(scope)
            except Exception as exc:
                _failed("optimizer_pre", exc)

        def step_post(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            try:
                scopes = getattr(opt, "scopes", None)
                _close(scopes.pop() if scopes else None)
                self._optimizer_stepped()
            except Exception as exc:
                _failed("optimizer_post", exc)

        self._handles.append(optim_module.register_optimizer_step_pre_hook(step_pre))
        self._handles.append(optim_module.register_optimizer_step_post_hook(step_post))

    def _optimizer_stepped(self) -> None:
        # While .grad is still set: the program's zero_grad() runs before the epoch ends.
        if snapshots_on():
            try:
                self._stash_grads()
            except Exception as exc:
                _failed("snapshot_grad_stash", exc)
        # The implicit step span (opened by the loader) closes here; gradient accumulation
        # (several forward/backward per optimizer step) stays inside one step.
        if "step" not in self.owned:
            self._close_step()
        if "epoch" in self.owned:  # a Trainer / fit() is running: its callback opens epochs
            return
        # Epochs for loops that never iterate a DataLoader; off for good once one has.
        if not self.dl_driven:
            self.epoch_step_count += 1
            if self.epoch_step_count >= self.epoch_steps:
                self._rotate_epoch()

    # -- DataLoader ---------------------------------------------------------------------------

    def _install_dataloader(self, loader_class: Any) -> None:
        loader_iter = loader_class.__iter__
        hooks = self

        def dataloader_iter(self: Any) -> Any:
            if "epoch" not in hooks.owned:
                try:
                    hooks.dl_driven = True
                    hooks._rotate_epoch()
                except Exception as exc:
                    _failed("epoch_rotate", exc)
            return _LoaderIter(hooks, loader_iter(self))

        dataloader_iter.__doc__ = loader_iter.__doc__
        self._patches.patch(loader_class, "__iter__", dataloader_iter, "DataLoader.__iter__")

    def _data_loaded(self, dt: int) -> None:
        if self.step is None and "step" not in self.owned:
            self.step = _open("step", self.step_index)
        scope = _open("data_load", data_load_ns=dt)
        _close(scope)

    # -- snapshots ----------------------------------------------------------------------------

    def _stash_grads(self) -> None:
        model = watched_model()
        if model is None:
            self._drop_params()
            return
        pairs = self._param_pairs(model)
        if pairs is not None:
            self.grad_refs = [(n, p.grad) for n, p in pairs if p.grad is not None]

    def _param_pairs(self, model: Any) -> list[tuple[str, Any]] | None:
        """The model's (name, parameter) pairs, cached: fixed for its lifetime, and walking
        named_parameters() every step would cost a ResNet's 161 tensors per step."""
        cached = self._params
        if cached is not None and cached[0]() is model:
            return cached[1]
        named = getattr(model, "named_parameters", None)
        if not callable(named):
            self._drop_params()
            return None
        pairs = [(str(n), p) for n, p in named()]  # str: safetensors keys
        self._drop_params()
        with contextlib.suppress(TypeError):  # not weakly referenceable: not cached, not held
            self._params = (weakref.ref(model), pairs, weakref.finalize(model, self._drop_params))
        return pairs

    def _drop_params(self) -> None:
        cached, self._params = self._params, None
        if cached is not None:
            cached[2].detach()  # a no-op when it is the finalizer calling

    def _snapshot(self, epoch: Any, where: str) -> None:
        """Snapshot the watched model for `epoch` (still open); never raises."""
        refs, self.grad_refs = self.grad_refs, []
        try:
            model = watched_model()
            if model is not None and snapshots_on():
                from ._snapshots import capture_epoch

                capture_epoch(model, epoch, grad_refs=refs)
        except Exception as exc:
            _failed(where, exc)

    # -- epochs -------------------------------------------------------------------------------

    def _close_step(self) -> None:
        step = self.step
        if step is not None:
            self.step = None
            self.step_index += 1
            _close(step)

    def _rotate_epoch(self) -> None:
        # A step left open by an eval-only pass (no optimizer.step) closes first, so the new
        # epoch does not nest inside it.
        if "step" not in self.owned:
            self._close_step()
        previous = self.epoch
        if previous is not None:
            self.epoch = None
            self._snapshot(previous, "snapshot_capture")  # linked to it: before it closes
            _close(previous)
        self.epoch = _open("epoch", self.epoch_index)
        self.epoch_index += 1
        self.epoch_step_count = 0

    def _close_open_epoch(self) -> None:
        step, self.step = self.step, None
        _close(step)
        epoch, self.epoch = self.epoch, None
        if epoch is not None:
            self._snapshot(epoch, "snapshot_capture_final")
        _close(epoch)


def install(context: HookContext) -> TorchHooks | None:
    """Import torch and install the hooks (`_profiler` decides when). Never raises; None when
    not installed (a failure counted as `torch.install`)."""
    hooks = None
    try:
        hooks = TorchHooks(_epoch_steps(), context)
        hooks.install()
        return hooks
    except Exception as exc:  # a broken torch never stops profile()
        if hooks is not None:
            hooks.installed = True
            hooks.uninstall()  # whatever was patched before the failure
        _failed("install", exc)
        return None


def _epoch_steps() -> int:
    from .compat import profiling_config

    try:
        section = profiling_config().get("torch") or {}
        value = section.get("epoch_steps") if isinstance(section, dict) else None
        return DEFAULT_EPOCH_STEPS if value is None else int(value)
    except Exception:
        return DEFAULT_EPOCH_STEPS
