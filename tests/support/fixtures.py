"""Fixtures that tests in more than one folder use; each folder's conftest.py imports them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.api.client import HotPathClient
from infra.settings import Settings
from infra.stack import Stack


@pytest.fixture
def client(stack: Stack, settings: Settings) -> Iterator[HotPathClient]:
    """A client of the stack's hot-path API, closed after the test."""
    hot = HotPathClient(settings)
    yield hot
    hot.close()
