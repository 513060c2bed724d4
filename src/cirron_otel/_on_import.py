"""Run code right after a module has executed, without importing it ourselves.

Importing a large framework only to find out whether the program uses it costs tens of ms
(OpenTelemetry) to seconds (PyTorch) of every profiled program's start-up. So `on_import`
puts a one-shot finder on `sys.meta_path`: when the program imports the module, the finder
finds its real spec through the other finders, stands in as its loader only to run the
callback after the real loader's `exec_module`, and removes itself. Until then it costs one
Python call per import of a new module; nothing on the hot paths.

Used for OpenTelemetry's context (`_otel_context`) and the framework hooks (`_profiler`).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up cost)
if TYPE_CHECKING:
    from typing import Any

_lock = threading.Lock()


class _InstallOnImport:
    """The finder (see the module docstring); `cancel` removes it before it fires."""

    def __init__(self, fullname: str, callback: Callable[[], None]) -> None:
        self.fullname = fullname
        self.callback = callback
        self._loader: Any = None

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self.fullname:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or isinstance(finder, _InstallOnImport) or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        self._loader = spec.loader
        spec.loader = self  # type: ignore[assignment]
        return spec

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        result: ModuleType | None = self._loader.create_module(spec)
        return result

    def exec_module(self, module: ModuleType) -> None:
        # the module sees its real loader, as if we had never been there
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        cancel(self)
        self.callback()  # the caller's callback must not raise (it guards itself)


def on_import(fullname: str, callback: Callable[[], None]) -> _InstallOnImport:
    """Call `callback` (once, on the importing thread) right after module `fullname` has
    executed, when the program imports it. Returns the finder, for `cancel`."""
    finder = _InstallOnImport(fullname, callback)
    with _lock:
        sys.meta_path.insert(0, finder)
    return finder


def cancel(finder: _InstallOnImport | None) -> None:
    """Remove the finder (it will not fire); nothing if it already fired or was removed."""
    if finder is None:
        return
    with _lock:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
