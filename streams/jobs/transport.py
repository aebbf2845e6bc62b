"""Faust's aiokafka transport, reading only committed records.

The platform's own jobs write their outputs in Kafka transactions (alerts, twin.state, ...);
a reader that is not read_committed also sees the records of aborted transactions, which
the platform never meant to publish. Faust sets read_committed only in its exactly-once mode
(which the platform does not use), so the worker's consumer is made read_committed here.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as driver


class _ReadCommittedThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read when the consumer starts (its fetcher is made then): set before that.
        consumer._isolation_level = "read_committed"
        return consumer


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ReadCommittedThread(self, loop=self.loop, beacon=self.beacon)


class ReadCommittedTransport(driver.Transport):
    Consumer = _Consumer
