"""The PyTorch hooks with real torch: a training loop with no ci.scope calls, its spool as
cirron-sdk 0.3.0 writes it (run side by side with the SDK when it is installed), the hooks gone
after shutdown, a failing hook counted and never raised, frameworks=[] and a program that has
not imported torch. (The hook logic without torch: tests/unit/test_torch_hooks_logic.py.)

torch is not a test dependency (several GB with its CUDA wheels): without it these skip, except
under `CIRRON_REQUIRE_TORCH=1` (.ci/run, which installs it), where they fail.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cirron_otel as ci
from cirron_otel import _hooks_common, _hooks_torch, _warn
from tests.support.frameworks import require, run
from tests.support.helpers import counter_growth
from tests.support.spool_tree import spans, tree

torch = require(
    "torch",
    "CIRRON_REQUIRE_TORCH",
    "PyTorch is not installed (not a test dependency): `pip install torch` to run these",
)
DataLoader = torch.utils.data.DataLoader

# The loop the tests run: 2 epochs x 3 batches, nn.Sequential + nn.MSELoss (both modules: two
# top-level forward spans a step), SGD, no ci.scope calls.
LOOP = r"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

def train(epochs=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.MSELoss()
    loader = DataLoader(TensorDataset(torch.randn(6, 4), torch.randn(6, 1)), batch_size=2)
    losses = []
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses
"""
_loop: dict[str, Any] = {}
exec(LOOP, _loop)  # the same source runs in the scripts below (under either package)
train: Callable[..., list[float]] = _loop["train"]
BASELINE = train()  # unprofiled: a profiled run computes exactly the same losses

STEP = [
    ("data_load", None, {"data_load_ns": "<ns>"}, []),
    ("forward", None, {"mode": "train"}, []),  # the model (its Linear/ReLU: depth > 1, no span)
    ("forward", None, {"mode": "train"}, []),  # the loss module
    ("backward", None, {}, []),
    ("optimizer_step", None, {}, []),
]
EXPECTED = [
    ("epoch", 0, {}, [("step", i, {}, STEP) for i in (0, 1, 2)]),
    ("epoch", 1, {}, [("step", i, {}, STEP) for i in (3, 4, 5)]),
]


def originals() -> dict[str, Any]:
    from torch.nn.modules import module as nn_module
    from torch.optim import optimizer as optim_module

    return {
        "Tensor.backward": torch.Tensor.__dict__["backward"],
        "autograd.backward": torch.autograd.backward,
        "DataLoader.__iter__": DataLoader.__dict__["__iter__"],
        "forward_pre_hooks": dict(nn_module._global_forward_pre_hooks),
        "forward_hooks": dict(nn_module._global_forward_hooks),
        "optimizer_pre_hooks": dict(optim_module._global_optimizer_pre_hooks),
        "optimizer_post_hooks": dict(optim_module._global_optimizer_post_hooks),
    }


def profile(out: Path, **kwargs: Any) -> ci.Profiler:
    return ci.profile(output_dir=str(out), install_signal_handlers=False, **kwargs)


def test_training_loop_without_scopes_shows_its_structure(out: Path) -> None:
    before = originals()
    prof = profile(out)
    # (and Trainer's, after torch, when another test module has imported transformers.trainer)
    assert prof.installed_hooks[-1:] == ["torch"] and ci.health()["installed_hooks"][-1:] == ["torch"]
    assert originals() != before
    losses = train()
    ci.shutdown()
    assert losses == BASELINE
    assert tree(spans(out / "spool")) == EXPECTED
    assert ci.health()["installed_hooks"] == [] and prof.installed_hooks == []


def test_shutdown_restores_every_patched_function_and_hook(out: Path) -> None:
    before = originals()
    profile(out)
    during = originals()
    for key in ("Tensor.backward", "autograd.backward", "DataLoader.__iter__"):
        assert during[key] is not before[key], key
    for key in ("forward_pre_hooks", "forward_hooks", "optimizer_pre_hooks", "optimizer_post_hooks"):
        assert len(during[key]) == len(before[key]) + 1, key
    ci.shutdown()
    after = originals()
    assert after == before
    for key in ("Tensor.backward", "autograd.backward", "DataLoader.__iter__"):
        assert after[key] is before[key], key
    # and a second session installs them afresh (no leftover state from the first)
    profile(out / "again")
    train(epochs=1)
    ci.shutdown()
    assert [n[:2] for n in tree(spans(out / "again" / "spool"))] == [("epoch", 0)]
    assert originals() == before


def test_a_failing_hook_never_reaches_the_loop_and_is_counted(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("telemetry bug")

    def counts() -> dict[str, int]:
        return {k: v for k, v in ci.health()["swallowed_errors"].items() if k.startswith("torch.")}

    profile(out)
    _warn.reset()  # warned once per process: this test wants to see it
    before = counts()
    monkeypatch.setattr(_hooks_common, "_scope", broken)  # every span the hooks open fails
    monkeypatch.setattr(_hooks_torch.TorchHooks, "_data_loaded", broken)
    with pytest.warns(ci.CirronWarning, match="PyTorch"):
        losses = train()
    after = counts()
    assert losses == BASELINE
    grew = counter_growth(before, after)
    assert grew == {
        "torch.open.epoch": 2,
        "torch.data_load": 6,
        "torch.open.forward": 12,
        # Tensor.backward's open failed, so autograd.backward (which it calls) finds no
        # backward span open and tries too: as the SDK does
        "torch.open.backward": 12,
        "torch.open.optimizer_step": 6,
    }
    assert ci.health()["swallowed_error_count"] >= sum(grew.values())
    monkeypatch.undo()
    ci.shutdown()
    assert [s["name"] for s in spans(out / "spool")] == ["cirron.session"]


def test_frameworks_empty_installs_nothing(out: Path) -> None:
    before = originals()
    prof = profile(out, frameworks=[])
    assert prof.installed_hooks == [] and ci.health()["installed_hooks"] == []
    assert originals() == before
    train(epochs=1)
    ci.shutdown()
    assert [s["name"] for s in spans(out / "spool")] == ["cirron.session"]


def test_torch_not_imported_is_not_imported_unless_asked(tmp_path: Path) -> None:
    code = (
        "import sys, json, cirron_otel as ci\n"
        "kw = json.loads(sys.argv[1])\n"
        "p = ci.profile(output_dir='out', install_signal_handlers=False, **kw)\n"
        "print('@@' + json.dumps(['torch' in sys.modules, p.installed_hooks]))\n"
        "ci.shutdown()\n"
    )
    for kwargs, expected in (({}, [False, []]), ({"frameworks": ["torch"]}, [True, ["torch"]])):
        proc = run(code, tmp_path, json.dumps(kwargs))
        assert json.loads(proc.stdout.split("@@")[-1]) == expected, kwargs


# profile() first, torch imported afterwards (LOOP starts with `import torch`)
LATE = (
    "import sys, json\n"
    "import cirron_otel as ci\n"
    "p = ci.profile(output_dir='out', install_signal_handlers=False, **json.loads(sys.argv[1]))\n"
    "before = (p.installed_hooks, 'torch' in sys.modules)\n" + LOOP + "\nafter = p.installed_hooks\n"
    "train()\n"
    "finders = [getattr(f, 'fullname', '') for f in sys.meta_path]  # what _on_import waits for\n"
    "ci.shutdown()\n"
    "print('@@' + json.dumps([before, after, finders]))\n"
)


def test_torch_imported_after_profile_is_hooked_as_it_is_imported(tmp_path: Path) -> None:
    """The SDK imports torch at profile() whenever it is installed; we never do, so a program
    that imports torch after profile() gets the hooks right after torch's import has run."""
    for kwargs, hooked in (({}, True), ({"frameworks": []}, False)):
        cwd = tmp_path / str(hooked)
        cwd.mkdir()
        proc = run(LATE, cwd, json.dumps(kwargs))
        before, after, finders = json.loads(proc.stdout.split("@@")[-1])
        assert before == [[], False], kwargs  # nothing installed, torch not imported by us
        assert after == (["torch"] if hooked else []), kwargs
        assert "torch" not in finders, "the one-shot import hook must be gone"
        records = spans(cwd / "out" / "spool")
        assert tree(records) == (EXPECTED if hooked else []), kwargs


SCRIPT = (
    "import sys\n"
    + LOOP
    + r"""
ci = __import__(sys.argv[1])
ci.profile()
train()
ci.shutdown()
"""
)


def test_the_spool_is_the_sdks(tmp_path: Path) -> None:
    pytest.importorskip("cirron", reason="cirron-sdk 0.3.0 is a test dependency (the test-core extra)")
    trees = {}
    for module in ("cirron", "cirron_otel"):
        cwd = tmp_path / module
        cwd.mkdir()
        run(SCRIPT, cwd, module)
        records = spans(cwd / ".cirron" / "spool")
        # beyond the tree: every field the SDK writes, times and ids aside
        for s in records:
            assert s["gpu_ns"] is None and s["memory_peak_bytes"] is None, s
        (session,) = [s for s in records if s["name"] == "cirron.session"]
        trees[module] = (tree(records), {k: v for k, v in session["attrs"].items() if k != "pid"})
    assert trees["cirron_otel"] == trees["cirron"]
    assert trees["cirron"][0] == EXPECTED
