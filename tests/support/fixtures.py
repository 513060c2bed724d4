"""Fixtures every test may use (a pytest plugin: tests/conftest.py loads it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import cirron_otel as ci


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A fresh output directory per test (not created: profile() makes it)."""
    return tmp_path / "cirron"


@pytest.fixture(autouse=True)
def _no_profiler_leaks() -> Iterator[None]:
    ci.shutdown()
    yield
    ci.shutdown()


@pytest.fixture
def prof(out: Path) -> ci.Profiler:
    return ci.profile(output_dir=str(out), flush_interval=0.05, install_signal_handlers=False)
