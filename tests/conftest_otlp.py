"""pytest fixtures for the in-process OTLP receivers; import them from conftest.py:

    from .conftest_otlp import grpc_receiver, http_receiver  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .otlp_receivers import GrpcReceiver, HttpReceiver


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
