"""Batches of Kafka records for the cold path, committed only after they were stored.

A plain confluent-kafka consumer in the cold path's own group (`fleetstream-cold`), with
auto-commit off: `take` returns up to N records or what arrived within T seconds, and `commit`
stores, per partition, the offset after the last record of a batch that reached the warehouse.
A crash between the two re-reads the batch; the warehouse's deduplication makes that a no-op.

Why not a Faust stream here: Faust hands each event through its conductor, stream and ack
machinery, about 4,400 events/s on one core of these machines, far below a bare consume loop
(`make bench-faust`, bench/faust_probe.py). The cold path moves whole batches, so it reads
them whole.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from confluent_kafka import Consumer, Message, TopicPartition

from streams.runtime.clients import KafkaConfig, consumer_config
from streams.runtime.records import SourceRecord
from streams.runtime.transactions import check_consumed, rewind_to_committed


class BatchSource:
    def __init__(
        self,
        kafka: KafkaConfig,
        topics: Sequence[str],
        group: str,
        instance: str | None = None,
    ) -> None:
        self._consumer = Consumer(
            consumer_config(
                kafka,
                group,
                instance=instance,
                # What an aborted transaction wrote (twin.state) is never loaded.
                read_committed=True,
                partition_assignment_strategy="cooperative-sticky",
                fetch_max_bytes=64 * 1024 * 1024,
                # Batches of N records or T seconds: a fetch may wait for 1 MB or half a second.
                fetch_min_bytes=1024 * 1024,
                fetch_wait_max_ms=500,
                queued_max_messages_kbytes=256 * 1024,
            )
        )
        self._consumer.subscribe(list(topics))

    def take(self, max_records: int, within_s: float) -> list[SourceRecord]:
        """Up to `max_records`, or what arrived within `within_s` of the first one."""
        batch: list[SourceRecord] = []
        deadline: float | None = None
        while len(batch) < max_records:
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            messages = self._consumer.consume(min(max_records - len(batch), 10_000), wait)
            check_consumed(messages)
            batch.extend(to_source_record(m) for m in messages if m.error() is None)
            if batch and deadline is None:
                deadline = time.monotonic() + within_s
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not batch:
                break  # nothing within a second: let the caller look around (stop, report)
        return batch

    def commit(self, batch: Sequence[SourceRecord]) -> None:
        """Mark `batch` done: next offsets per partition, synchronously."""
        if batch:
            self._consumer.commit(offsets=next_offsets(batch), asynchronous=False)

    def rewind(self) -> None:
        """Back to the last committed offsets (after a failed commit: the batch is read again
        and stored again, which the warehouse's deduplication makes a no-op)."""
        rewind_to_committed(self._consumer)

    def close(self) -> None:
        self._consumer.close()


class Polling(Protocol):
    """What :func:`gather` needs of a consumer (confluent-kafka's, or a test's fake)."""

    def poll(self, timeout: float) -> Message | None: ...

    def consume(self, num_messages: int, timeout: float) -> list[Message]: ...


def gather(consumer: Polling, max_records: int, idle_s: float, linger_s: float) -> list[Message]:
    """Up to `max_records`: the first within `idle_s` (the wait ends the moment one is there),
    then what else arrives within `linger_s`, at most `max_records` in all.

    `consume(n, timeout)` alone always waits out its timeout unless n records came: a loop on
    a short timeout wakes up many times a second with nothing to do. Waiting for the first
    record with `poll` keeps an idle consumer asleep (one wake-up per `idle_s`) and a busy one
    batching as before (`linger_s` after the first record)."""
    first = consumer.poll(max(idle_s, 0.0))
    if first is None:
        return []
    if max_records <= 1:
        return [first]
    return [first, *consumer.consume(max_records - 1, linger_s)]


def next_offsets(batch: Sequence[SourceRecord]) -> list[TopicPartition]:
    """Pure: for each partition in the batch, the offset after its last record."""
    last: dict[tuple[str, int], int] = {}
    for rec in batch:
        key = (rec.topic, rec.partition)
        last[key] = max(last.get(key, -1), rec.offset)
    return [
        TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()
    ]


def to_source_record(msg: Message) -> SourceRecord:
    """A consumed record (error-free, so topic, partition and offset are set)."""
    return SourceRecord(
        msg.topic() or "", msg.partition() or 0, msg.offset() or 0, msg.key(), msg.value()
    )
