"""The PyTorch hooks' logic without PyTorch: `TorchHooks` installed on stand-ins that call the
hooks the way torch does (global module forward hooks, Tensor.backward calling
torch.autograd.backward, global optimizer step hooks, DataLoader.__iter__). The same hooks
with real torch, and against cirron-sdk: tests/integration/test_torch_hooks.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import cirron_otel as ci
from cirron_otel import _hooks_common, _hooks_torch, _native, _warn
from cirron_otel._hooks_common import HookContext
from cirron_otel._hooks_torch import TorchHooks
from tests.support.helpers import counter_growth
from tests.support.spool_tree import spans, tree


class _Handle:
    def __init__(self, hooks: dict[int, Any], key: int) -> None:
        self.hooks, self.key = hooks, key

    def remove(self) -> None:
        self.hooks.pop(self.key, None)


class FakeNN:
    """torch.nn.modules.module's global forward hooks, and a Module calling them as torch does."""

    def __init__(self) -> None:
        self.pre: dict[int, Any] = {}
        self.post: dict[int, Any] = {}
        self.always: set[int] = set()
        self.n = 0

    def register_module_forward_pre_hook(self, hook: Callable[..., Any]) -> _Handle:
        self.n += 1
        self.pre[self.n] = hook
        return _Handle(self.pre, self.n)

    def register_module_forward_hook(self, hook: Callable[..., Any], *, always_call: bool = False) -> _Handle:
        self.n += 1
        self.post[self.n] = hook
        if always_call:
            self.always.add(self.n)
        return _Handle(self.post, self.n)

    def module(self, forward: Callable[[Any], Any], training: Any = True) -> Callable[[Any], Any]:
        nn = self

        class Module:
            def __init__(self) -> None:
                self.training = training

            def __call__(self, x: Any) -> Any:
                for hook in list(nn.pre.values()):
                    hook(self, (x,))
                try:
                    out = forward(x)
                except BaseException:
                    for key, hook in list(nn.post.items()):
                        if key in nn.always:
                            hook(self, (x,), None)
                    raise
                for hook in list(nn.post.values()):
                    hook(self, (x,), out)
                return out

        return Module()


class FakeOptim:
    """torch.optim.optimizer's global step hooks, and an optimizer whose step() calls them."""

    def __init__(self) -> None:
        self.pre: dict[int, Any] = {}
        self.post: dict[int, Any] = {}
        self.n = 0
        self.steps = 0

    def register_optimizer_step_pre_hook(self, hook: Callable[..., Any]) -> _Handle:
        self.n += 1
        self.pre[self.n] = hook
        return _Handle(self.pre, self.n)

    def register_optimizer_step_post_hook(self, hook: Callable[..., Any]) -> _Handle:
        self.n += 1
        self.post[self.n] = hook
        return _Handle(self.post, self.n)

    def step(self) -> None:
        for hook in list(self.pre.values()):
            hook(self, (), {})
        self.steps += 1
        for hook in list(self.post.values()):
            hook(self, (), {})


def make_torch() -> Any:
    """A `torch` whose Tensor.backward calls torch.autograd.backward (looked up at call time)."""
    torch = SimpleNamespace()
    torch.calls = []

    def autograd_backward(tensor: Any) -> None:
        torch.calls.append("autograd")

    class Tensor:
        def backward(self) -> None:
            torch.autograd.backward(self)

    torch.Tensor = Tensor
    torch.autograd = SimpleNamespace(backward=autograd_backward)
    return torch


class Loader:
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)


class Fakes:
    def __init__(self, epoch_steps: int = 1000, context: HookContext | None = None) -> None:
        self.nn, self.optim, self.torch = FakeNN(), FakeOptim(), make_torch()
        self.Loader = type("Loader", (Loader,), {})
        self.originals = (self.torch.Tensor.__dict__["backward"], self.torch.autograd.backward)
        self.loader_iter = self.Loader.__dict__.get("__iter__")
        self.hooks = TorchHooks(epoch_steps, context)
        self.hooks._install_forward(self.nn)
        self.hooks._install_backward(self.torch)
        self.hooks._install_optimizer(self.optim)
        self.hooks._install_dataloader(self.Loader)
        self.hooks.installed = True
        inner = self.nn.module(lambda x: x)
        self.model = self.nn.module(lambda x: inner(x) + 1)  # a submodule: depth 2, no span
        self.loss = self.nn.module(lambda x: x * 2)

    def train_step(self, x: Any) -> None:
        self.loss(self.model(x))
        self.torch.Tensor().backward()
        self.optim.step()


@pytest.fixture
def session(out: Path) -> Iterator[Callable[[], list[Any]]]:
    current = _native.scope_var.get(None)
    ci.profile(output_dir=str(out), install_signal_handlers=False, frameworks=[])

    def finish() -> list[Any]:
        ci.shutdown()
        return tree(spans(out / "spool"))

    yield finish
    # a test that failed half-way leaves its spans open: not the next test's current scope
    _native.scope_var.set(current)


STEP = [
    ("data_load", None, {"data_load_ns": "<ns>"}, []),
    ("forward", None, {"mode": "train"}, []),
    ("forward", None, {"mode": "train"}, []),
    ("backward", None, {}, []),
    ("optimizer_step", None, {}, []),
]


def test_two_epochs_of_three_batches(session: Callable[[], list[Any]]) -> None:
    f = Fakes()
    loader = f.Loader([1, 2, 3])
    for _ in range(2):
        for x in loader:
            f.train_step(x)
    f.hooks.uninstall()
    assert session() == [
        ("epoch", 0, {}, [("step", i, {}, STEP) for i in (0, 1, 2)]),
        ("epoch", 1, {}, [("step", i, {}, STEP) for i in (3, 4, 5)]),
    ]
    assert f.torch.calls == ["autograd"] * 6  # the real backward ran every time


def test_uninstall_restores_everything(session: Callable[[], list[Any]]) -> None:
    f = Fakes()
    assert f.torch.Tensor.__dict__["backward"] is not f.originals[0]
    assert f.torch.autograd.backward is not f.originals[1]
    assert f.Loader.__dict__.get("__iter__") is not f.loader_iter
    assert len(f.nn.pre) == len(f.nn.post) == len(f.optim.pre) == len(f.optim.post) == 1
    f.hooks.uninstall()
    f.hooks.uninstall()  # idempotent
    assert f.torch.Tensor.__dict__["backward"] is f.originals[0]
    assert f.torch.autograd.backward is f.originals[1]
    assert f.Loader.__dict__.get("__iter__") is f.loader_iter
    assert f.nn.pre == f.nn.post == f.optim.pre == f.optim.post == {}
    for x in f.Loader([1]):
        f.train_step(x)
    assert session() == []


def test_eval_pass_and_gradient_accumulation(session: Callable[[], list[Any]]) -> None:
    f = Fakes()
    eval_model = f.nn.module(lambda x: x, training=False)
    for x in f.Loader([1, 2]):  # eval: no optimizer.step, one step span until the rotation
        eval_model(x)
    for x in f.Loader([1, 2]):  # accumulation: two batches per optimizer step
        f.model(x)
        f.torch.autograd.backward(x)  # torch.autograd.backward called directly: its own span
        if x == 2:
            f.optim.step()
    f.hooks.uninstall()
    dl = ("data_load", None, {"data_load_ns": "<ns>"}, [])
    fwd_eval, fwd = ("forward", None, {"mode": "eval"}, []), ("forward", None, {"mode": "train"}, [])
    bw, opt = ("backward", None, {}, []), ("optimizer_step", None, {}, [])
    assert session() == [
        ("epoch", 0, {}, [("step", 0, {}, [dl, fwd_eval, dl, fwd_eval])]),
        ("epoch", 1, {}, [("step", 1, {}, [dl, fwd, bw, dl, fwd, bw, opt])]),
    ]


def test_under_ci_epochs_each_torch_epoch_nests_in_its_own(session: Callable[[], list[Any]]) -> None:
    # The torch epoch is closed by the next DataLoader.__iter__, when ci.epochs' next epoch is
    # the current scope: closing it must leave that one current. (cirron-sdk nests its second
    # ci.epochs epoch inside the first here: its scope exits pop whatever is on top.)
    f = Fakes()
    for _ in ci.epochs(range(2)):
        for x in f.Loader([1]):
            f.train_step(x)
    f.hooks.uninstall()
    assert session() == [
        ("epoch", 0, {}, [("epoch", 0, {}, [("step", 0, {}, STEP)])]),
        ("epoch", 1, {}, [("epoch", 1, {}, [("step", 1, {}, STEP)])]),
    ]


def test_epochs_without_a_dataloader_every_epoch_steps(session: Callable[[], list[Any]]) -> None:
    f = Fakes(epoch_steps=2)
    for x in range(5):
        f.train_step(x)
    f.hooks.uninstall()
    unit = [("forward", None, {"mode": "train"}, [])] * 2 + [
        ("backward", None, {}, []),
        ("optimizer_step", None, {}, []),
    ]
    assert session() == [*unit, *unit, ("epoch", 0, {}, unit * 2), ("epoch", 1, {}, unit)]


def test_then_a_dataloader_turns_the_step_fallback_off(session: Callable[[], list[Any]]) -> None:
    f = Fakes(epoch_steps=1)
    for x in f.Loader([1, 2, 3]):
        f.train_step(x)
    f.hooks.uninstall()
    assert [(n, i) for n, i, _, _ in session()] == [("epoch", 0)]


def test_no_epoch_or_step_while_a_trainer_owns_them(session: Callable[[], list[Any]]) -> None:
    # the SDK's hand-over: Trainer's callback claims both, Keras's only the epoch (its torch
    # backend has no torch optimizer: the step then stays open until shutdown, as in the SDK)
    context = HookContext()
    f = Fakes(epoch_steps=1, context=context)
    context.owned_scopes.update(epoch="transformers", step="transformers")
    for x in f.Loader([1, 2]):
        f.train_step(x)
    context.owned_scopes.clear()  # on_train_end: the hooks' own epochs and steps again
    for x in f.Loader([1]):
        f.train_step(x)
    context.owned_scopes["epoch"] = "tensorflow"
    for x in f.Loader([1]):
        f.train_step(x)
    f.hooks.uninstall()
    assert session() == [
        *STEP * 2,
        ("epoch", 0, {}, [("step", 0, {}, STEP), ("step", 1, {}, STEP)]),
    ]


def test_a_forward_that_raises_closes_its_span_and_the_depth(session: Callable[[], list[Any]]) -> None:
    f = Fakes()

    def boom(x: Any) -> Any:
        raise ValueError("bad batch")

    bad = f.nn.module(boom)
    with pytest.raises(ValueError, match="bad batch"):
        bad(1)
    assert f.hooks._fwd.n == 0
    f.model(1)
    f.hooks.uninstall()
    assert session() == [("forward", None, {"mode": "train"}, [])] * 2


def test_hook_failures_are_counted_never_raised(
    session: Callable[[], list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def counts() -> dict[str, int]:
        return {k: v for k, v in ci.health()["swallowed_errors"].items() if k.startswith("torch.")}

    class NoMode:
        def __bool__(self) -> bool:
            raise RuntimeError("no mode")

    f = Fakes()
    _warn.reset()
    before = counts()
    odd = f.nn.module(lambda x: x, training=NoMode())
    with pytest.warns(ci.CirronWarning, match="PyTorch forward_mode hook failed"):
        odd(1)  # the mode probe fails: "train", as the SDK

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("telemetry bug")

    monkeypatch.setattr(_hooks_common, "_current", broken)  # every close and the backward probe
    for x in f.Loader([1]):
        f.train_step(x)
    monkeypatch.undo()
    after = counts()
    grew = counter_growth(before, after)
    # the probe before each close failed (the span closed all the same): data_load,
    # forward x2, backward, optimizer_step, step; autograd.backward's "already in a backward
    # span?" probe failed: no second span
    assert grew == {"torch.forward_mode": 1, "torch.close": 6, "torch.backward": 1}
    assert f.optim.steps == 1 and f.torch.calls == ["autograd"]
    f.hooks.uninstall()
    assert session() == [
        ("forward", None, {"mode": "train"}, []),
        ("epoch", 0, {}, [("step", 0, {}, STEP)]),
    ]


def test_a_failed_install_undoes_what_it_did(monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fakes()
    f.hooks.uninstall()
    hooks = TorchHooks()
    nn, torch = FakeNN(), make_torch()
    original = torch.Tensor.__dict__["backward"]

    def install() -> None:
        hooks._install_forward(nn)
        hooks._install_backward(torch)
        raise ImportError("no torch.optim")

    monkeypatch.setattr(hooks, "install", install)
    monkeypatch.setattr(_hooks_torch, "TorchHooks", lambda steps, context: hooks)
    assert _hooks_torch.install(HookContext()) is None
    assert nn.pre == nn.post == {} and torch.Tensor.__dict__["backward"] is original
    assert "torch.install" in ci.health()["swallowed_errors"]
