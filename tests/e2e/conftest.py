"""Fixtures of this folder's tests, beyond tests/conftest.py's."""

from tests.support.fixtures import client

__all__ = ["client"]
