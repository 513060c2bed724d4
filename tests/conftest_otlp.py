"""Kept for tests/cli/conftest.py only, which imports the receiver fixtures from here: they
live in tests/support/otlp.py (loaded for every test as a plugin by tests/conftest.py)."""

from tests.support.otlp import grpc_receiver, http_receiver, receiver

__all__ = ["grpc_receiver", "http_receiver", "receiver"]
