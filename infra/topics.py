"""Creating the topic catalogue (schemas/topics.py) on a cluster, idempotently; listing topics
and consumer lag for `fleet status` and `fleet jobs list`.

These take a small Kafka admin config (:class:`AdminConfig`: the settings object satisfies it,
so does any frozen dataclass with those fields), not the settings themselves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from confluent_kafka import KafkaException
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
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
        }
    )
    try:
        meta = consumer.list_topics(timeout=timeout)
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in meta.topics
            for p in meta.topics[topic].partitions
        ]
        lag = 0
        for tp in consumer.committed(partitions, timeout=timeout):
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            lag += high - (tp.offset if tp.offset >= 0 else low)
        return lag
    finally:
        consumer.close()


def unread_records(
    settings: KafkaAddress, group: str, topics: Sequence[str], timeout: float = 10.0
) -> int:
    """Records of `topics` after the group's committed offsets, counted by reading them
    read_committed. Exact where :func:`consumer_lag` is not: on a topic written in
    transactions the last offset is a commit marker, never delivered, so a consumer that
    committed its last record (Faust commits record + 1) stays an offset short of the end."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    if consumer_lag(settings, group, topics) == 0:
        return 0
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group,  # for its committed offsets only: it assigns, never joins
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        meta = consumer.list_topics(timeout=timeout)
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in meta.topics
            for p in meta.topics[topic].partitions
        ]
        pending = []
        for tp in consumer.committed(partitions, timeout=timeout):
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            start = tp.offset if tp.offset >= 0 else low
            if start < high:
                pending.append(TopicPartition(tp.topic, tp.partition, start))
        consumer.assign(pending)
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
