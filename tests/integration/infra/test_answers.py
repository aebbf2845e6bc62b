"""AnswerListener (infra/api/answers.py) on the real Kafka: each caller gets its own answers."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Message, Producer

from infra.api.answers import AnswerListener
from infra.settings import Settings

pytestmark = pytest.mark.integration


def _json(msg: Message) -> dict[str, Any] | None:
    value = msg.value()
    return None if value is None else dict(json.loads(value))


def test_concurrent_waiters_get_their_own_answers_and_late_ones_are_dropped(
    settings: Settings, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=3)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    producer.produce(topic, key=b"a", value=json.dumps({"id": "before"}).encode())
    producer.flush(30)
    listener = AnswerListener(settings, topic, "id", _json, timeout=30)
    try:
        first, second = listener.expect(["a1", "a2"]), listener.expect(["b1", "before"])
        results: dict[str, dict[str, dict[str, Any]]] = {}

        def wait(name: str, waiter: Any, timeout: float) -> None:
            results[name] = listener.wait(waiter, timeout)

        waiting = [
            threading.Thread(target=wait, args=("first", first, 30)),
            threading.Thread(target=wait, args=("second", second, 3)),
        ]
        for thread in waiting:
            thread.start()
        for key, answer_id in (("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "nobody")):
            value = json.dumps({"id": answer_id, "ok": True}).encode()
            producer.produce(topic, key=key.encode(), value=value)
        producer.flush(30)
        for thread in waiting:
            thread.join(60)
        assert set(results["first"]) == {"a1", "a2"}
        assert results["first"]["a1"]["ok"] is True
        # "before" was on the topic before the listener started: never an answer; the wait
        # ends at its timeout with what did arrive.
        assert set(results["second"]) == {"b1"}
        late = listener.expect(["a1"])  # an id answered earlier, asked again: not replayed
        assert listener.wait(late, 1) == {}
    finally:
        listener.close()
