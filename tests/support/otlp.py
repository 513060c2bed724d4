"""pytest fixtures and helpers for tests against the in-process OTLP receivers.

A pytest plugin (tests/conftest.py loads it): the fixtures `grpc_receiver`, `http_receiver`,
`receiver` (both, one test each) and `clean_env` are there for every test. `clean_env` is
not autouse: a module that wants no OTEL_*/CIRRON_*/rank variable of the calling
environment to leak in asks for it (an autouse fixture of its own that takes `clean_env`).
Helpers (`start`, `protocol`, `wait_until`, ...) are imported from here.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cirron_otel as ci

from .helpers import spans_and_marks
from .otlp_receivers import GrpcReceiver, HttpReceiver

Receiver = GrpcReceiver | HttpReceiver


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcReceiver]:
    """A started OTLP/gRPC receiver on 127.0.0.1:<free port>, stopped (threads joined) after the test."""
    with GrpcReceiver() as receiver:
        yield receiver


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    """A started OTLP/HTTP receiver on 127.0.0.1:<free port>, stopped (threads joined) after the test."""
    with HttpReceiver() as receiver:
        yield receiver


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Receiver:
    """Each protocol's receiver in turn."""
    return request.getfixturevalue("grpc_receiver" if request.param == "grpc" else "http_receiver")


def clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_*, CIRRON_* or rank variable of the calling environment leaks into a test."""
    for key in list(os.environ):
        if key.startswith(("OTEL_", "CIRRON_")) or key in ("RANK", "LOCAL_RANK"):
            monkeypatch.delenv(key)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_env(monkeypatch)


def protocol(receiver: Receiver) -> str:
    return "grpc" if isinstance(receiver, GrpcReceiver) else "http/protobuf"


def start(out: Path, receiver: Receiver, **kwargs: Any) -> ci.Profiler:
    """profile() into `out` and to `receiver`; tracer_provider=None: the OTLP sink even if
    some test set a global SDK TracerProvider."""
    options: dict[str, Any] = dict(
        output_dir=str(out),
        otlp_endpoint=receiver.endpoint,
        otlp_protocol=protocol(receiver),
        flush_interval=0.05,
        install_signal_handlers=False,
        tracer_provider=None,
    )
    options.update(kwargs)
    return ci.profile(**options)


def otlp_health() -> dict[str, Any]:
    return ci.health()["sinks"]["otlp"]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def spool_ids(out: Path) -> Counter[str]:
    """OTLP span ids (the first 16 hex of the spool ids) of every span in the spool, counted."""
    spans, _ = spans_and_marks(out)
    return Counter(s["id"][:16] for s in spans)


def received_ids(receiver: Receiver) -> Counter[str]:
    return Counter(s["span_id"] for s in receiver.spans())
