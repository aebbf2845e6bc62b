"""Consumer lag of the stack's consumer groups, measured in the background for the metrics.

The API process (one per stack) runs a :class:`LagProbe`: every few seconds, with one admin
client and one group-less consumer kept open, it reads each group's committed offsets and each
partition's end offset, and keeps the last reading; its metrics (``fleetstream_consumer_lag``
by group and topic) are that reading, so a scrape never waits on Kafka.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec  # the stubs' name for it
from prometheus_client.core import GaugeMetricFamily, Metric

from streams.runtime.metrics import counter

log = logging.getLogger("fleetstream.lag")

Groups = Sequence[tuple[str, Sequence[str]]]  # (consumer group, its input topics)


@dataclass
class LagProbe:
    bootstrap_servers: str
    groups: Groups
    interval_s: float = 5.0
    timeout_s: float = 5.0
    lag: dict[tuple[str, str], int] = field(default_factory=dict)  # (group, topic) -> records
    failures: int = 0

    def measure_once(self, admin: AdminClient, consumer: Consumer) -> dict[tuple[str, str], int]:
        """One request per group for its committed offsets, one for every partition's end (and
        one for the starts of partitions a group never committed): not one per partition."""
        from confluent_kafka import ConsumerGroupTopicPartitions

        meta = consumer.list_topics(timeout=self.timeout_s)
        committed: dict[str, list[TopicPartition]] = {}
        for group, topics in self.groups:
            partitions = [
                TopicPartition(topic, p)
                for topic in topics
                if topic in meta.topics
                for p in meta.topics[topic].partitions
            ]
            if partitions:
                request = [ConsumerGroupTopicPartitions(group, partitions)]
                answer = admin.list_consumer_group_offsets(request)[group].result(self.timeout_s)
                committed[group] = answer.topic_partitions
        every = [tp for tps in committed.values() for tp in tps]
        latest, earliest = OffsetSpec.latest(), OffsetSpec.earliest()  # type: ignore[no-untyped-call]
        ends = self._offsets(admin, every, latest)
        starts = self._offsets(admin, [tp for tp in every if tp.offset < 0], earliest)
        lag: dict[tuple[str, str], int] = {}
        for group, tps in committed.items():
            for tp in tps:
                key = (tp.topic, tp.partition)
                behind = ends[key] - (tp.offset if tp.offset >= 0 else starts[key])
                lag[(group, tp.topic)] = lag.get((group, tp.topic), 0) + max(behind, 0)
        return lag

    def _offsets(
        self, admin: AdminClient, partitions: Sequence[TopicPartition], spec: OffsetSpec
    ) -> dict[tuple[str, int], int]:
        if not partitions:
            return {}
        wanted = {TopicPartition(tp.topic, tp.partition): spec for tp in partitions}
        futures = admin.list_offsets(wanted, request_timeout=self.timeout_s)
        return {
            (tp.topic, tp.partition): future.result(self.timeout_s).offset
            for tp, future in futures.items()
        }

    def run(self, stopping: threading.Event) -> None:
        """Measure until `stopping`; a failed reading keeps the last one and is counted."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": "fleetstream-lag-probe",  # never subscribes nor commits
                "enable.auto.commit": False,
            }
        )
        try:
            while not stopping.is_set():
                try:
                    self.lag = self.measure_once(admin, consumer)
                except (KafkaException, TimeoutError, OSError) as exc:
                    self.failures += 1
                    log.warning("consumer lag not read: %s", exc)
                stopping.wait(self.interval_s)
        finally:
            consumer.close()

    def start(self, stopping: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stopping,), name="lag", daemon=True)
        thread.start()
        return thread

    def metrics(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "fleetstream_consumer_lag",
            "Records of the topic the consumer group has not committed yet",
            labels=["group", "topic"],
        )
        for (group, topic), value in sorted(dict(self.lag).items()):
            family.add_metric([group, topic], value)
        yield family
        yield counter(
            "fleetstream_consumer_lag_probe_failures", "Lag readings that failed", self.failures
        )
