"""What the framework hooks share (`_hooks_torch`, `_hooks_transformers`, `_hooks_keras`).

- `FRAMEWORKS`: cirron-sdk 0.3.0's framework names (its `hooks/_registry.py`) in its install
  order, each with our hooks module and the module whose import makes the hooks installable
  (`_profiler` installs them when the program imports it: never imported just to look).
- `HookContext`: one session's hand-over of the `epoch` / `step` spans between hooks (the SDK's
  `HookContext.owned_scopes`): the Trainer and Keras callbacks claim them for the length of a
  `train()` / `fit()`, and the PyTorch hooks, which that training drives too, open none then.
- `Spans`: spans opened and closed by hand on the native scopes (as `with ci.scope(...)`
  would), every failure counted in `health()["swallowed_errors"]` under the framework's prefix
  and warned about once, never raised into the training loop.
- `Patches`: attributes set on a framework's classes, restored exactly by `undo()`.
"""

from __future__ import annotations

from . import _native
from ._warn import warn_once
from .compat import swallowed

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: profile() imports us
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# name -> (hooks module, trigger module); in the SDK's install order (transformers, then
# tensorflow, then torch): installed_hooks lists them so, and shutdown removes them in reverse.
# "tensorflow" is the SDK's name for its Keras hooks (it patches `keras.Model.fit`).
FRAMEWORKS: dict[str, tuple[str, str]] = {
    "transformers": ("_hooks_transformers", "transformers.trainer"),
    "tensorflow": ("_hooks_keras", "keras"),
    "torch": ("_hooks_torch", "torch"),
}

_scope = _native.scope
_current = _native.current_scope
_scope_var = _native.scope_var


def priority(name: str) -> int:
    """Install order (the SDK's `_FRAMEWORK_PRIORITY`); unknown names last."""
    order = list(FRAMEWORKS)
    return order.index(name) if name in order else len(order)


class HookContext:
    """One session's span hand-over (see the module docstring)."""

    def __init__(self) -> None:
        self.owned_scopes: dict[str, str] = {}  # "epoch" / "step" -> the framework opening it

    def claim(self, owner: str, names: tuple[str, ...]) -> list[str]:
        """Claim the names nobody holds yet; returns those claimed (for `release`)."""
        claimed = [n for n in names if n not in self.owned_scopes]
        for n in claimed:
            self.owned_scopes[n] = owner
        return claimed

    def release(self, owner: str, names: list[str]) -> None:
        """Release what `claim` returned, leaving anyone else's claims alone."""
        for n in names:
            if self.owned_scopes.get(n) == owner:
                del self.owned_scopes[n]


class Spans:
    """One framework's span helpers and failure counting (keys `<prefix>.<where>`)."""

    def __init__(self, prefix: str, display: str) -> None:
        self.prefix = prefix
        self.display = display

    def failed(self, where: str, exc: BaseException) -> None:
        """Count a hook failure (never raised: telemetry never breaks the training loop)."""
        try:
            swallowed(f"{self.prefix}.{where}", exc)
            warn_once(
                f"{self.prefix}-hook:{where}",
                f"cirron_otel: the {self.display} {where} hook failed ({type(exc).__name__}: {exc}); "
                "counted in health()['swallowed_errors'], the program goes on",
            )
        except Exception:  # pragma: no cover - counting must not fail either
            pass

    def open(self, name: str, index: int | None = None, **attrs: Any) -> Any:
        """A native scope opened under the current one (as `with ci.scope(...)` would), or None."""
        try:
            scope = _scope(name, index, **attrs)
            scope.__enter__()
            return scope
        except Exception as exc:
            self.failed(f"open.{name}", exc)
            return None

    def close(self, scope: Any) -> None:
        """Close `scope`. When it is not the innermost one (a scope opened after it is still
        open), the current scope is left as it was: the SDK's close_and_remove, which pops
        nobody else."""
        if scope is None:
            return
        try:
            innermost = _current() is scope
        except Exception as exc:
            self.failed("close", exc)
            innermost = True  # closed all the same: an open span must not leak
        try:
            if innermost:
                scope.__exit__(None, None, None)
            else:
                current = _scope_var.get(None)
                scope.__exit__(None, None, None)
                _scope_var.set(current)
        except Exception as exc:
            self.failed("close", exc)

    def guard(self, where: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, a failure counted as `where` (None then)."""
        try:
            return fn(*args)
        except Exception as exc:
            self.failed(where, exc)
            return None

    def mark_logs(self, logs: Any, kind: str = "point") -> None:
        """A mark per numeric entry of a framework's `logs` dict (Trainer's `on_log`, Keras's
        `on_*_end`), as the SDK's `_record_logs`: values `float()` rejects are skipped."""
        if not logs:
            return
        try:
            items = list(logs.items())
        except Exception as exc:  # every metric of this call is lost, not one
            self.failed("log_items", exc)
            return
        for name, value in items:
            try:
                fv = float(value)
            except (TypeError, ValueError):
                continue
            try:
                _native.mark(str(name), fv, kind=kind)
            except Exception as exc:
                self.failed("mark_logged", exc)


class Patches:
    """Attributes set on a framework's classes and modules; `undo()` puts back exactly what was
    there, last patched first (an attribute a class only inherited is deleted again, not copied
    onto it)."""

    def __init__(self, spans: Spans) -> None:
        self._spans = spans
        self._undos: list[tuple[str, Callable[[], None]]] = []

    def patch(self, owner: Any, attr: str, replacement: Any, label: str) -> None:
        if isinstance(owner, type) and attr not in owner.__dict__:
            setattr(owner, attr, replacement)
            self._undos.append((label, lambda: delattr(owner, attr)))
            return
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        setattr(owner, attr, replacement)
        self._undos.append((label, lambda: setattr(owner, attr, original)))

    def undo(self) -> None:
        """Never raises: a failed restore is counted as `uninstall.<label>`."""
        undos, self._undos = self._undos, []
        for label, undo in reversed(undos):
            try:
                undo()
            except Exception as exc:
                self._spans.failed(f"uninstall.{label}", exc)
