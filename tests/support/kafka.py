"""Reading a topic back in tests: poll with a deadline until a condition holds."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, Message

from infra.settings import Settings


def collect(
    settings: Settings,
    topic: str,
    keep: Callable[[Message], bool],
    done: Callable[[list[Message]], bool],
    timeout: float = 60.0,
) -> list[Message]:
    """Messages of `topic` (from the start) that `keep` selects, until `done` or the deadline."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    kept: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not done(kept):
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                if msg.error() is None and keep(msg):
                    kept.append(msg)
    finally:
        consumer.close()
    return kept


def collect_keyed(
    settings: Settings, topic: str, key: str, count: int, timeout: float = 60.0
) -> list[Message]:
    """Messages of `topic` keyed `key`: once there are `count` of them, or at the deadline."""
    wanted = key.encode()
    return collect(
        settings,
        topic,
        keep=lambda m: m.key() == wanted,
        done=lambda got: len(got) >= count,
        timeout=timeout,
    )
