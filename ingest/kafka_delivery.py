"""An asyncio face on confluent-kafka's producer: `send(..., done)` calls `done` on the event
loop with Kafka's delivery report (acks=all, idempotent), so the bridge can acknowledge late.

librdkafka batches what many concurrent handlers produce; one thread serves delivery reports
and hands each result back to the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaError, Message, Producer

Headers = Sequence[tuple[str, bytes]]
Delivered = Callable[[KafkaError | None], None]


@dataclass(frozen=True)
class ProducerTuning:
    # librdkafka sends one produce request per partition batch: at 3,000 msgs/s over 6
    # partitions, 20 ms made 220 requests a second, the most of any kind Kafka served (bench
    # ledger, its JMX counts). 50 ms: fewer than half of those, for 30 ms more before the PUBACK.
    linger_ms: int = 50
    batch_size: int = 512 * 1024
    compression: str = "lz4"
    message_timeout_ms: int = 30_000
    message_max_bytes: int | None = None  # None: librdkafka's default (1,000,000)


def producer_config(bootstrap: str, client_id: str, tuning: ProducerTuning) -> dict[str, object]:
    config: dict[str, object] = {
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        "enable.idempotence": True,  # implies acks=all and ordered retries per partition
        "acks": "all",
        "linger.ms": tuning.linger_ms,
        "batch.size": tuning.batch_size,
        "compression.type": tuning.compression,
        "message.timeout.ms": tuning.message_timeout_ms,
    }
    if tuning.message_max_bytes is not None:
        config["message.max.bytes"] = tuning.message_max_bytes
    return config


# Errors that no retry fixes for *this record* (it is too big, or malformed): the record must
# take another form (ingest/bridge.py dead-letters a bounded one), never wait in a retry loop.
# Everything else (broker away, timed out, leader moving) is transient: retry, withhold the ack.
_PERMANENT_FOR_RECORD = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError._INVALID_ARG,
    }
)


def permanent_for_record(err: KafkaError) -> bool:
    """True if Kafka will never take this record as it is (see _PERMANENT_FOR_RECORD)."""
    return err.code() in _PERMANENT_FOR_RECORD


class AsyncProducer:
    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        loop: asyncio.AbstractEventLoop,
        tuning: ProducerTuning | None = None,
    ) -> None:
        self._producer = Producer(producer_config(bootstrap, client_id, tuning or ProducerTuning()))
        self._loop = loop
        self._closing = threading.Event()
        # Delivery reports of one poll() are handed to the loop in one call: a wake-up of the
        # event loop per message (call_soon_threadsafe) costs more than the produce itself.
        self._reports: list[tuple[Delivered, KafkaError | None]] = []
        self._poller = threading.Thread(target=self._poll_forever, name="kafka-poll", daemon=True)
        self._poller.start()

    def _poll_forever(self) -> None:
        while not self._closing.is_set():
            # poll() returns once it served the reports there are, so the wait only bounds how
            # late a close is seen, and how often an idle bridge wakes.
            self._poll(0.5)

    def _poll(self, timeout: float) -> None:
        self._producer.poll(timeout)
        if self._reports:
            reports, self._reports = self._reports, []
            self._loop.call_soon_threadsafe(_settle_all, reports)

    def send(
        self, topic: str, key: bytes, value: bytes, headers: Headers | None, done: Delivered
    ) -> None:
        """Produce one record; `done(error or None)` runs on the event loop on its report.

        A record librdkafka refuses at once (too large, bad argument) raises KafkaException
        here, before any report: the caller decides what the record becomes instead."""

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            # Runs in the poll thread, inside poll(): only it touches the report list.
            self._reports.append((done, err))

        # An accepted message has no headers: None, not an empty list, which still costs
        # librdkafka a header set (2.6 -> 1.8 us a produce, timed alone).
        header_list: list[tuple[str, str | bytes | None]] | None = (
            list(headers) if headers else None
        )
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=header_list, on_delivery=on_delivery
                )
                return
            except BufferError:
                # librdkafka's queue is full: back-pressure until reports drain it.
                time.sleep(0.01)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for every outstanding delivery report; return how many are still pending."""
        deadline = time.monotonic() + timeout
        while len(self._producer) > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self._producer)

    def close(self, timeout: float = 30.0) -> int:
        pending = self.flush(timeout)
        self._closing.set()
        self._poller.join(timeout=5)
        return pending


def _settle_all(reports: list[tuple[Delivered, KafkaError | None]]) -> None:
    for done, err in reports:
        done(err)
