"""Creating the topic catalogue (schemas/topics.py) on a cluster, idempotently; listing topics
and consumer lag for `fleet status` and `fleet jobs list`.

These take a small Kafka admin config (:class:`AdminConfig`: the settings object satisfies it,
so does any frozen dataclass with those fields), not the settings themselves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from schemas.topics import TOPICS, TopicSpec


class KafkaAddress(Protocol):
    @property
    def bootstrap_servers(self) -> str: ...


class AdminConfig(KafkaAddress, Protocol):
    """What creating topics needs: where Kafka is and the cluster's topic defaults."""

    @property
    def default_partitions(self) -> int: ...
    @property
    def replication_factor(self) -> int: ...
    @property
    def min_insync_replicas(self) -> int: ...


def ensure_topics(
    settings: AdminConfig, specs: Sequence[TopicSpec] = TOPICS, timeout: float = 30.0
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [
        NewTopic(
            spec.name,
            num_partitions=spec.partitions or settings.default_partitions,
            replication_factor=settings.replication_factor,
            config=spec.config(settings.min_insync_replicas),
        )
        for spec in specs
        if spec.name not in existing
    ]
    if not missing:
        return []
    created: list[str] = []
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            # Another `fleet up` may have created it meanwhile: that is success too.
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    return created


def list_topics(settings: KafkaAddress, timeout: float = 5.0) -> dict[str, int]:
    """Topic name -> partition count, internal topics left out."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    meta = admin.list_topics(timeout=timeout)
    return {
        name: len(topic.partitions)
        for name, topic in sorted(meta.topics.items())
        if not name.startswith("__")
    }


def consumer_lag(
    settings: KafkaAddress, group: str, topics: Sequence[str], timeout: float = 5.0
) -> int:
    """Records of `topics` the consumer group has not committed yet (end offset - committed)."""
    consumer = _group_reader(settings, group, {})
    try:
        return sum(high - tp.offset for tp, high in _behind(consumer, topics, timeout))
    finally:
        consumer.close()


def unread_records(
    settings: KafkaAddress, group: str, topics: Sequence[str], timeout: float = 10.0
) -> int:
    """Records of `topics` after the group's committed offsets, counted by reading them
    read_committed. Exact where :func:`consumer_lag` is not: on a topic written in
    transactions the last offset is a commit marker, never delivered, so a consumer that
    committed its last record (Faust commits record + 1) stays an offset short of the end."""
    reader = {"isolation.level": "read_committed", "enable.partition.eof": True}
    consumer = _group_reader(settings, group, reader)
    try:
        pending = [tp for tp, high in _behind(consumer, topics, timeout) if tp.offset < high]
        consumer.assign(pending)  # at the committed offsets; it never joins the group
        unread, ended = 0, set[tuple[str | None, int | None]]()
        deadline = time.monotonic() + timeout
        while len(ended) < len(pending) and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            error = msg.error()
            if error is None:
                unread += 1
            elif error.code() == KafkaError._PARTITION_EOF:
                ended.add((msg.topic(), msg.partition()))
        if len(ended) < len(pending):
            raise TimeoutError(f"{group}: did not reach the end of {topics} in {timeout} s")
        return unread
    finally:
        consumer.close()


def _group_reader(settings: KafkaAddress, group: str, config: dict[str, Any]) -> Consumer:
    """A consumer with the group's id, for its committed offsets: it never commits."""
    base = {"bootstrap.servers": settings.bootstrap_servers, "group.id": group}
    return Consumer({**base, "enable.auto.commit": False, **config})


def _behind(
    consumer: Consumer, topics: Sequence[str], timeout: float
) -> list[tuple[TopicPartition, int]]:
    """Each partition of `topics` at the group's committed offset (its start if none), and
    its end offset."""
    meta = consumer.list_topics(timeout=timeout)
    partitions = [
        TopicPartition(topic, p)
        for topic in topics
        if topic in meta.topics
        for p in meta.topics[topic].partitions
    ]
    out = []
    for tp in consumer.committed(partitions, timeout=timeout):
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
        out.append(
            (TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else low), high)
        )
    return out
