"""Stream tables on compacted Kafka topics: read whole (global tables) or per partition.

A *global table* (alert rules, the registry's devices) is read by every worker from the
beginning and then followed: each worker needs all of it. A *changelog* (twin.state,
alerts.state) is read per partition when a worker is given that partition, to rebuild the
state it owns. Both read committed records only, so what an aborted transaction wrote never
becomes state.

**Error channel.** A table record its applier cannot use (it does not decode, or it decodes
to something invalid) raises :class:`UnreadableRecord`. The table counts it and hands it to its
:class:`TableErrors` as a dead letter (original key and bytes; headers with the reason and the
record's topic, partition and offset): a transactional job writes those into its dead-letter
topic in its next transaction. The rest of the table is applied as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from streams.runtime.clients import KafkaConfig, table_reader_config
from streams.runtime.records import DeadLetter, SourceRecord

log = logging.getLogger("fleetstream.tables")

Apply = Callable[[Message], None]


class UnreadableRecord(Exception):
    """Raised by a table's applier for a record it cannot use; `reason` is a short code
    (a DecodeReason, or `invalid_record`), the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TableErrors:
    """The error channel of a job's tables: unreadable records, counted and held as dead
    letters until the job has written them (`take`, then `written` or `returned`). A record
    read again (a changelog restored after a rebalance) is refused once per process."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.count = 0
        self._pending: list[DeadLetter] = []
        self._seen: set[tuple[str, int, int]] = set()

    def refuse(self, source: SourceRecord, reason: str, detail: str) -> None:
        where = (source.topic, source.partition, source.offset)
        if where in self._seen:
            return
        self._seen.add(where)
        self.count += 1
        log.warning("table record %s/%d@%d refused (%s): %s", *where, reason, detail)
        self._pending.append(DeadLetter(source, reason, detail, stage=self.stage))

    def take(self) -> list[DeadLetter]:
        """The dead letters not written yet (the caller writes them, then calls `written`
        or, if that failed, `returned`)."""
        taken, self._pending = self._pending, []
        return taken

    def returned(self, dead: Sequence[DeadLetter]) -> None:
        """Dead letters whose write was aborted: written with the next try."""
        self._pending[:0] = dead

    def __bool__(self) -> bool:
        return bool(self._pending)


def source_of(msg: Message) -> SourceRecord:
    return SourceRecord(
        msg.topic() or "",
        msg.partition() or 0,
        msg.offset() or 0,
        msg.key(),
        msg.value(),
        msg.timestamp()[1],
    )


def guarded(apply: Apply, errors: TableErrors | None) -> Apply:
    """`apply`, with what it refuses (UnreadableRecord) sent to `errors` (or, without an error
    channel, counted nowhere but logged) instead of ending the read."""

    def apply_or_refuse(msg: Message) -> None:
        try:
            apply(msg)
        except UnreadableRecord as exc:
            if errors is None:
                log.warning(
                    "table record %s/%s@%s ignored (%s): %s",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    exc.reason,
                    exc.detail,
                )
            else:
                errors.refuse(source_of(msg), exc.reason, exc.detail)

    return apply_or_refuse


def _reader(kafka: KafkaConfig, name: str) -> Consumer:
    return Consumer(table_reader_config(kafka, name))


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


# How long a table's follower waits in poll() for a record before it looks around (a stop, a
# retry): a record ends the wait at once, so this only sets how often an idle follower wakes.
FOLLOW_WAIT_S = 0.5


class GlobalTables:
    """All partitions of some compacted topics, each with its applier, read to their end once,
    then followed: by one consumer, whatever the number of topics (a consumer is a
    connection, threads, and a fetch a broker holds and answers twice a second even idle)."""

    def __init__(
        self,
        kafka: KafkaConfig,
        appliers: Mapping[str, Apply],
        timeout: float = 60.0,
        errors: TableErrors | None = None,
        name: str = "",
    ):
        self.topics = tuple(appliers)
        self._appliers = {topic: guarded(apply, errors) for topic, apply in appliers.items()}
        self._timeout = timeout
        self._consumer = _reader(kafka, name or f"fleetstream-table-{'+'.join(self.topics)}")

    def _apply(self, msg: Message) -> None:
        self._appliers[msg.topic() or ""](msg)

    def catch_up(self) -> int:
        """Block until every record written so far is applied."""
        partitions = [
            TopicPartition(topic, p)
            for topic in self.topics
            for p in _partitions(self._consumer, topic, self._timeout)
        ]
        return read_to_end(self._consumer, partitions, self._apply, self._timeout)

    def poll(self, wait: float = 0.0) -> int:
        """Apply what arrived since. With nothing there, wait up to `wait` seconds for a record:
        a follower waits here, not in a sleep, so it wakes when one comes (the broker answers a
        held fetch at once) and otherwise only as often as it has to look around."""
        messages = self._consumer.consume(1000, 0)
        if not messages and wait > 0:
            # consume() would wait out its whole timeout for a batch; poll() returns at the first.
            first = self._consumer.poll(wait)
            if first is not None:
                messages = [first, *self._consumer.consume(1000, 0)]
        applied = 0
        for msg in messages:
            if msg.error() is None:
                self._apply(msg)
                applied += 1
        return applied

    def close(self) -> None:
        self._consumer.close()


class GlobalTable(GlobalTables):
    """All partitions of one compacted topic, read to the end once, then followed."""

    def __init__(
        self,
        kafka: KafkaConfig,
        topic: str,
        apply: Apply,
        timeout: float = 60.0,
        errors: TableErrors | None = None,
    ):
        super().__init__(kafka, {topic: apply}, timeout, errors)
        self.topic = topic


class ChangelogReader:
    """Rebuilds per-partition state from changelog topics co-partitioned with the inputs; the
    `whole` ones (state not partitioned like the inputs) are read whole on every restore."""

    def __init__(
        self,
        kafka: KafkaConfig,
        appliers: dict[str, Apply],
        timeout: float = 60.0,
        errors: TableErrors | None = None,
        name: str = "fleetstream-hot-restore",
        whole: frozenset[str] = frozenset(),
    ):
        self._kafka = kafka
        self._appliers = {topic: guarded(apply, errors) for topic, apply in appliers.items()}
        self._timeout = timeout
        self._name = name
        self._whole = whole

    def restore(self, partitions: Sequence[int]) -> int:
        if not partitions:
            return 0
        consumer = _reader(self._kafka, self._name)
        try:
            tps = [
                TopicPartition(t, p)
                for t in self._appliers
                for p in (
                    _partitions(consumer, t, self._timeout) if t in self._whole else partitions
                )
            ]

            def apply(msg: Message) -> None:
                self._appliers[msg.topic() or ""](msg)

            return read_to_end(consumer, tps, apply, self._timeout)
        finally:
            consumer.close()


def key_text(msg: Message) -> str:
    key: Any = msg.key()
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key or "")
