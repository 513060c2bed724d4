"""What the framework-hook tests share (tests/integration/test_*_hooks.py): the framework, or a
skip that CI turns into a failure; a script run in a fresh interpreter under either package."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest


def require(module: str, switch: str, why: str) -> ModuleType:
    """`module` imported; not installed: a skip, or with `switch`=1 in the environment (.ci/run
    installs these frameworks) an ImportError, so that a skip cannot hide a failure."""
    if os.environ.get(switch) == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=why)


def run(
    code: str, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -c code args...` in `cwd` without the caller's CIRRON_* / OTEL_* settings (the
    script's defaults apply, under either package); must exit 0."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CIRRON_", "OTEL_"))}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
