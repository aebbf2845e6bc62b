"""Kafka (KRaft) started by the project: produce and consume; the 3-broker mode."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from infra.services.base import wait_until
from infra.services.kafka import KafkaBroker
from infra.settings import Settings
from infra.topics import consumer_lag, ensure_topics, list_topics, unread_records
from schemas.topics import TOPICS, TopicSpec
from tests.conftest import PORT_OFFSET


def test_declared_topics_exist_with_their_cleanup_policy(stack, settings: Settings) -> None:
    topics = list_topics(settings)
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    for spec in TOPICS:
        assert spec.name in topics
    resource = ConfigResource(ConfigResource.Type.TOPIC, "twin.state")
    config = admin.describe_configs([resource])[resource].result()
    assert config["cleanup.policy"].value == "compact"
    assert ensure_topics(settings) == []  # idempotent: nothing left to create


def test_a_produced_record_is_consumed(settings: Settings, new_topic: Callable[..., str]) -> None:
    topic = new_topic()
    value = uuid.uuid4().bytes
    producer = Producer(
        {"bootstrap.servers": settings.bootstrap_servers, "enable.idempotence": True, "acks": "all"}
    )
    delivered: list[object] = []
    producer.produce(
        topic, key=b"device-1", value=value, on_delivery=lambda e, m: delivered.append(e)
    )
    assert producer.flush(15) == 0
    assert delivered == [None]

    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    got = None
    while got is None and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            got = msg
    consumer.close()
    assert got is not None
    assert (got.key(), got.value()) == (b"device-1", value)


def test_three_broker_mode_elects_a_leader_with_replication_factor_3(tmp_path: Path) -> None:
    settings = Settings(
        state_dir=tmp_path / "stack",
        brokers=3,
        kafka_port=19092 + PORT_OFFSET,  # beside the session stack, never on it
        kafka_heap="256m",
        default_partitions=1,
    )
    brokers = [KafkaBroker(settings, i) for i in range(3)]
    try:
        for broker in brokers:
            broker.launch()
        for broker in brokers:
            broker.wait_ready(settings.startup_timeout_s)
        name = f"test.rf3.{uuid.uuid4().hex[:8]}"
        ensure_topics(settings, [TopicSpec(name, "k", "v", partitions=1)])
        admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})

        def has_leader_and_full_isr() -> bool:
            # Right after creation the metadata may not list the partition yet.
            partition = admin.list_topics(name, timeout=5).topics[name].partitions.get(0)
            return (
                partition is not None and partition.leader in {1, 2, 3} and len(partition.isrs) == 3
            )

        assert wait_until(has_leader_and_full_isr, timeout=30)
        partition = admin.list_topics(name, timeout=5).topics[name].partitions[0]
        assert sorted(partition.replicas) == [1, 2, 3]
        resource = ConfigResource(ConfigResource.Type.TOPIC, name)
        config = admin.describe_configs([resource])[resource].result()
        assert config["min.insync.replicas"].value == "2"
    finally:
        for broker in brokers:
            broker.terminate()
        for broker in brokers:
            broker.stop()


def test_unread_records_skip_a_transaction_s_commit_marker(
    settings: Settings, new_topic: Callable[..., str]
) -> None:
    # A read_committed consumer that committed its last record is an offset short of the end
    # (the marker): consumer_lag counts it, unread_records does not.
    topic, group = new_topic(), f"test-{uuid.uuid4().hex[:8]}"
    producer = Producer(
        {"bootstrap.servers": settings.bootstrap_servers, "transactional.id": group}
    )
    producer.init_transactions()

    def commit_records(count: int) -> None:
        producer.begin_transaction()
        for i in range(count):
            producer.produce(topic, key=b"k", value=str(i).encode())
        producer.commit_transaction()

    commit_records(3)
    reader = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    reader.subscribe([topic])
    read = []
    deadline = time.monotonic() + 30
    while len(read) < 3 and time.monotonic() < deadline:
        msg = reader.poll(0.5)
        if msg is not None and msg.error() is None:
            read.append(msg)
    assert len(read) == 3
    # As Faust commits: the offset after the last record processed, not the position.
    reader.commit(offsets=[TopicPartition(topic, 0, read[-1].offset() + 1)], asynchronous=False)
    reader.close()
    assert consumer_lag(settings, group, [topic]) == 1  # the marker
    assert unread_records(settings, group, [topic]) == 0
    commit_records(2)
    assert unread_records(settings, group, [topic]) == 2
