"""Stand-ins for unit tests that need no service."""

from __future__ import annotations

from typing import Any


class FakeSubscriber:
    """Stands in for the gmqtt client in a device's `_on_connect` (no connection to write to):
    records each subscribe and resubscribe."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def subscribe(self, subscription: Any) -> int:
        self.calls.append(("subscribe", subscription))
        return 1

    def resubscribe(self, subscription: Any) -> int:
        self.calls.append(("resubscribe", subscription))
        return 2
