"""Fixtures of the engine tests."""
from tests.engines.tiny_store import store  # noqa: F401 - the shared tiny checkpoint
