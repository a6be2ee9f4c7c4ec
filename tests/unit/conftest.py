"""Fixtures of the unit tests."""

from tests.fixtures.file_server import serve

__all__ = ["serve"]
