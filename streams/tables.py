"""Stream tables on compacted Kafka topics: read whole (global tables) or per partition.

A *global table* (alert rules, the registry's devices) is read by every worker from the
beginning and then followed: each worker needs all of it. A *changelog* (twin.state,
alerts.state) is read per partition when a worker is given that partition, to rebuild the
state it owns. Both read committed records only, so what an aborted transaction wrote never
becomes state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from streams.transactions import KafkaAddress

Apply = Callable[[Message], None]


def _reader(settings: KafkaAddress, name: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            # Assigned, never subscribed: the group id is only a label here; nothing commits.
            "group.id": name,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )


def _partitions(consumer: Consumer, topic: str, timeout: float) -> list[int]:
    meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if meta is None or meta.error is not None:
        raise RuntimeError(f"topic {topic} not found")
    return sorted(meta.partitions)


def read_to_end(
    consumer: Consumer, partitions: Sequence[TopicPartition], apply: Apply, timeout: float
) -> int:
    """Apply every record of `partitions` up to their current end; returns the count."""
    pending: set[tuple[str, int]] = set()
    for tp in partitions:
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
        if high > low:
            pending.add((tp.topic, tp.partition))
    # Assigned even when empty: a global table goes on following what comes next.
    consumer.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in partitions])
    deadline = time.monotonic() + timeout
    applied = 0
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"changelog not read to its end within {timeout}s: {pending}")
        for msg in consumer.consume(10_000, 0.5):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.discard((msg.topic() or "", msg.partition() or 0))
                continue
            apply(msg)
            applied += 1
    return applied


class GlobalTable:
    """All partitions of a compacted topic, read to the end once, then followed."""

    def __init__(self, settings: KafkaAddress, topic: str, apply: Apply, timeout: float = 60.0):
        self.topic = topic
        self._apply = apply
        self._timeout = timeout
        self._consumer = _reader(settings, f"fleetstream-table-{topic}")

    def catch_up(self) -> int:
        """Block until every record written so far is applied."""
        partitions = [
            TopicPartition(self.topic, p)
            for p in _partitions(self._consumer, self.topic, self._timeout)
        ]
        return read_to_end(self._consumer, partitions, self._apply, self._timeout)

    def poll(self) -> int:
        """Apply what arrived since; never blocks."""
        applied = 0
        for msg in self._consumer.consume(1000, 0):
            if msg.error() is None:
                self._apply(msg)
                applied += 1
        return applied

    def close(self) -> None:
        self._consumer.close()


class ChangelogReader:
    """Rebuilds per-partition state from changelog topics co-partitioned with the inputs."""

    def __init__(self, settings: KafkaAddress, appliers: dict[str, Apply], timeout: float = 60.0):
        self._settings = settings
        self._appliers = appliers
        self._timeout = timeout

    def restore(self, partitions: Sequence[int]) -> int:
        if not partitions:
            return 0
        consumer = _reader(self._settings, "fleetstream-hot-restore")
        try:
            tps = [TopicPartition(t, p) for t in self._appliers for p in partitions]

            def apply(msg: Message) -> None:
                self._appliers[msg.topic() or ""](msg)

            return read_to_end(consumer, tps, apply, self._timeout)
        finally:
            consumer.close()


def key_text(msg: Message) -> str:
    key: Any = msg.key()
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key or "")
